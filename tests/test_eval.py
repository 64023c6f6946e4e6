"""sskt_lightning.eval: a checkpoint of a tiny run, evaluated again, gives the run's own test score
(and the score computed by hand); eval.json is written atomically; wrong input stops with the fix."""
import json
import subprocess
import sys

import pytest
import torch

from sskt_lightning.compose import compose_config
from sskt_lightning.errors import ConfigError, WeightsError
from sskt_lightning.eval import build_target, evaluate, read_checkpoint, write_json_atomic
from sskt_lightning.train import run

SMOKE = ["trainer=smoke", "data.batch_size=8", "data.val_size=16", "data.num_workers=0"]
N_TEST = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny scratch run on CIFAR-10 files in the real format: (results, run dir, data dir, test arrays)."""
    from data_fixtures import write_cifar10
    data_dir = tmp_path_factory.mktemp("data")
    arrays = write_cifar10(data_dir, n_train=80, n_test=N_TEST)
    out = tmp_path_factory.mktemp("run")
    results = run(compose_config(["data=cifar10", f"paths.data_dir={data_dir}", "model=resnet20",
                                  "method=scratch", *SMOKE], out))
    return results, out, data_dir, arrays["test"]


def eval_cfg(tmp_path, ckpt, *overrides):
    return compose_config([f"ckpt_path={ckpt}", "trainer=smoke", *overrides], tmp_path, config_name="eval")


def test_eval_reproduces_the_runs_test_score_and_the_hand_computed_one(trained, tmp_path):
    results, out, _, (images, labels) = trained
    ckpt = out / results["checkpoints"]["last"]
    result = evaluate(eval_cfg(tmp_path, ckpt))

    written = json.loads((tmp_path / "eval.json").read_text())
    assert written == result
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]   # no temp file left behind
    assert result["split"] == "test" and result["metric"] == "acc" and result["num_samples"] == N_TEST
    assert result["model"] == "cifar_resnet20" and result["method"] == "scratch" and result["num_classes"] == 10
    assert result["trained_on"] == "cifar10" and result["ckpt_path"] == str(ckpt.resolve())
    # the same weights on the same 24 test images as the run's own test at the end of training
    # acc: a count over 24 images, exact; loss: float32 through the same net on the same images, but the
    # batches may differ (conv kernels per batch size): rel 1e-5 is ~80 float32 ulp (equal here)
    assert result["acc"] == pytest.approx(results["test_acc"], abs=1e-6)
    assert result["loss"] == pytest.approx(results["extra"]["test_loss"], rel=1e-5)

    # by hand, in float64 (the evaluation too, trainer.precision=64-true), so the comparison is exact to
    # float64 rounding on any CPU: the checkpoint's net in eval mode on the normalised test images
    result64 = evaluate(eval_cfg(tmp_path / "f64", ckpt, "trainer.precision=64-true"))
    hp = read_checkpoint(ckpt)["hyper_parameters"]["data_info"]
    net = build_target(read_checkpoint(ckpt)).eval().double()
    mean, std = torch.tensor(hp["mean"]).view(1, 3, 1, 1), torch.tensor(hp["std"]).view(1, 3, 1, 1)
    x32 = (torch.from_numpy(images).float() / 255 - mean) / std   # the data module normalises in float32 ...
    with torch.no_grad():
        logits = net(x32.double())                                 # ... and 64-true casts that to float64
    by_hand = (logits.argmax(1) == torch.from_numpy(labels)).double().mean().item()
    assert result["acc"] == result64["acc"] == pytest.approx(by_hand, abs=1e-12)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item()
    assert result64["loss"] == pytest.approx(loss, rel=1e-9)   # sensitive to the input statistics
    assert result["loss"] == pytest.approx(loss, rel=1e-5)     # float32: ~80 ulp, as above


@pytest.mark.slow
def test_an_sskt_checkpoint_evaluates_without_its_sources(trained, tmp_path):
    """Only the target is rebuilt: the source's weights file may be gone by evaluation time."""
    import shutil
    results, out, data_dir, _ = trained
    source = tmp_path / "source.ckpt"
    shutil.copy(out / results["checkpoints"]["last"], source)
    sskt = run(compose_config(["data=cifar10", f"paths.data_dir={data_dir}", "model=resnet20", *SMOKE,
                               "method=sskt", "source=[checkpoint]", f"source.checkpoint.weights={source}"],
                              tmp_path / "sskt"))
    source.unlink()
    result = evaluate(eval_cfg(tmp_path / "eval", tmp_path / "sskt" / sskt["checkpoints"]["last"]))
    assert result["method"] == "sskt" and result["acc"] == pytest.approx(sskt["test_acc"], abs=1e-6)


