"""experiments/fashion_transfer/readme_table.py: the README's table of a benchmark cell, from a cell
written here in the benchmark's layout, against hand-computed values."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "fashion_transfer" / "readme_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("_readme_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def cell(tmp_path):
    cell = tmp_path / "runs" / "labels5_ema0.999"
    nan = float("nan")
    rows = [
        dict(name="scratch", test_mean=70.0, test_std=10.0, gain_mean=nan, gain_ci_low=nan, gain_ci_high=nan,
             wins=nan, n_paired=0, same_unl_best="fixmatch", same_unl_gain_mean=-5.0, same_unl_gain_ci_low=-9.0,
             same_unl_gain_ci_high=-1.0, same_unl_wins=0, same_unl_n_paired=2, reference=False,
             params="optim.optimizer.lr=0.1"),
        dict(name="fixmatch", test_mean=75.0, test_std=2.5, gain_mean=5.0, gain_ci_low=1.0, gain_ci_high=9.0,
             wins=2, n_paired=2, same_unl_best="sskt_unlabeled", same_unl_gain_mean=-1.5, same_unl_gain_ci_low=-4.0,
             same_unl_gain_ci_high=1.0, same_unl_wins=1, same_unl_n_paired=2, reference=False,
             params="optim.optimizer.lr=0.03 method.tau=0.95 data.unlabeled_ratio=7"),
        dict(name="kd", test_mean=69.0, test_std=1.0, gain_mean=-1.0, gain_ci_low=-3.0, gain_ci_high=1.0, wins=1,
             n_paired=2, same_unl_best="fixmatch", same_unl_gain_mean=-6.0, same_unl_gain_ci_low=-7.0,
             same_unl_gain_ci_high=-5.0, same_unl_wins=0, same_unl_n_paired=2, reference=False,
             params="method.alpha=0.9"),
        dict(name="finetuned_source", test_mean=90.0, test_std=1.0, gain_mean=20.0, gain_ci_low=15.0,
             gain_ci_high=25.0, wins=2, n_paired=2, same_unl_best="fixmatch", same_unl_gain_mean=15.0,
             same_unl_gain_ci_low=10.0, same_unl_gain_ci_high=20.0, same_unl_wins=2, same_unl_n_paired=2,
             reference=True, params=nan),
    ]
    report = cell / "protocol" / "report" / "report.csv"
    report.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(report, index=False)
    # fixmatch: a search trial of 60 s and two finals of 120 s and 180 s -> 6.0 min;
    # EMA - raw: (0.80 - 0.78) and (0.70 - 0.71) -> +2 and -1 points -> +0.50
    _write(cell / "protocol/fixmatch/search/trial_000/protocol.json", {"elapsed_s": 60})
    for seed, (acc, raw, s) in enumerate([(0.80, 0.78, 120), (0.70, 0.71, 180)]):
        _write(cell / f"protocol/fixmatch/final/seed_{seed}/protocol.json", {"elapsed_s": s})
        _write(cell / f"protocol/fixmatch/final/seed_{seed}/results.json",
               {"test_acc": acc, "extra": {"test_raw_acc": raw, "test_loss": 1.0}})
    # kd: 30 s of its own and two born-again teachers of 45 s each -> 2.0 min; no EMA recorded
    _write(cell / "protocol/kd/final/seed_0/protocol.json", {"elapsed_s": 30})
    _write(cell / "protocol/kd/final/seed_0/results.json", {"test_acc": 0.69, "extra": {"test_loss": 1.0}})
    for seed in (0, 1):
        _write(cell / f"teachers/seed_{seed}/results.json", {"wall_time_s": 45})
    _write(cell / "protocol/scratch/search/trial_000/protocol.json", {"elapsed_s": 90})
    # a policy that was searched and lost: no row, but its compute counts
    _write(cell / "protocol/softmatch/search/trial_000/protocol.json", {"elapsed_s": 240})
    _write(cell.parent / "source" / "results.json", {"wall_time_s": 120})
    return cell


def test_the_table_from_a_cell_on_disk(cell):
    lines = _script().table(cell).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert rows["scratch"] == ("| scratch | 70.00 ± 10.00 | baseline | vs fixmatch: **-5.00 [-9.00, -1.00], 0/2** "
                               "| – | lr=0.1 | 1.5 |")
    assert rows["FixMatch"] == ("| FixMatch | 75.00 ± 2.50 | **+5.00 [+1.00, +9.00], 2/2** | vs sskt_unlabeled: "
                                "-1.50 [-4.00, +1.00], 1/2 | +0.50 | lr=0.03 tau=0.95 unlabeled_ratio=7 | 6.0 |")
    assert rows["KD (born-again teacher)"].endswith("| -1.00 [-3.00, +1.00], 1/2 | vs fixmatch: **-6.00 [-7.00, "
                                                    "-5.00], 0/2** | – | alpha=0.9 | 2.0 |")
    assert "| – (reference) |" in rows["fine-tuned source (reference)"]
    # 1.5 + 6.0 + 2.0 + 0 (finetuned_source) + 4.0 (softmatch's search, no finals)
    assert lines[-1] == ("Compute: 13.5 min summed over the runs of this cell (of which 4.0 min for the searches of "
                         "softmatch, which had no finals); the stage-1 source, shared by every cell: 2.0 min.")


def test_an_unfinished_cell_is_an_error_that_names_its_report(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _script().main([str(tmp_path / "labels1")])
    assert "labels1/protocol/report/report.csv does not exist" in str(info.value)
    assert "--plan" in str(info.value)


def test_the_summary_across_cells(cell, tmp_path, capsys):
    # a second cell with scratch, kd and softmatch: fixmatch and the reference have "–" there
    other = tmp_path / "runs" / "labels1_ema0.999"
    nan = float("nan")
    report = other / "protocol" / "report" / "report.csv"
    report.parent.mkdir(parents=True)
    pd.DataFrame([dict(name="scratch", test_mean=40.0, test_std=nan, gain_mean=nan, gain_ci_low=nan,
                       gain_ci_high=nan, wins=nan, n_paired=0),
                  dict(name="kd", test_mean=30.5, test_std=4.0, gain_mean=-9.5, gain_ci_low=-12.0,
                       gain_ci_high=-7.0, wins=0, n_paired=2),
                  dict(name="softmatch", test_mean=41.0, test_std=1.0, gain_mean=1.0, gain_ci_low=-1.0,
                       gain_ci_high=3.0, wins=1, n_paired=2)]).to_csv(report, index=False)
    _script().main(["--summary", f"5 labels={cell}", str(other)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| method | 5 labels: test acc (%) | gain over scratch [95 % CI], wins | "
                        "labels1_ema0.999: test acc (%) | gain over scratch [95 % CI], wins |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    # softmatch, only in the second cell, follows the row it follows there (kd)
    assert list(rows) == ["scratch", "FixMatch", "KD (born-again teacher)", "SoftMatch", "fine-tuned source (reference)"]
    assert rows["SoftMatch"] == "| SoftMatch | – | – | 41.00 ± 1.00 | +1.00 [-1.00, +3.00], 1/2 |"
    assert rows["scratch"] == "| scratch | 70.00 ± 10.00 | baseline | 40.00 | baseline |"
    assert rows["KD (born-again teacher)"] == ("| KD (born-again teacher) | 69.00 ± 1.00 | -1.00 [-3.00, +1.00], 1/2 "
                                               "| 30.50 ± 4.00 | **-9.50 [-12.00, -7.00], 0/2** |")
    assert rows["FixMatch"].endswith("| **+5.00 [+1.00, +9.00], 2/2** | – | – |")


def test_the_summary_names_an_unfinished_cell(cell, tmp_path):
    with pytest.raises(SystemExit) as info:
        _script().main(["--summary", str(cell), f"1 label={tmp_path / 'labels1'}"])
    assert "labels1/protocol/report/report.csv does not exist" in str(info.value)


def test_ranking_by_the_raw_weights_names_the_methods_that_move(tmp_path):
    """Three methods, two seeds each: ranked by the average A (80) > B (75) > C (70); by the raw
    weights (hand means) B 81 > A 78.5 > C 71, so A and B swap and C stays; the line says so. Equal
    orders say so too, and a method without raw accuracies (no model.ema) leaves the line out."""
    cell = tmp_path / "runs" / "labels5_ema0.999"
    raws = {"sskt": (0.78, 0.79), "fixmatch": (0.80, 0.82), "scratch": (0.70, 0.72)}
    for method, pair in raws.items():
        for seed, raw in enumerate(pair):
            _write(cell / f"protocol/{method}/final/seed_{seed}/results.json",
                   {"test_acc": 0.5, "extra": {"test_raw_acc": raw}})
    rows = pd.DataFrame([dict(name="sskt", test_mean=80.0), dict(name="fixmatch", test_mean=75.0),
                         dict(name="scratch", test_mean=70.0)])
    script = _script()
    assert script.raw_mean(cell, "sskt") == pytest.approx(78.5)
    assert script.ranking_with_raw_weights(cell, rows) == (
        "Ranked by the raw weights' test accuracy instead of the average's: FixMatch 1st (81.00; 2nd with the "
        "average); SSKT 2nd (78.50; 1st with the average).")
    same = rows.assign(test_mean=[75.0, 80.0, 70.0])
    assert script.ranking_with_raw_weights(cell, same) == (
        "Ranked by the raw weights' test accuracy instead of the average's, the methods keep their order.")
    _write(cell / "protocol/scratch/final/seed_1/results.json", {"test_acc": 0.5, "extra": {}})
    assert script.raw_mean(cell, "scratch") is None
    assert script.ranking_with_raw_weights(cell, rows) == ""
    assert [script._ordinal(k) for k in (1, 2, 3, 4, 11, 12, 13, 21, 22)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd"]
