"""experiments/source_ranking/benchmark.py: the analysis (gains, rank correlations, regret) against
hand-computed values, and the digits it trains a source on."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy", reason="the benchmark's statistics need scipy (the 'bench' extra)")
FOLDER = Path(__file__).resolve().parents[1] / "experiments" / "source_ranking"


def _bench():
    sys.path.insert(0, str(FOLDER))
    try:
        spec = importlib.util.spec_from_file_location("_ranking_bench", FOLDER / "benchmark.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(FOLDER))


def _table(gains: dict, scores: dict, seeds=(0, 1, 2)) -> tuple[dict, dict]:
    """Candidates whose SSKT accuracy is scratch + gain + a per-seed wiggle (so the t interval is
    finite), and whose three scores are ``scores[c]`` on every seed."""
    scratch = {s: 0.5 + 0.01 * s for s in seeds}
    wiggle = {0: -0.002, 1: 0.0, 2: 0.002}
    table = {c: {"acc": {s: scratch[s] + g + wiggle[s] for s in seeds},
                 "scores": {s: {"leep": scores[c], "nce": -scores[c], "logme": 0.0 * scores[c] + 1.0} for s in seeds}}
             for c, g in gains.items()}
    return table, scratch


def test_a_score_that_orders_the_gains_has_tau_and_rho_one_and_no_regret_its_reverse_minus_one():
    B = _bench()
    gains = {"a": 0.10, "b": 0.05, "c": 0.00, "d": -0.03}
    table, scratch = _table(gains, {"a": -1.0, "b": -1.2, "c": -1.3, "d": -2.0})
    out = B.analyse(table, scratch, [0, 1, 2], resamples=300)
    leep, nce = out["correlation"]["leep"], out["correlation"]["nce"]
    assert leep["kendall_tau"] == pytest.approx(1.0) and leep["spearman_rho"] == pytest.approx(1.0)
    assert leep["top_ranked"] == "a" == out["best_candidate"] and leep["regret"] == pytest.approx(0.0)
    assert nce["kendall_tau"] == pytest.approx(-1.0) and nce["spearman_rho"] == pytest.approx(-1.0)
    assert nce["top_ranked"] == "d" and nce["regret"] == pytest.approx(0.10 - (-0.03))
    for c in (leep, nce):
        assert c["tau_ci"][0] <= c["kendall_tau"] <= c["tau_ci"][1]
        assert c["regret_ci"][0] <= c["regret"] + 1e-12 and c["regret_ci"][1] >= c["regret"] - 1e-12
    # a constant score cannot rank: no resample has a defined correlation
    assert out["correlation"]["logme"]["valid_resamples"] == 0
    rows = {r["candidate"]: r for r in out["candidates"]}
    # the paired gain: mean of (SSKT - scratch) per seed; its 95 % t interval from the wiggle's spread
    assert rows["b"]["gain"] == pytest.approx(0.05) and rows["b"]["wins"] == 3 and rows["d"]["wins"] == 0
    half = 4.302652729911275 * 0.002 / np.sqrt(3)      # t(0.975, 2) * sd / sqrt(n); sd of (-.002, 0, .002) = .002
    assert rows["b"]["gain_high"] - rows["b"]["gain"] == pytest.approx(half, rel=1e-9)


def test_one_swap_gives_the_hand_computed_tau_and_rho():
    B = _bench()
    gains = {"a": 0.04, "b": 0.03, "c": 0.02, "d": 0.01}
    table, scratch = _table(gains, {"a": 3.0, "b": 4.0, "c": 2.0, "d": 1.0})    # a and b swapped
    c = B.analyse(table, scratch, [0, 1, 2], resamples=50)["correlation"]["leep"]
    # 6 pairs, 1 discordant: tau = (5 - 1) / 6; rho = 1 - 6 * (1 + 1) / (4 * 15)
    assert c["kendall_tau"] == pytest.approx(4 / 6) and c["spearman_rho"] == pytest.approx(0.8)
    assert c["top_ranked"] == "b" and c["regret"] == pytest.approx(0.01)


def test_the_digits_become_an_image_folder_the_data_module_reads(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn's digits (the 'bench' extra)")
    B = _bench()
    folder = B.write_digits(tmp_path)
    train = sorted(p.name for p in (folder / "train").iterdir())
    assert train == [str(d) for d in range(10)]
    n_train = sum(1 for _ in (folder / "train").rglob("*.png"))
    n_test = sum(1 for _ in (folder / "test").rglob("*.png"))
    assert (n_train, n_test) == (1437, 360)
    from PIL import Image
    img = Image.open(next((folder / "test").rglob("*.png")))
    assert img.size == (28, 28) and img.mode == "L"
    assert B.write_digits(tmp_path) == folder            # written once
