"""The protocol command (python -m sskt_lightning.protocol): search on validation with the same trial
budget per method, the selected configuration re-run per seed, a report with paired gains, resume
without repeating finished runs - on tiny written CIFAR files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sskt_lightning import protocol as P
from sskt_lightning.errors import ConfigError
from sskt_lightning.train import CONFIG_DIR

SMALL_SOURCE = ["source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.num_classes=10",
                "source.timm.pretrained=false"]


def tiny_protocol(tmp_path, **kw) -> P.Protocol:
    defaults = dict(out=tmp_path / "proto", setting=["data=cifar10"], trials=3, seeds=[0, 1], search_seed=7,
                    jobs=1, threads=1, batch=1, setting_name="tiny",
                    methods=[P.method_spec("scratch"), P.method_spec("sskt")])
    defaults.update(kw)
    return P.Protocol(**defaults)


def fake_results(run_dir: Path, last_val: float, test: float, status: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"last_val_acc": last_val, "best_val_acc": last_val, "test_acc": test}
    if status:
        data["status"] = status
    (run_dir / "results.json").write_text(json.dumps(data))


# ----------------------------------------------------------------------------- search space and trials


def test_search_spaces_come_from_the_hparams_search_configs():
    dists, fixed, sampler = P.search_space("sskt_unlabeled")
    assert set(dists) == {"optim.optimizer.lr", "optim.optimizer.weight_decay", "method.alpha",
                          "method.temperature", "method.aux_loss", "data.unlabeled_ratio"}
    assert dists["method.aux_loss"].choices == ("ce", "kd")
    assert dists["method.alpha"].low == pytest.approx(0.05) and dists["method.alpha"].high == pytest.approx(2.0)
    assert type(dists["method.alpha"]).__name__ == "FloatDistribution" and dists["method.alpha"].log
    for space, key in [("kd", "method.temperature"), ("dml", "method.kl_warmup"), ("maxl", "method.psi"),
                       ("maxl", "method.generator_optim.lr"), ("scratch", "optim.optimizer.lr")]:
        assert key in P.search_space(space)[0], (space, key)
    with pytest.raises(ConfigError, match="no search space for method 'nosuch'"):
        P.method_spec("nosuch")
    assert P.method_spec("sskt_unlabeled", ["method=sskt", "method.unlabeled=true"]).space == "sskt_unlabeled"
    assert P.method_spec("sskt_a1", ["method=sskt", "method.alpha=1.0"]).space == "sskt"


def test_trial_parameters_are_deterministic_and_start_from_the_recipe(tmp_path):
    a = P.Search(tiny_protocol(tmp_path / "a"), P.method_spec("sskt"))
    b = P.Search(tiny_protocol(tmp_path / "b"), P.method_spec("sskt"))
    for s in (a, b):
        s.ask_round(0)
        fake_results(s.trial_dir(0), 0.5, 0.5)
        s.ask_round(1)
    pa, pb = a.trials_on_disk(), b.trials_on_disk()
    assert pa == pb and len(pa) == 2
    # trial 0 is the configured recipe (conf/method/sskt.yaml, conf/optim/sgd.yaml) where it lies in the space
    assert pa[0]["method.alpha"] == pytest.approx(0.1) and pa[0]["method.aux_loss"] == "ce"
    assert pa[0]["method.temperature"] == pytest.approx(3.0) and pa[0]["optim.optimizer.lr"] == pytest.approx(0.1)
    assert pa[1] != pa[0]
    # a resumed protocol asks exactly what an uninterrupted one did
    (a.trial_dir(1) / P.TRIAL_FILE).unlink()
    a.ask_round(1)
    assert a.trials_on_disk() == pb


def test_selection_uses_validation_never_test(tmp_path):
    proto = tiny_protocol(tmp_path)
    search = P.Search(proto, P.method_spec("scratch"))
    for r in range(3):
        search.ask_round(r)
    # trial 1: best on validation, worst on test; trial 2: failed; trial 0: best on test
    fake_results(search.trial_dir(0), last_val=0.60, test=0.99)
    fake_results(search.trial_dir(1), last_val=0.80, test=0.10)
    (search.trial_dir(2)).mkdir(parents=True, exist_ok=True)
    (search.trial_dir(2) / "failed.txt").write_text("ConfigError: boom\n")
    assert P.run_state(search.trial_dir(2)) == "failed"
    interrupted = tmp_path / "interrupted"          # SIGTERM / Ctrl-C: not the trial's outcome, run it again
    interrupted.mkdir()
    (interrupted / "failed.txt").write_text("Interrupted: the run was interrupted (SIGTERM) ...\n")
    (interrupted / "results.json").write_text(json.dumps({"status": "failed", "error_type": "Interrupted"}))
    assert P.run_state(interrupted) == "todo"
    selected = search.select()
    assert selected["trial"] == 1 and selected["value"] == pytest.approx(0.80)
    assert selected["params"] == search.trials_on_disk()[1] and selected["trials_ok"] == 2
    assert json.loads((proto.out / "scratch" / "selected.json").read_text())["trial"] == 1
    # the other selection key, still a validation number
    proto.metric = "best_val_acc"
    assert search.select()["trial"] == 1


def test_a_changed_protocol_is_refused_on_resume(tmp_path):
    P._check_identity(tiny_protocol(tmp_path))
    P._check_identity(tiny_protocol(tmp_path, jobs=2, seeds=[0, 1, 2]))     # jobs / seeds may change
    with pytest.raises(ConfigError, match="other trials"):
        P._check_identity(tiny_protocol(tmp_path, trials=5))


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"status": "ok", "note": "\xff\xfe"}', b"[" * 100_000])
def test_unreadable_run_files_count_as_missing_and_a_damaged_identity_is_refused(tmp_path, content):
    """A results.json / trial.json that is not UTF-8, not JSON or not an object is no run (done
    again on resume), never a traceback; protocol.json, the identity a resume is checked against,
    is refused rather than silently rewritten."""
    proto = tiny_protocol(tmp_path)
    search = P.Search(proto, P.method_spec("scratch"))
    search.ask_round(0)
    run = search.trial_dir(1)
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_bytes(content)
    assert P.run_state(run) == "todo" and P.metric_value(run, "last_val_acc") is None
    (search.trial_dir(0) / P.TRIAL_FILE).write_bytes(content)
    assert 0 not in search.trials_on_disk()
    P._check_identity(proto)
    (proto.out / P.PROTOCOL_FILE).write_bytes(content)
    with pytest.raises(ConfigError, match=r"protocol.json is unreadable .*another --out"):
        P._check_identity(proto)


def test_spec_and_command_line(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: five labels\nsetting: [data=cifar10, data.labels_per_class=5]\ntrials: 4\n"
                    "methods:\n  scratch: null\n  sskt_unlabeled: [method=sskt, method.unlabeled=true, "
                    "data.unlabeled=true]\n")
    proto = P.protocol_from_args(["--out", str(tmp_path / "o"), "--spec", str(spec), "--seeds", "3", "4",
                                  "--jobs", "2", "trainer.max_epochs=3"])
    assert proto.setting == ["data=cifar10", "data.labels_per_class=5", "trainer.max_epochs=3"]
    assert [m.name for m in proto.methods] == ["scratch", "sskt_unlabeled"]
    assert [m.space for m in proto.methods] == ["scratch", "sskt_unlabeled"]
    assert proto.trials == 4 and proto.seeds == [3, 4] and proto.setting_name == "five labels"
    assert proto.batch == 1 and proto.threads >= 1 and proto.baseline == "scratch"
    with pytest.raises(ConfigError, match="unknown keys"):
        spec.write_text("trails: 3\n")
        P.protocol_from_args(["--out", str(tmp_path / "o"), "--spec", str(spec)])


@pytest.mark.slow
def test_an_incomplete_protocol_exits_non_zero_and_names_what_is_missing(tmp_path, monkeypatch, capsys):
    """A failed final run or a method whose every trial failed: the report is still written, but the
    command must not end with 0 as if the comparison were complete."""
    out = tmp_path / "proto"
    fake_results(out / "scratch" / "final" / "seed_0", last_val=0.5, test=0.5)
    failed = out / "scratch" / "final" / "seed_1"
    failed.mkdir(parents=True)
    (failed / "failed.txt").write_text("NonFiniteError: loss is nan at step 3\ntraceback\n")
    (failed / "results.json").write_text(json.dumps({"status": "failed", "error": "NonFiniteError: loss is nan at step 3"}))
    selected = {"scratch": {"trial": 0, "value": 0.5, "params": {}}, "sskt": None}
    argv = ["--out", str(out), "--methods", "scratch", "sskt", "--seeds", "0", "1"]
    monkeypatch.setattr(P, "run_protocol", lambda proto, log=print: selected)
    assert P.main(argv) == 1
    err = capsys.readouterr().err
    assert "incomplete" in err and "scratch seed 1: NonFiniteError: loss is nan at step 3" in err
    assert str(failed) in err and "sskt: every search trial failed" in err and "seed 0" not in err
    # everything there: 0
    (failed / "failed.txt").unlink()
    fake_results(failed, last_val=0.6, test=0.6)
    selected["sskt"] = {"trial": 1, "value": 0.7, "params": {}}
    for s in (0, 1):
        fake_results(out / "sskt" / "final" / f"seed_{s}", last_val=0.7, test=0.7)
    assert P.main(argv) == 0


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_protocol_end_to_end_and_resume(tmp_path, cifar_dir):
    """Two methods, two trials, two seeds: search, selection, finals, a paired report; a second call
    repeats nothing."""
    out = tmp_path / "proto"
    cmd = [sys.executable, "-m", "sskt_lightning.protocol", "--out", str(out), "--methods", "scratch", "sskt",
           "--trials", "2", "--seeds", "0", "1", "--search-seed", "5", "--jobs", "2", "--threads", "1",
           "--setting", "tiny", "data=cifar10", f"paths.data_dir={cifar_dir}", "model=resnet20", "trainer=smoke",
           "data.batch_size=8", "data.num_workers=0", "data.val_size=16", "data.steps_per_epoch=2",
           "optim=sgd_cosine", *SMALL_SOURCE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for method in ("scratch", "sskt"):
        trials = sorted((out / method / "search").glob("trial_*"))
        assert [t.name for t in trials] == ["trial_000", "trial_001"]
        assert all(P.run_state(t) == "done" for t in trials)
        selected = json.loads((out / method / "selected.json").read_text())
        vals = [json.loads((t / "results.json").read_text())["last_val_acc"] for t in trials]
        assert selected["value"] == pytest.approx(max(vals))
        # a search trial never reads the test split: only the finals test, once
        assert all(json.loads((t / "results.json").read_text())["test_acc"] is None for t in trials)
        for seed in (0, 1):
            run = out / method / "final" / f"seed_{seed}"
            res = json.loads((run / "results.json").read_text())
            side = json.loads((run / "protocol.json").read_text())
            assert res["seed"] == seed and side["phase"] == "final" and side["name"] == method
            assert 0.0 <= res["test_acc"] <= 1.0
            assert side["params"] == selected["params"]
            for key, value in selected["params"].items():     # the run really used them
                assert f"{key}={P._override_value(value)}" in res["overrides"]
    md = (out / "report" / "report.md").read_text()
    assert "## Search (validation only)" in md and "gain over scratch (points)" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    sskt = dict(zip(header, [c.strip() for c in next(ln for ln in lines if ln.startswith("| sskt ")).split("|")[1:-1]]))
    assert sskt["wins"].endswith("/2")            # out of the 2 paired seeds
    assert sskt["selected on validation"].startswith("lr=")
    assert (out / "report" / "report.csv").is_file() and (out / "report" / "gains.png").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == stamps   # nothing re-ran
    assert " min] " not in again.stdout          # no run was launched (the runner logs each finished run)


def test_method_flags_unlabeled_reference_search_only_and_a_named_space():
    assert P.method_spec("sskt_unlabeled", ["method=sskt", "method.unlabeled=true", "data.unlabeled=true"]).unlabeled
    assert not P.method_spec("sskt", ["method=sskt", "data.unlabeled=true", "data.unlabeled=false"]).unlabeled
    assert not P.method_spec("scratch").unlabeled and P.method_spec("scratch", unlabeled=True).unlabeled
    ref = P.method_spec("finetuned_source", {"overrides": ["method=scratch", "model.weights=/s.ckpt"],
                                             "reference": True, "final": False, "space": "scratch"})
    assert (ref.reference, ref.final, ref.space, ref.unlabeled) == (True, False, "scratch", False)
    assert P.method_spec("x", ["method=sskt"], space="sskt_unlabeled").space == "sskt_unlabeled"
    with pytest.raises(ConfigError, match="search space 'nosuch'.*does not exist"):
        P.method_spec("x", ["method=sskt"], space="nosuch")
    with pytest.raises(ConfigError, match="reference must be true or false"):
        P.method_spec("x", {"overrides": ["method=sskt"], "reference": "yes"})
    with pytest.raises(ConfigError, match="unknown keys"):
        P.method_spec("x", {"overrides": ["method=sskt"], "labels": 3})
    # the run's protocol.json carries the flags the report reads
    job = P.Job(ref, "final", Path("/r"), 0, {})
    side = job.sidecar(P.Protocol(out=Path("/o"), setting=[], methods=[ref]), 1.0)
    assert side["reference"] is True and side["unlabeled"] is False


def test_a_method_may_join_a_protocol_but_not_change(tmp_path):
    P._check_identity(tiny_protocol(tmp_path))
    more = [P.method_spec("scratch"), P.method_spec("sskt"), P.method_spec("kd_x", ["method=kd"], space="kd")]
    P._check_identity(tiny_protocol(tmp_path, methods=more))                  # a method joins: recorded
    assert set(json.loads((tmp_path / "proto" / P.PROTOCOL_FILE).read_text())["methods"]) == {"scratch", "sskt", "kd_x"}
    P._check_identity(tiny_protocol(tmp_path, methods=[P.method_spec("sskt")]))   # a subset resumes
    with pytest.raises(ConfigError, match="overrides or search space of method.*kd_x"):
        P._check_identity(tiny_protocol(tmp_path, methods=[P.method_spec("kd_x", ["method=kd", "method.alpha=1"])]))
    # the report-only flags are not the identity: marking a method a reference later is fine
    P._check_identity(tiny_protocol(tmp_path, methods=[P.method_spec("sskt", reference=True, final=False)]))


def test_a_search_only_method_runs_no_final_and_is_not_missing(tmp_path):
    spec = P.method_spec("scratch", final=False)
    proto = tiny_protocol(tmp_path, methods=[spec], trials=1)
    search = P.Search(proto, spec)
    search.ask_round(0)
    fake_results(search.trial_dir(0), last_val=0.5, test=0.5)
    selected = P.run_protocol(proto, log=lambda line: None)
    assert selected["scratch"]["trial"] == 0
    assert not (proto.out / "scratch" / "final").exists() and P.missing(proto, selected) == []
    report_md = (proto.out / "report" / "report.md").read_text()
    assert "scratch (search only)" in report_md


# ----------------------------------------------------------------------------- the Fashion-MNIST benchmark


def _experiment(name: str):
    import importlib.util
    folder = Path(__file__).resolve().parents[1] / "experiments" / "fashion_transfer"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module             # (its dataclasses look their module up)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_benchmark_plan_counts_the_runs_and_follows_the_policy_selection(tmp_path, capsys):
    B = _experiment("benchmark")
    argv = ["--plan", "--labels", "5", "--setting", "coarse", "--out", str(tmp_path)]
    B.main(argv)
    out = capsys.readouterr().out
    # source 1 + born-again teachers 6 + fine-tuned sources 6 (seeds 100, 0-4) + 14 methods x 6 trials
    # + finals 5 x (10 methods + fixmatch + freematch) + up to 5 for a winning flexmatch / softmatch
    assert f"{1 + 6 + 6 + 14 * 6 + 5 * 12 + 5} runs to do" in out and "labels5 " not in out
    assert "flexmatch         search 6/6 to do, finals 0/0 to do (+5 finals if it wins" in out
    # scratch's search done; freematch won the policy selection (ties go to freematch): no extra finals
    proto = tmp_path / "labels5" / "protocol"
    for k in range(6):
        fake_results(proto / "scratch" / "search" / f"trial_{k:03d}", 0.5, 0.5)
    for name, value in [("fixmatch", 0.8), ("freematch", 0.8), ("flexmatch", 0.7), ("softmatch", 0.75)]:
        (proto / name).mkdir(parents=True)
        if name == "softmatch":     # while a policy's search runs, no winner: its finals are still possible
            assert B.policy_winner(proto, list(B.POLICIES)) is None
            B.main(argv)
            assert "(+5 finals if it wins the policy selection)" in capsys.readouterr().out
        (proto / name / P.SELECTED_FILE).write_text(json.dumps({"value": value, "trial": 0, "params": {}}))
    assert B.policy_winner(proto, list(B.POLICIES)) == "freematch"
    assert B.policy_winner(proto, ["fixmatch", "softmatch"]) == "fixmatch"
    assert B.policy_winner(proto, []) is None
    B.main(argv)
    out = capsys.readouterr().out
    assert f"{1 + 6 + 6 + 14 * 6 - 6 + 5 * 12} runs to do" in out
    assert "flexmatch         search 6/6 to do, finals 0/0 to do (search only: lost the policy selection)" in out
    # softmatch wins: its finals join
    (proto / "softmatch" / P.SELECTED_FILE).write_text(json.dumps({"value": 0.9, "trial": 0, "params": {}}))
    B.main(argv)
    out = capsys.readouterr().out
    assert f"{1 + 6 + 6 + 14 * 6 - 6 + 5 * 13} runs to do" in out and "WARNING" not in out
    # a directory holding another protocol (e.g. records made under another checkout path) is flagged
    (proto / P.PROTOCOL_FILE).write_text(json.dumps({"setting": ["data=other"], "methods": {
        "scratch": {"overrides": ["method=scratch"]}, "kd": {"overrides": ["method=kd"]}}}))
    B.main(argv)
    assert "holds another protocol (its setting differs; method kd's overrides differ)" in capsys.readouterr().out


def test_benchmark_methods_use_the_interface_names_and_flags(monkeypatch):
    B = _experiment("benchmark")
    src, teachers, ft = Path("/s/last.ckpt"), Path("/b/labels5/teachers"), Path("/b/labels5/finetuned")
    ov = {m: B.method_overrides(m, src, teachers, ft, policy="soft") for m in B.METHODS + B.OPTIONAL}
    assert ov["fixmatch"] == ["method=fixmatch", "method.threshold=fixed", "data.unlabeled=true"]
    assert ov["freematch"] == ["method=fixmatch", "method.threshold=free", "data.unlabeled=true"]
    assert "source.checkpoint.weights=/b/labels5/finetuned/seed_{seed}/checkpoints/last.ckpt" in ov["kd_unlabeled"]
    assert {"method=kd", "method.unlabeled=true"} <= set(ov["kd_unlabeled"])
    assert {"method=dml", "method.unlabeled=true"} <= set(ov["dml_unlabeled"])
    assert {"method=sskt", "method.consistency=fixmatch", "method.threshold=soft", "method.unlabeled=true",
            "source.checkpoint.weights=/s/last.ckpt"} <= set(ov["sskt_fixmatch"])
    assert ov["finetuned_source"] == ["method=scratch", "model.weights=/s/last.ckpt"]
    assert ov["linear_probe"][-1] == "model.freeze=backbone"
    unlabeled = {m for m, o in ov.items() if P.uses_unlabeled(o)}
    assert unlabeled == {"sskt_unlabeled", "fixmatch", "freematch", "flexmatch", "softmatch", "kd_unlabeled",
                         "dml_unlabeled", "sskt_fixmatch"}
    # every method on the unlabeled stream searches a space of its own (with the stream's knobs)
    assert {B.SPACES[m] for m in unlabeled} == {"sskt_unlabeled", "fixmatch", "kd_unlabeled", "dml_unlabeled",
                                                "sskt_fixmatch"}
    dists = P.search_space("sskt_fixmatch")[0]
    assert {"method.tau", "method.lambda_u", "data.unlabeled_ratio", "method.alpha", "method.aux_loss"} <= set(dists)
    # finals: the policies other than fixmatch / freematch only when they win; references marked
    monkeypatch.setattr(B, "SPACES", {m: "scratch" for m in B.SPACES})      # (spaces other branches add)
    specs = {s.name: s for s in B.specs(B.METHODS, src, teachers, ft, "soft", winner="softmatch")}
    assert [m for m, s in specs.items() if not s.final] == ["flexmatch"]
    assert [m for m, s in specs.items() if s.reference] == ["finetuned_source"]
    assert {m for m, s in specs.items() if s.unlabeled} == unlabeled
    assert not B.specs(["softmatch"], src, teachers, ft, "free", winner=None)[0].final
    assert B.missing_spaces(["scratch"]) == []


def test_benchmark_settings_compose_and_the_coarse_one_resumes_the_recorded_benchmark(tmp_path, capsys):
    from omegaconf import OmegaConf

    from sskt_lightning.compose import compose_config
    B = _experiment("benchmark")
    argv = B.argparse.Namespace(setting=["coarse", "disjoint"], labels=[5], out=tmp_path, ema=0.999, epochs=15,
                                model="resnet20", steps_per_epoch=20, precision="32-true", channels_last=False)
    coarse, disjoint = B.cells(argv)
    assert disjoint.root == tmp_path / "labels5_disjoint_ema0.999" and coarse.root == tmp_path / "labels5_ema0.999"
    assert coarse.target[-1] == disjoint.target[-1] == "model.ema=0.999"
    # the numerics switches: every run alike, and their own directories (never mixed with fp32 records)
    fast = B.cells(B.argparse.Namespace(**{**vars(argv), "precision": "bf16-mixed", "channels_last": True}))
    assert [c.root.name for c in fast] == ["labels5_ema0.999_bf16_cl", "labels5_disjoint_ema0.999_bf16_cl"]
    assert fast[0].target == [*coarse.target, "trainer.precision=bf16-mixed", "channels_last=true"]
    fast_cfg = compose_config([*fast[1].target, "seed=0"], tmp_path / "f")
    assert fast_cfg.trainer.precision == "bf16-mixed" and fast_cfg.channels_last is True
    # --ema-bn recompute: every run alike, its own directories; refused without --ema
    rec = B.cells(B.argparse.Namespace(**{**vars(argv), "precision": "bf16-mixed", "channels_last": True,
                                          "ema_bn": "recompute"}))
    assert [c.root.name for c in rec] == ["labels5_ema0.999_bnrc_bf16_cl", "labels5_disjoint_ema0.999_bnrc_bf16_cl"]
    assert rec[0].target == [*coarse.target, "model.ema_bn=recompute", "trainer.precision=bf16-mixed",
                             "channels_last=true"]
    assert compose_config([*rec[0].target, "seed=0"], tmp_path / "r").model.ema_bn == "recompute"
    with pytest.raises(SystemExit):
        B.main(["--plan", "--ema-bn", "recompute", "--out", str(tmp_path)])
    assert "--ema-bn recompute recomputes the statistics of the weight average: add --ema DECAY" \
        in capsys.readouterr().err
    # the coarse setting without EMA is exactly what the recorded benchmark ran (so its runs resume)
    recorded = Path(__file__).resolve().parents[1] / "experiments/fashion_transfer/benchmark_runs/labels5/protocol"
    argv.ema = None
    assert B.cells(argv)[0].target == json.loads((recorded / P.PROTOCOL_FILE).read_text())["setting"]
    # disjoint: the source on classes 0-4 of the first half, the targets on 5-9 of the second half
    T = _experiment("two_stage")
    src = compose_config(T.source_overrides(3, "resnet20", 0, B.SETTINGS["disjoint"].source_classes), tmp_path / "s")
    tgt = compose_config([*disjoint.target, "seed=0"], tmp_path / "t")
    assert list(src.data.classes) == [0, 1, 2, 3, 4] and list(src.data.train_part) == [0, 2]
    assert list(tgt.data.classes) == [5, 6, 7, 8, 9] and list(tgt.data.train_part) == [1, 2]
    assert tgt.data.label_map is None and tgt.data.labels_per_class == 5 and tgt.model.ema == 0.999
    assert OmegaConf.select(compose_config(coarse.target, tmp_path / "c"), "data.label_map") is not None
    for m in ["scratch", "kd", "dml", "maxl", "sskt", "sskt_unlabeled", "finetuned_source"]:   # on this branch
        compose_config([*disjoint.target, *P._format(B.method_overrides(m, Path("/s.ckpt"), disjoint.teachers), 1),
                        "seed=1"],
                       tmp_path / m)


def test_make_train_gains_the_fixmatch_and_freematch_rows(tmp_path, capsys):
    T = _experiment("two_stage")
    T.main(["--dry-run", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 5 and "data.train_part=[0,2]" in lines[0]
    targets = {ln.split("hydra.run.dir=")[1]: ln for ln in lines[1:]}
    fix = targets[str((tmp_path / "target_fixmatch").resolve())]
    free = targets[str((tmp_path / "target_freematch").resolve())]
    assert "method=fixmatch data.unlabeled=true" in fix and "threshold" not in fix
    assert "method=fixmatch method.threshold=free data.unlabeled=true" in free
    assert set(T.ROWS) == {"scratch", "sskt", "sskt+unlabeled", "fixmatch", "freematch"}


def test_benchmark_runs_the_policies_first_then_the_winner_and_sskt_fixmatch_with_it(tmp_path, monkeypatch):
    """The orchestration, with the training replaced: step 1 searches the four policies (finals only for
    fixmatch and freematch) beside the other methods; step 2 adds the winner's finals and sskt_fixmatch
    with the winning policy."""
    B = _experiment("benchmark")
    values = {"fixmatch": 0.70, "freematch": 0.72, "flexmatch": 0.75, "softmatch": 0.60}
    calls, stages = [], []

    def fake_protocol(proto, log=print):
        calls.append({m.name: m for m in proto.methods})
        for m in proto.methods:
            if m.name in values:
                (proto.out / m.name).mkdir(parents=True, exist_ok=True)
                (proto.out / m.name / P.SELECTED_FILE).write_text(json.dumps({"value": values[m.name]}))
        (proto.out / "report").mkdir(parents=True, exist_ok=True)
        (proto.out / "report" / "report.md").write_text("\n".join(proto.notes))
        return {m.name: {"trial": 0, "value": 0.5, "params": {}} for m in proto.methods}

    monkeypatch.setattr(B.P, "run_protocol", fake_protocol)
    monkeypatch.setattr(B, "missing_spaces", lambda methods: [])
    monkeypatch.setattr(B, "SPACES", {m: "scratch" for m in B.SPACES})      # (spaces other branches add)
    monkeypatch.setattr(B, "train_source", lambda out, *a, **k: out / "checkpoints" / "last.ckpt")
    monkeypatch.setattr(B, "train_stage", lambda setting, out_dir, extra, seeds, *a: stages.append((out_dir.name,
                                                                                                     extra, seeds)))
    argv = ["--labels", "5", "--setting", "disjoint", "--out", str(tmp_path / "o"), "--results", str(tmp_path / "r"),
            "--ema", "0.999"]
    B.main(argv)
    assert len(calls) == 2
    first, second = calls
    assert "sskt_fixmatch" not in first and set(second) == set(B.METHODS)
    assert [m for m, s in first.items() if not s.final] == ["flexmatch", "softmatch"]
    assert [m for m, s in second.items() if not s.final] == ["softmatch"]      # flexmatch won on validation
    assert "method.threshold=flex" in second["sskt_fixmatch"].overrides
    # the stages: born-again teachers and the fine-tuned source (model.weights=<the disjoint source>), seeds 100, 0-4
    src = (tmp_path / "o" / "source_disjoint" / "checkpoints" / "last.ckpt").resolve()
    assert stages == [("teachers", ["method=scratch"], [100, 0, 1, 2, 3, 4]),
                      ("finetuned", ["method=scratch", f"model.weights={src}"], [100, 0, 1, 2, 3, 4])]
    report_md = (tmp_path / "r" / "labels5_disjoint_ema0.999" / "report.md").read_text()
    assert "model.ema=0.999" in report_md and "policy: flex" in report_md
    # resumed: the winner is known from the start, so its finals are in the first step already
    calls.clear()
    B.main(argv)
    assert len(calls) == 2 and [m for m, s in calls[0].items() if not s.final] == ["softmatch"]


# ----------------------------------------------------------------------------- pruning (issue #20)


def _fake_trial(search, k: int, val: float, steps: int) -> None:
    """Trial k on disk as a finished run that scored ``val`` at each of its ``steps`` validations."""
    search.ask_round(k)
    fake_results(search.trial_dir(k), val, None)     # a search trial never tests
    (search.trial_dir(k) / "protocol.json").write_text(json.dumps({"name": search.method.name, "phase": "search",
                                                                  "trial": k, "elapsed_s": 1.0}))
    (search.trial_dir(k) / "intermediate.jsonl").write_text(
        "".join(json.dumps({"step": s, "val_acc": val}) + "\n" for s in range(steps)))


def test_the_protocol_runs_on_optuna_4_with_its_study_on_disk(tmp_path):
    """The main environment's Optuna is 4.x (the sweep extra), whose journal file the study uses."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    assert int(optuna.__version__.split(".")[0]) == 4, optuna.__version__
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(tmp_path / "j"))), study_name="s")
    study.enqueue_trial({"x": 1.0})
    assert study.ask().suggest_float("x", 0, 2) == 1.0