def test_eval_on_the_validation_split_and_an_explicit_data_config(trained, tmp_path):
    results, out, data_dir, _ = trained
    ckpt = out / results["checkpoints"]["last"]
    result = evaluate(eval_cfg(tmp_path, ckpt, "split=val", "data=cifar10", f"paths.data_dir={data_dir}",
                               "data.val_size=16", "data.batch_size=8"))
    assert result["split"] == "val" and result["num_samples"] == 16 and 0.0 <= result["acc"] <= 1.0


def test_data_with_another_class_count_is_refused(trained, tmp_path):
    results, out, data_dir, _ = trained
    with pytest.raises(ConfigError, match=r"3 classes but the checkpoint's network was trained on 10.*data.classes"):
        evaluate(eval_cfg(tmp_path, out / results["checkpoints"]["last"], "data=cifar10",
                          f"paths.data_dir={data_dir}", "data.val_size=4", "data.classes=[0,1,2]"))
    assert not (tmp_path / "eval.json").exists()


def test_missing_and_foreign_checkpoints_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="ckpt_path=.*does not exist.*checkpoints/last.ckpt"):
        read_checkpoint(tmp_path / "nope.ckpt")
    foreign = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, foreign)
    with pytest.raises(WeightsError, match="not a checkpoint of this project.*source.<name>.weights"):
        read_checkpoint(foreign)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="Could not read weights"):
        read_checkpoint(garbage)


@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_checkpoints_data_config_never_chooses_code_to_run(trained, tmp_path, where):
    """The data config inside a checkpoint is a file's content: a _target_ other than ImageDataModule
    (at the top or nested in a value, where Hydra would instantiate it too) is refused before
    anything is built; nothing it names runs."""
    results, out, data_dir, _ = trained
    obj = torch.load(out / results["checkpoints"]["last"], weights_only=True)
    marker = tmp_path / "ran"
    payload = {"_target_": "os.mkdir", "path": str(marker)}
    data = obj["hyper_parameters"]["config"]["data"]
    if where == "top":
        obj["hyper_parameters"]["config"]["data"] = payload
    else:
        data["classes"] = payload
    hostile = tmp_path / "hostile.ckpt"
    torch.save(obj, hostile)
    match = "_target_='os.mkdir'" if where == "top" else r"Hydra keys \['data.classes._target_'\]"
    with pytest.raises(WeightsError, match=match + ".*data=<dataset>"):
        evaluate(eval_cfg(tmp_path / "eval", hostile))
    assert not marker.exists() and not (tmp_path / "eval" / "eval.json").exists()


def test_a_checkpoints_data_config_downloads_only_where_the_user_said(trained, tmp_path, monkeypatch):
    from sskt_lightning.eval import recorded_data_module
    results, out, data_dir, _ = trained
    data = dict(read_checkpoint(out / results["checkpoints"]["last"])["hyper_parameters"]["config"]["data"])
    data["download"] = True
    assert recorded_data_module(data, tmp_path / "x.ckpt", user_data_dir=False).download is False
    assert recorded_data_module(data, tmp_path / "x.ckpt", user_data_dir=True).download is True
    with pytest.raises(WeightsError, match=r"arguments \['shell'\] that ImageDataModule does not take"):
        recorded_data_module({**data, "shell": "rm -rf /"}, tmp_path / "x.ckpt", user_data_dir=False)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "eval.json"
    write_json_atomic(path, {"acc": 0.5})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"acc": object()})   # not JSON: fails half way through the dump
    assert json.loads(path.read_text()) == {"acc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


@pytest.mark.slow
def test_command_line_errors_name_the_option_without_a_traceback(tmp_path):
    for args, expected in ((["split=test"], "ckpt_path is required"),
                           ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], "does not exist")):
        proc = subprocess.run([sys.executable, "-m", "sskt_lightning.eval", *args,
                               f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr
