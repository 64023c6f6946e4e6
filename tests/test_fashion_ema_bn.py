"""experiments/fashion_transfer/ema_bn.py: a finished run's checkpoint evaluated four ways. Its
``ema`` and ``raw`` columns must be what the run itself tested (results.json: test_acc and
extra.test_raw_acc; with split val, ``ema`` is its last_val_acc), and a checkpoint without an average is refused with a message."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sskt_lightning.compose import compose_config

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "fashion_transfer" / "ema_bn.py"
SMALL = ["data=cifar10", "model=resnet20", "trainer=cpu", "trainer.max_epochs=1", "data.batch_size=8",
         "data.val_size=16", "data.num_workers=0", "method=scratch"]


def _script():
    spec = importlib.util.spec_from_file_location("_ema_bn", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_average_and_raw_columns_are_the_runs_own_test_numbers(tmp_path, cifar_dir):
    from sskt_lightning.train import run
    res = run(compose_config([*SMALL, f"paths.data_dir={cifar_dir}", "model.ema=0.7"], tmp_path / "run"))
    row = _script().run(tmp_path / "run", 24)
    assert row["ema"] == pytest.approx(100 * res["test_acc"], abs=1e-4)
    assert row["raw"] == pytest.approx(100 * res["extra"]["test_raw_acc"], abs=1e-4)
    assert 0 <= row["ema_raw_bn"] <= 100 and 0 <= row["ema_bn_recomputed"] <= 100
    assert row["conv_distance"] > 0          # the average is not the raw weights
    val = _script().run(tmp_path / "run", 24, "val")         # what the run validated: the average
    assert val["ema"] == pytest.approx(100 * res["last_val_acc"], abs=1e-4)
    with pytest.raises(SystemExit, match="choose test or val"):
        _script().run(tmp_path / "run", 24, "train")


@pytest.mark.slow
def test_a_run_without_an_average_is_refused(tmp_path, cifar_dir):
    from sskt_lightning.train import run
    run(compose_config([*SMALL, f"paths.data_dir={cifar_dir}"], tmp_path / "run"))
    with pytest.raises(SystemExit, match="trained without model.ema"):
        _script().run(tmp_path / "run", 24)