def test_a_protocol_from_before_pruning_resumes_with_pruner_none_and_says_so(tmp_path):
    old = tiny_protocol(tmp_path, pruner="none")
    old.out.mkdir(parents=True)
    P._check_identity(old)                      # written as by the code before pruning: no "pruner" key
    assert "pruner" not in json.loads((old.out / P.PROTOCOL_FILE).read_text())
    with pytest.raises(ConfigError, match="predates pruning: resume it with --pruner none"):
        P._check_identity(tiny_protocol(tmp_path, pruner="median"))
    P._check_identity(tiny_protocol(tmp_path, pruner="none"))
    with pytest.raises(ConfigError, match="pruner 'sometimes'"):
        P.protocol_from_args(["--out", str(tmp_path / "x"), "--methods", "scratch", "--spec", str(_spec(tmp_path))])


def _spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("pruner: sometimes\n")
    return path


def test_should_prune_spares_the_startup_trials_and_the_warmup():
    from sskt_lightning.pruning import should_prune
    earlier = [{"state": "complete", "value": 0.9, "values": {0: 0.8, 1: 0.9, 2: 0.9}}] * 2
    ctx = {"trial": 2, "pruner": "median", "n_startup": 2, "warmup": 1, "earlier": earlier}
    assert not should_prune(ctx, {0: 0.1})                     # step 0: the warm-up
    assert should_prune(ctx, {0: 0.1, 1: 0.2})                 # below the earlier trials' median
    assert not should_prune(ctx, {0: 0.1, 1: 0.95})
    assert not should_prune({**ctx, "trial": 1}, {0: 0.1, 1: 0.2})    # a start-up trial: never
    assert not should_prune({**ctx, "pruner": "none"}, {0: 0.1, 1: 0.2})
    halving = {**ctx, "pruner": "halving"}
    assert should_prune(halving, {0: 0.1, 1: 0.2}) and not should_prune(halving, {0: 0.1, 1: 0.95})


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned_recorded_and_a_resume_knows_it(tmp_path, cifar_dir):
    """Trials 0 and 1 scored 100 % at every validation (written here), so the median pruner stops trial
    2 (a real run, 3 epochs) at its first validation; the final run is never pruned; a resume
    repeats nothing and counts nothing as failed."""
    from sskt_lightning.search import STUDY_FILE, Search, trial_state
    proto = tiny_protocol(tmp_path, methods=[P.method_spec("scratch")], seeds=[0], pruner="median", prune_warmup=0,
                          setting=["data=cifar10", f"paths.data_dir={cifar_dir}", "model=resnet20", "trainer=smoke",
                                   "trainer.max_epochs=3", "data.batch_size=8", "data.num_workers=0",
                                   "data.val_size=16", "optim=sgd_cosine"])
    proto.out.mkdir(parents=True)
    search = Search(proto, proto.methods[0])
    for k in (0, 1):
        _fake_trial(search, k, 1.0, steps=3)
    lines: list[str] = []
    selected = P.run_protocol(proto, log=lines.append)
    trial = search.trial_dir(2)
    res = json.loads((trial / "results.json").read_text())
    pruned = json.loads((trial / "pruned.json").read_text())
    assert res["status"] == "pruned" and pruned["epoch"] == 0 and res["epochs"] == 1 and pruned["max_epochs"] == 3
    assert (trial / "checkpoints" / "last.ckpt").is_file() and (trial / "train.log").is_file()
    assert trial_state(trial) == "pruned" and P.run_state(trial) == "done"
    assert any("PRUNED at epoch 1" in ln for ln in lines)
    assert selected["scratch"]["trial"] == 0 and selected["scratch"]["trials_pruned"] == 1
    final = proto.out / "scratch" / "final" / "seed_0"
    fres = json.loads((final / "results.json").read_text())
    assert fres["status"] == "ok" and fres["epochs"] == 3 and not (final / "pruned.json").exists()
    assert not any("callbacks.prune" in o for o in fres["overrides"])        # finals are never pruned
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    study = optuna.load_study(study_name="scratch",
                              storage=JournalStorage(JournalFileBackend(str(proto.out / "scratch" / STUDY_FILE))))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert study.trials[2].intermediate_values == {0: pytest.approx(pruned["val_acc"])}
    md = (proto.out / "report" / "report.md").read_text()
    assert "3 (0, 1)" in md and "pruner: median" in md

    stamps = {p: p.stat().st_mtime_ns for p in proto.out.rglob("results.json")}
    again: list[str] = []
    P.run_protocol(proto, log=again.append)
    assert {p: p.stat().st_mtime_ns for p in proto.out.rglob("results.json")} == stamps    # nothing re-ran
    assert not any(" min] " in ln for ln in again) and P.missing(proto, selected) == []


