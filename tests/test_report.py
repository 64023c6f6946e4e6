"""sskt_lightning.report: aggregation over seeds, markdown/CSV, plots and the CLI.

Everything is fabricated in tmp_path in the Hydra multirun layout
``multirun/<date>/<time>/<job_num>/results.json`` with a sparse Lightning-style metrics.csv.
Expected numbers are computed by hand here, not by the code under test.
"""
from __future__ import annotations

import csv
import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from sskt_lightning import report
from sskt_lightning.report import ReportError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SSKT_SOURCES = ["imagenet_resnet50", "places365_resnet50"]
SSKT_GROUP = ("data=cifar10 method=sskt model=cifar_resnet20 "
              "sources=imagenet_resnet50+places365_resnet50 epochs=3")
SCRATCH_GROUP = "data=cifar10 method=scratch model=cifar_resnet20 epochs=3"


def write_metrics_csv(path: Path, val_accs: list[float], duplicate_last: float | None = None):
    """A sparse CSVLogger file: per epoch a train row (val empty) then a val row (train empty).

    ``duplicate_last``: an extra, later val row for the last epoch that must win.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    step = 0
    lines = ["epoch,step,train/loss,val/acc,val/loss"]
    for e, acc in enumerate(val_accs):
        step += 10
        lines.append(f"{e},{step},{2.0 - 0.1 * e:.3f},,")
        lines.append(f"{e},{step},,{acc},{1.0 - 0.1 * e:.3f}")
    if duplicate_last is not None:
        lines.append(f"{len(val_accs) - 1},{step},,{duplicate_last},0.5")
    path.write_text("\n".join(lines) + "\n")


def write_run(root: Path, job: int, curve: list[float] | None = None, **fields) -> Path:
    run_dir = root / "multirun" / "2024-05-01" / "12-00-00" / str(job)
    run_dir.mkdir(parents=True)
    data = {"model": "cifar_resnet20", "data": "cifar10", "epochs": 3, "test_metric": "acc"}
    data.update(fields)
    if curve is not None:
        data["metrics_csv"] = "csv/version_0/metrics.csv"
        write_metrics_csv(run_dir / data["metrics_csv"], curve)
    (run_dir / "results.json").write_text(json.dumps(data))
    # Hydra leaves other files beside it; they must be ignored
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    return run_dir


# the sskt curves have different lengths: seed 2 stopped one epoch early
SSKT_CURVES = {0: [0.50, 0.70, 0.80], 1: [0.60, 0.80, 0.90], 2: [0.70, 0.90]}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    job = 0
    # group 1: sskt, 3 seeds; written first so the row order must come from sorting
    for seed, (t, v, w, ips) in enumerate([(0.90, 0.91, 100.0, 1000.0), (0.92, 0.93, 200.0, 1100.0),
                                           (0.94, 0.95, 300.0, 1200.0)]):
        write_run(tmp_path, job, SSKT_CURVES[seed], method="sskt", sources=SSKT_SOURCES, seed=seed,
                  group=SSKT_GROUP, test_acc=t, best_val_acc=v, best_val_epoch=2,
                  last_val_acc=v, wall_time_s=w, train_images_per_s=ips)
        job += 1
    # group 2: scratch, 3 seeds, no sources
    for seed, (t, v) in enumerate([(0.80, 0.82), (0.81, 0.83), (0.85, 0.86)]):
        write_run(tmp_path, job, [0.4, 0.5, 0.6 + 0.01 * seed], method="scratch", sources=[],
                  seed=seed, group=SCRATCH_GROUP, test_acc=t, best_val_acc=v, wall_time_s=50.0,
                  train_images_per_s=3000.0)
        job += 1
    # group 3: kd, a single seed, no `group` key (grouped by data/model/method/sources),
    # no metrics.csv, no timings
    write_run(tmp_path, job, None, method="kd", sources=["imagenet_resnet50"], seed=0,
              test_acc=0.88, best_val_acc=0.89)
    job += 1
    # group 4: another dataset, must sort after every cifar10 row; carries an extra
    write_run(tmp_path, job, [0.3, 0.4], data="cifar100", method="dml", sources=[], seed=0,
              group="data=cifar100 method=dml model=cifar_resnet20", test_acc=0.70,
              best_val_acc=0.72, extra={"peer1_test_acc": 0.69})
    return tmp_path / "multirun" / "2024-05-01" / "12-00-00"


def row_of(rows, method):
    (row,) = [r for r in rows if r["method"] == method]
    return row


# ----------------------------------------------------------------------------- loading / stats


def test_load_results_finds_every_run(tree):
    results = report.load_results([tree])
    assert len(results) == 3 + 3 + 1 + 1
    assert all(Path(r["_path"]).name == "results.json" for r in results)
    assert all(Path(r["_dir"]) == Path(r["_path"]).parent for r in results)
    # overlapping directories do not read a run twice
    assert len(report.load_results([tree, tree / "0", tree.parent])) == 8


def test_summarise_means_and_sample_stds(tree):
    rows = report.summarise(report.load_results([tree]))
    sskt = row_of(rows, "sskt")
    assert sskt["n"] == 3 and sskt["seeds"] == [0, 1, 2]
    assert sskt["sources"] == "imagenet_resnet50+places365_resnet50"
    # test 0.90, 0.92, 0.94 -> 92.00 ± 2.00 (sample std, ddof=1)
    assert sskt["test_mean"] == pytest.approx(92.0)
    assert sskt["test_std"] == pytest.approx(2.0)
    assert sskt["best_val_mean"] == pytest.approx(93.0)
    assert sskt["best_val_std"] == pytest.approx(2.0)
    assert sskt["wall_time_s_mean"] == pytest.approx(200.0)
    assert sskt["train_images_per_s_mean"] == pytest.approx(1100.0)

    scratch = row_of(rows, "scratch")
    # 80, 81, 85 -> mean 82, deviations -2, -1, 3 -> sum of squares 14, / (n-1) = 7
    assert scratch["test_mean"] == pytest.approx(82.0)
    assert scratch["test_std"] == pytest.approx(math.sqrt(7.0))
    assert scratch["test_std"] != pytest.approx(math.sqrt(14.0 / 3))  # not the population std
    mv = (82 + 83 + 86) / 3
    assert scratch["best_val_mean"] == pytest.approx(mv)
    assert scratch["best_val_std"] == pytest.approx(
        math.sqrt(((82 - mv) ** 2 + (83 - mv) ** 2 + (86 - mv) ** 2) / 2))


def test_single_seed_group_has_undefined_std(tree):
    rows = report.summarise(report.load_results([tree]))
    kd = row_of(rows, "kd")
    assert kd["n"] == 1
    assert kd["test_mean"] == pytest.approx(88.0)
    assert math.isnan(kd["test_std"])
    assert math.isnan(kd["wall_time_s_mean"])  # missing optional keys are tolerated
    assert kd["group"] == "data=cifar10 model=cifar_resnet20 method=kd sources=imagenet_resnet50"


def test_rows_sorted_by_data_model_then_method_order(tree):
    rows = report.summarise(report.load_results([tree]))
    assert [(r["data"], r["method"]) for r in rows] == [
        ("cifar10", "scratch"), ("cifar10", "kd"), ("cifar10", "sskt"), ("cifar100", "dml")]


def test_method_order_puts_unknown_methods_last_alphabetically():
    base = {"data": "d", "model": "m", "test_acc": 0.5}
    methods = ["zeta", "sskt", "alpha", "maxl", "dml", "kd", "scratch"]
    rows = report.summarise([dict(base, method=m, seed=0) for m in methods])
    assert [r["method"] for r in rows] == ["scratch", "kd", "dml", "maxl", "sskt", "alpha", "zeta"]


def test_runs_without_group_key_aggregate_by_identity():
    runs = [{"data": "d", "model": "m", "method": "kd", "sources": ["a", "b"], "seed": s,
             "test_acc": a} for s, a in [(0, 0.5), (1, 0.7)]]
    runs.append({"data": "d", "model": "m", "method": "kd", "sources": ["a"], "seed": 0,
                 "test_acc": 0.1})
    rows = report.summarise(runs)
    assert [(r["sources"], r["n"]) for r in rows] == [("a", 1), ("a+b", 2)]
    assert rows[1]["test_mean"] == pytest.approx(60.0)


def test_mixed_test_metric_in_a_group_is_an_error(tmp_path, capsys):
    write_run(tmp_path, 0, None, method="sskt", seed=0, group="g", test_metric="acc", test_acc=0.9)
    write_run(tmp_path, 1, None, method="sskt", seed=1, group="g", test_metric="map", test_acc=0.8)
    with pytest.raises(ReportError, match="mix test_metric"):
        report.summarise(report.load_results([tmp_path]))
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'g'" in err and "acc" in err and "map" in err
    assert "Traceback" not in err


def test_different_test_metrics_across_groups_are_fine(tmp_path):
    write_run(tmp_path, 0, None, method="sskt", seed=0, group="a", test_metric="acc", test_acc=0.9)
    write_run(tmp_path, 1, None, data="voc", method="sskt", seed=0, group="b", test_metric="map",
              test_map=0.6)
    rows = report.summarise(report.load_results([tmp_path]))
    assert [(r["test_metric"], round(r["test_mean"], 6)) for r in rows] == [("acc", 90.0),
                                                                            ("map", 60.0)]
    md = report.to_markdown(rows)
    assert "| mAP |" in md  # a per-row metric column appears when groups differ


# ----------------------------------------------------------------------------- markdown / CSV


def test_markdown_table(tree):
    md = report.to_markdown(report.summarise(report.load_results([tree])))
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| data"))
    assert header.split("|")[1:7] == [" data ", " model ", " method ", " sources ", " n ", " seeds "]
    assert "best val (selected on validation)" in header
    assert "test acc (%), last epoch" in header
    assert "the last epoch's" in md.lower()
    assert "ddof=1" in md
    main_table = md.split("## Extra")[0].splitlines()
    table = [line for line in main_table if line.startswith("| cifar")]
    assert [line.split("|")[3].strip() for line in table] == ["scratch", "kd", "sskt", "dml"]
    sskt = table[2]
    assert "| 92.00 ± 2.00 |" in sskt and "| 93.00 ± 2.00 |" in sskt
    assert "| 0,1,2 |" in sskt and "| 200 |" in sskt and "| 1100 |" in sskt
    assert "imagenet_resnet50+places365_resnet50" in sskt
    assert "| 88.00 ± – |" in table[1]  # single seed: std shown as a dash
    assert "peer1_test_acc" in md and "69.00" in md  # extras are reported


def test_csv_parses_back(tree):
    text = report.to_csv(report.summarise(report.load_results([tree])))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["method"] for r in rows] == ["scratch", "kd", "sskt", "dml"]
    sskt = rows[2]
    assert float(sskt["test_mean"]) == pytest.approx(92.0)
    assert float(sskt["test_std"]) == pytest.approx(2.0)
    assert float(sskt["best_val_mean"]) == pytest.approx(93.0)
    assert float(sskt["wall_time_s_mean"]) == pytest.approx(200.0)
    assert float(sskt["train_images_per_s_mean"]) == pytest.approx(1100.0)
    assert sskt["n"] == "3" and sskt["seeds"] == "0,1,2" and sskt["unit"] == "%"
    assert sskt["sources"] == "imagenet_resnet50+places365_resnet50"
    assert float(rows[0]["test_std"]) == pytest.approx(math.sqrt(7.0))
    kd = rows[1]
    assert float(kd["test_mean"]) == pytest.approx(88.0) and kd["test_std"] == ""
    assert float(rows[3]["extra:peer1_test_acc_mean"]) == pytest.approx(69.0)


# ----------------------------------------------------------------------------- curves


def test_val_curve_from_sparse_csv(tmp_path):
    p = tmp_path / "metrics.csv"
    p.write_text(
        "epoch,step,train/loss,val/acc,val/loss\n"
        "0,9,2.0,,\n"        # train row: no val
        "0,9,,0.5,1.0\n"
        "1,19,1.5,,\n"
        "1,19,,nan,0.9\n"    # NaN val dropped
        "1,19,,0.6,0.8\n"
        "1,19,,0.65,0.8\n"   # a later row for the same epoch wins
        ",29,1.2,,\n"        # no epoch at all
        "2,29,1.1,,\n"       # epoch with training only: no point
        "3,39,,0.8,0.7\n"
    )
    ep, val = report.val_curve_from_csv(p)
    assert ep.tolist() == [0, 1, 3]
    assert val.tolist() == pytest.approx([0.5, 0.65, 0.8])
    ep, val = report.val_curve_from_csv(p, "val/missing")
    assert ep.size == 0 and val.size == 0


def test_read_val_curve_uses_metrics_csv_path(tree):
    results = {(r["method"], r.get("seed")): r for r in report.load_results([tree])}
    ep, val = report.read_val_curve(results[("sskt", 2)])
    assert ep.tolist() == [0, 1] and val.tolist() == pytest.approx([0.70, 0.90])
    ep, val = report.read_val_curve(results[("kd", 0)])  # no metrics.csv: empty, no error
    assert ep.size == 0


def test_mean_curve_handles_different_lengths():
    curves = [(np.array(range(len(c))), np.array(c)) for c in SSKT_CURVES.values()]
    ep, mean, std, count = report.mean_curve(curves)
    assert ep.tolist() == [0, 1, 2]
    assert count.tolist() == [3, 3, 2]
    assert mean.tolist() == pytest.approx([0.60, 0.80, 0.85])
    assert std[:2].tolist() == pytest.approx([0.10, 0.10])  # sample std of (x-.1, x, x+.1)
    assert std[2] == pytest.approx(math.sqrt(2) * 0.05)  # two values 0.80, 0.90


# ----------------------------------------------------------------------------- plots and CLI


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_are_valid_pngs(tree, tmp_path):
    results = report.load_results([tree])
    rows = report.summarise(results)
    a = report.plot_test_acc(rows, tmp_path / "t.png")
    b = report.plot_val_curves(results, tmp_path / "v.png")
    for p in (a, b):
        w, h = png_size(p)
        assert w > 300 and h > 200
        assert p.stat().st_size > 5000


def test_plot_val_curves_without_any_curve(tmp_path):
    runs = [{"data": "d", "model": "m", "method": "kd", "seed": 0, "test_acc": 0.5,
             "_dir": str(tmp_path)}]
    w, h = png_size(report.plot_val_curves(runs, tmp_path / "v.png"))
    assert w > 100 and h > 100


def test_main_writes_everything(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(tree), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| 92.00 ± 2.00 |" in stdout and "best val (selected on validation)" in stdout
    for name in ("report.md", "report.csv", "test_acc.png", "val_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report.md").read_text() == stdout
    png_size(out / "test_acc.png")
    png_size(out / "val_curves.png")


def test_main_defaults_out_to_first_dir(tree, capsys):
    assert report.main([str(tree), "--no-plots"]) == 0
    assert (tree / "report.md").is_file() and (tree / "report.csv").is_file()
    assert not (tree / "test_acc.png").exists()


def test_main_empty_dir_exits_2_with_message(tmp_path, capsys):
    empty, other = tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    other.mkdir()
    assert report.main([str(empty), str(other)]) == 2
    captured = capsys.readouterr()
    assert "no results.json found" in captured.err
    assert str(empty) in captured.err and str(other) in captured.err
    assert "Traceback" not in captured.err
    assert not (empty / "report.md").exists()


def test_main_missing_dir_exits_2(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_module_runs(tree, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sskt_lightning.report", str(tree), "--out",
                           str(tmp_path / "o"), "--no-plots"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "92.00 ± 2.00" in proc.stdout


def test_method_colours_do_not_depend_on_which_methods_are_present():
    a = report._method_colors(["scratch", "sskt"])
    b = report._method_colors(["kd", "dml", "sskt", "zeta"])
    assert a["sskt"] == b["sskt"]
    assert len(set(b.values())) == 4
