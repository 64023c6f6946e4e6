"""Hydra's Optuna sweeper (``hparams_search=<space>``, ``hydra/sweeper=optuna``): hydra-optuna-sweeper
1.2/1.3 caps optuna below 3, so it lives in an extra of its own (``optuna-sweeper``) installed in a
second environment, ``.venv-sweeper`` (``make test`` creates it from pyproject.toml and runs the tests
marked ``optuna_sweeper`` there, the rest in ``.venv`` with the protocol's optuna 4)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sskt_lightning.train import CONFIG_DIR

pytestmark = pytest.mark.optuna_sweeper



def _in_the_sweepers_environment() -> bool:
    """hydra-optuna-sweeper with the optuna it supports (< 3); an environment that also got the protocol's
    optuna 4 (e.g. an older .venv upgraded in place) is not one."""
    try:
        import optuna
        import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
    except ImportError:
        return False
    return int(optuna.__version__.split(".")[0]) < 3


if os.environ.get("SSKT_REQUIRE_OPTUNA_SWEEPER") != "1" and not _in_the_sweepers_environment():
    # make test sets the variable in .venv-sweeper: never a skip there
    pytest.skip("needs the optuna-sweeper extra's environment (make test builds .venv-sweeper)", allow_module_level=True)


def test_the_sweeper_environment_has_the_sweeper_and_its_optuna():
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    assert optuna.__version__.startswith("2.10"), optuna.__version__
    dists, fixed = create_params_from_overrides(["optim.optimizer.lr=tag(log, interval(0.01, 0.4))", "seed=3"])
    assert type(dists["optim.optimizer.lr"]).__name__ == "LogUniformDistribution" and fixed == {"seed": "3"}


@pytest.mark.slow
def test_hydra_optuna_sweeper_runs_a_search_config(tmp_path, cifar_dir):
    """`hparams_search=<method>` with hydra-optuna-sweeper 1.3 / optuna 2.10 (in-memory study):
    the trials run and the best parameters are written; the value optimised is train.main's return
    value, the validation metric named by cfg.optimized_metric."""
    import yaml

    from sskt_lightning.compose import compose_config

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sskt_lightning.train", "hparams_search=scratch", "method=scratch",
           "hydra.sweeper.n_trials=2", "data=cifar10", f"paths.data_dir={cifar_dir}", "model=resnet20", "trainer=smoke",
           "data.batch_size=8", "data.num_workers=0", "data.val_size=20", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optim.optimizer.lr", "optim.optimizer.weight_decay"}
    runs = [json.loads((sweep / str(k) / "results.json").read_text()) for k in range(2)]
    # train.main returns the metric cfg.optimized_metric names (a validation number, never test), and the
    # sweeper (direction: maximize) reports the best trial's
    cfg = compose_config(["hparams_search=scratch", "method=scratch"], tmp_path / "c")
    search = yaml.safe_load((Path(CONFIG_DIR) / "hparams_search" / "scratch.yaml").read_text())
    assert cfg.optimized_metric == "best_val_acc" and search["hydra"]["sweeper"]["direction"] == "maximize"
    # data.val_size=20 makes the validation number (2/20) differ from the test number (2/16), so a
    # sweeper fed test_acc would fail here
    assert all(r["best_val_acc"] != r["test_acc"] for r in runs), runs
    assert best["best_value"] == max(r[cfg.optimized_metric] for r in runs), (best, runs)