@pytest.mark.slow
def test_the_study_on_disk_survives_a_killed_protocol_and_the_resume_completes_it(tmp_path, cifar_dir):
    """The protocol (and its runs: one process group) is SIGKILLed once trial 1 has finished: the
    journal holds the finished trials; the same command then finishes the rest, repeating none."""
    import os
    import signal
    import time

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    out = tmp_path / "proto"
    cmd = [sys.executable, "-m", "sskt_lightning.protocol", "--out", str(out), "--methods", "scratch", "--trials", "3",
           "--seeds", "0", "--jobs", "1", "--threads", "1", "--launch", "subprocess", "data=cifar10",
           f"paths.data_dir={cifar_dir}", "model=resnet20", "trainer=smoke", "data.batch_size=8",
           "data.num_workers=0", "data.val_size=16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    journal = out / "scratch" / "study.journal"

    def load():
        return optuna.load_study(study_name="scratch", storage=JournalStorage(JournalFileBackend(str(journal))))
    try:
        deadline = time.time() + 600
        while not (journal.is_file() and len(load().trials) >= 2) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    trials = load().trials
    assert len(trials) >= 2 and [t.state.name for t in trials[:2]] == ["COMPLETE", "COMPLETE"]
    for t in trials[:2]:
        res = json.loads((out / "scratch" / "search" / f"trial_{t.user_attrs['trial']:03d}" / "results.json").read_text())
        assert t.value == pytest.approx(res["last_val_acc"])
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("scratch/search/trial_00[01]/results.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps          # the finished trials were not repeated
    assert [t.state.name for t in load().trials] == ["COMPLETE"] * 3
