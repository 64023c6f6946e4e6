"""What a user gets, under test: every method of ``conf/method/`` run as the README's first commands
give it — default trainer, default callbacks (the progress bar with img/s and run ETA, the best
checkpoint), the CSV logger — once in one process and once as two DDP processes (``trainer=ddp_cpu``,
gloo). Kept small by data size and limits (tiny CIFAR-10 files, a few batches), never by switching
a default off: the first DDP run with the default progress bar used to abort (a collective that rank 0
issued alone), and a test with the bar switched off could not see it.

The method list is read from ``conf/method/*.yaml``; what a method needs comes from its config:
methods that need sources (SSKT, KD) get one random local source with the data's classes (no
network), a method with an ``unlabeled`` option also runs with the unlabeled stream on, and a method
that cannot train without it (``requires_unlabeled``: FixMatch) always has it."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sskt_lightning.compose import config_dir

TESTS = Path(__file__).parent
TRACER = TESTS / "collective_trace"       # sitecustomize: every torch.distributed collective, per rank
LOCAL_SOURCE = ["source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.pretrained=false",
                "source.timm.num_classes=10"]   # a KD teacher must have the target's classes
SIZE = ["data.batch_size=8", "data.val_size=16", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2"]


def _capability(target: str, name: str) -> bool:
    import importlib
    module, _, cls = target.rpartition(".")
    return bool(getattr(getattr(importlib.import_module(module), cls), name, False))


def _needs_sources(target: str) -> bool:
    return _capability(target, "needs_sources")


def _recipes() -> dict[str, list[str]]:
    """One command line per method config (and per method with an unlabeled stream, one more)."""
    recipes = {}
    for path in sorted((config_dir() / "method").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        overrides = [f"method={path.stem}", *(LOCAL_SOURCE if _needs_sources(cfg["_target_"]) else [])]
        if _capability(cfg["_target_"], "requires_unlabeled"):
            overrides += ["data.unlabeled=true", "data.labels_per_class=4"]
        recipes[path.stem] = overrides
        if "unlabeled" in cfg:
            recipes[f"{path.stem}_unlabeled"] = [*overrides, "method.unlabeled=true", "data.unlabeled=true",
                                                 "data.labels_per_class=4"]
    return recipes


RECIPES = _recipes()


def test_every_method_config_has_a_recipe():
    """The list is the config directory's: the paper's methods are all there, SSKT twice."""
    assert {"scratch", "sskt", "sskt_unlabeled", "kd", "dml", "maxl"} <= set(RECIPES)


def train(out: Path, data_dir: Path, overrides: list[str], trace: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "sskt_lightning.train", "data=cifar10", f"paths.data_dir={data_dir}",
           f"hydra.run.dir={out}", *SIZE, *overrides]
    env = dict(os.environ)
    if trace is not None:
        trace.mkdir(parents=True)
        env["SSKT_TRACE_COLLECTIVES"] = str(trace)
        env["PYTHONPATH"] = os.pathsep.join([str(TRACER), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok"
    assert results["num_test"] == 24 and 0 <= results["test_acc"] <= 1
    assert (out / "checkpoints" / "last.ckpt").is_file()
    with open(out / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("val/acc") for r in rows) and any(r.get("train/loss_epoch") for r in rows)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_default_run_in_one_process_and_under_ddp(tmp_path, cifar_dir, name):
    single = train(tmp_path / "single", cifar_dir, RECIPES[name])
    digest = "+callbacks.digest._target_=sskt_lightning.callbacks.WeightsDigest"   # one more callback, none off
    ddp = train(tmp_path / "ddp", cifar_dir, ["trainer=ddp_cpu", digest, *RECIPES[name]], trace=tmp_path / "trace")
    assert set(ddp) == set(single)
    assert ddp["num_train"] == single["num_train"]
    digests = [json.loads((tmp_path / "ddp" / f"weights_digest_rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["world_size"] for d in digests] == [2, 2]
    assert digests[0]["parameters"] == digests[1]["parameters"], "ranks' target weights diverged"
    assert digests[0]["buffers"] == digests[1]["buffers"], "ranks' BatchNorm statistics diverged"
    # every collective on every rank, in the same order: one issued on a subset of ranks aborts gloo
    # (as the progress bar's did) and hangs NCCL
    ranks = [(tmp_path / "trace" / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert ranks[0], "the tracer saw no collective: is tests/collective_trace on PYTHONPATH?"
    first = next((i for i, (a, b) in enumerate(zip(*ranks)) if a != b), min(map(len, ranks)))
    assert ranks[0] == ranks[1], (f"rank 0 and rank 1 diverge at collective {first}: "
                                  f"{ranks[0][first:first + 2]} vs {ranks[1][first:first + 2]}")
