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
              "sources=imagenet_resnet50+places365_resnet50")
SCRATCH_GROUP = "data=cifar10 method=scratch model=cifar_resnet20"


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


def row_of(summary, method):
    (i,) = [i for i, m in enumerate(summary["method"]) if m == method]
    return summary.iloc[i]


# ----------------------------------------------------------------------------- loading / stats


def test_load_results_finds_every_run(tree):
    results = report.load_results([tree])
    assert len(results) == 3 + 3 + 1 + 1
    assert all(Path(r["_path"]).name == "results.json" for r in results)
    assert all(Path(r["_dir"]) == Path(r["_path"]).parent for r in results)
    # overlapping directories do not read a run twice
    assert len(report.load_results([tree, tree / "0", tree.parent])) == 8


@pytest.mark.parametrize("content", [b'{"test_acc": 0.5, "method": "\xff\xfe"}', b"[1, 2]", b"[" * 100_000])
def test_an_unreadable_results_json_is_skipped_with_a_warning(tree, capsys, content):
    bad = tree / "0" / "results.json"
    bad.write_bytes(content)
    (tree / "0" / "failed.txt").write_text("RuntimeError: boom\n")
    assert len(report.load_results([tree])) == 7
    assert [f["dir"] for f in report.load_failures([tree])] == [str(tree / "0")]
    err = capsys.readouterr().err
    assert "report: warning: skipping" in err and str(bad) in err


def test_summarise_means_and_sample_stds(tree):
    summary = report.summarise(report.load_results([tree]))
    sskt = row_of(summary, "sskt")
    assert sskt["n"] == 3 and sskt["seeds"] == [0, 1, 2]
    assert sskt["sources"] == "imagenet_resnet50+places365_resnet50"
    # test 0.90, 0.92, 0.94 -> 92.00 ± 2.00 (sample std, ddof=1)
    assert sskt["test_mean"] == pytest.approx(92.0)
    assert sskt["test_std"] == pytest.approx(2.0)
    assert sskt["val_mean"] == pytest.approx(93.0)
    assert sskt["val_std"] == pytest.approx(2.0)
    assert sskt["wall_time_s_mean"] == pytest.approx(200.0)
    assert sskt["train_images_per_s_mean"] == pytest.approx(1100.0)

    scratch = row_of(summary, "scratch")
    # 80, 81, 85 -> mean 82, deviations -2, -1, 3 -> sum of squares 14, / (n-1) = 7
    assert scratch["test_mean"] == pytest.approx(82.0)
    assert scratch["test_std"] == pytest.approx(math.sqrt(7.0))
    mv = (82 + 83 + 86) / 3
    assert scratch["val_mean"] == pytest.approx(mv)
    assert scratch["val_std"] == pytest.approx(
        math.sqrt(((82 - mv) ** 2 + (83 - mv) ** 2 + (86 - mv) ** 2) / 2))


def test_single_seed_group_has_undefined_std(tree):
    kd = row_of(report.summarise(report.load_results([tree])), "kd")
    assert kd["n"] == 1
    assert kd["test_mean"] == pytest.approx(88.0)
    assert math.isnan(kd["test_std"])
    assert math.isnan(kd["wall_time_s_mean"])  # missing optional keys are tolerated
    assert kd["group"] == "data=cifar10 model=cifar_resnet20 method=kd sources=imagenet_resnet50"


def test_rows_sorted_by_data_model_then_method_order(tree):
    summary = report.summarise(report.load_results([tree]))
    assert list(zip(summary["data"], summary["method"])) == [
        ("cifar10", "scratch"), ("cifar10", "kd"), ("cifar10", "sskt"), ("cifar100", "dml")]


def test_method_order_puts_unknown_methods_last_alphabetically():
    base = {"data": "d", "model": "m", "test_acc": 0.5}
    methods = ["zeta", "sskt", "alpha", "maxl", "dml", "kd", "scratch"]
    summary = report.summarise([dict(base, method=m, seed=0) for m in methods])
    assert list(summary["method"]) == ["scratch", "kd", "dml", "maxl", "sskt", "alpha", "zeta"]


def test_runs_without_group_key_aggregate_by_identity():
    runs = [{"data": "d", "model": "m", "method": "kd", "sources": ["a", "b"], "seed": s,
             "test_acc": a} for s, a in [(0, 0.5), (1, 0.7)]]
    runs.append({"data": "d", "model": "m", "method": "kd", "sources": ["a"], "seed": 0,
                 "test_acc": 0.1})
    summary = report.summarise(runs)
    assert sorted(zip(summary["sources"], summary["n"])) == [("a", 1), ("a+b", 2)]
    assert summary.set_index("sources").loc["a+b", "test_mean"] == pytest.approx(60.0)


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
    summary = report.summarise(report.load_results([tmp_path]))
    assert [(m, round(v, 6)) for m, v in zip(summary["test_metric"], summary["test_mean"])] == [
        ("acc", 90.0), ("map", 60.0)]
    assert "test acc/mAP (%)" in report.to_markdown(summary)


# ----------------------------------------------------------------------------- markdown / CSV


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("|")[1:-1]]


def table_lines(md: str, heading_part: str) -> list[str]:
    """The table rows below the first '## ' heading containing ``heading_part``."""
    section = md.split("## ")
    (body,) = [s for s in section if s.splitlines()[0].find(heading_part) >= 0][:1]
    return [ln for ln in body.splitlines() if ln.startswith("|") and not set(ln) <= set("|:- ")]


def test_markdown_table(tree):
    md = report.to_markdown(report.summarise(report.load_results([tree])))
    assert "the last epoch's" in md.lower() and "ddof=1" in md
    lines = table_lines(md, "cifar10 · cifar_resnet20")
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert header[:4] == ["method", "sources", "n", "seeds"]
    assert "best val (selected on validation)" in header and "test acc (%), last epoch" in header
    assert "gain over scratch (points)" in header and "95 % CI" in header and "wins" in header
    rows = {cells(ln)[0]: dict(zip(header, cells(ln))) for ln in lines[1:]}
    assert list(rows) == ["scratch", "kd", "sskt"]
    sskt = rows["sskt"]
    assert sskt["test acc (%), last epoch"] == "92.00 ± 2.00"
    assert sskt["best val (selected on validation)"] == "93.00 ± 2.00"
    assert sskt["seeds"] == "0,1,2" and sskt["wall time (s)"] == "200" and sskt["train img/s"] == "1100"
    assert sskt["sources"] == "imagenet_resnet50+places365_resnet50"
    # paired with scratch over seeds 0, 1, 2: gains 10, 11, 9 -> 10.00 ± 1.00, 3 wins of 3
    assert sskt["gain over scratch (points)"] == "+10.00 ± 1.00" and sskt["wins"] == "3/3"
    assert rows["kd"]["test acc (%), last epoch"] == "88.00 ± –"  # single seed: std shown as a dash
    assert rows["kd"]["wins"] == "1/1" and rows["kd"]["95 % CI"] == "–"
    assert rows["scratch"]["gain over scratch (points)"] == "baseline"
    assert "peer1_test_acc" in md and "69.00" in md  # extras are reported
    assert "no baseline" in md   # cifar100 has no scratch group


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
    assert float(sskt["gain_mean"]) == pytest.approx(10.0) and sskt["wins"] == "3"
    assert sskt["baseline"] == "scratch"
    assert float(rows[0]["test_std"]) == pytest.approx(math.sqrt(7.0))
    kd = rows[1]
    assert float(kd["test_mean"]) == pytest.approx(88.0) and kd["test_std"] == ""
    assert float(rows[3]["extra:peer1_test_acc_mean"]) == pytest.approx(69.0)


# ----------------------------------------------------------------------------- paired gains, names, failures

FIVE = [0, 1, 2, 3, 4]


def variant_runs(root: Path) -> Path:
    """One setting, 5 seeds: scratch and three SSKT groups that differ only in overrides."""
    base = {"data": "fashion_mnist", "model": "cifar_resnet20", "test_metric": "acc"}
    setting = ["data.labels_per_class=5", "data.steps_per_epoch=20"]
    variants = {
        "scratch": (["method=scratch"], [0.70, 0.72, 0.69, 0.75, 0.71]),
        "a0.1": (["method=sskt", "method.alpha=0.1"], [0.71, 0.70, 0.73, 0.74, 0.72]),
        "a1": (["method=sskt", "method.alpha=1.0"], [0.80, 0.83, 0.79, 0.84, 0.80]),
        "unl": (["method=sskt", "method.alpha=0.1", "data.unlabeled=true", "method.unlabeled=true"],
                [0.90, 0.91, 0.88, 0.92, 0.90]),
    }
    job = 0
    for overrides, accs in variants.values():
        method = overrides[0].split("=")[1]
        for seed, acc in zip(FIVE, accs):
            ov = [*setting, *overrides, f"seed={seed}"]
            group = " ".join(["data=fashion_mnist", "model=resnet20", f"method={method}", "sources=-",
                              *sorted(o for o in ov if not o.startswith(("seed=", "method=")))])
            write_run(root, job, None, **base, method=method, seed=seed, test_acc=acc, best_val_acc=acc,
                      group=group, overrides=ov, num_train=20, num_val=200, num_unlabeled=27000)
            job += 1
    return root / "multirun" / "2024-05-01" / "12-00-00"


def test_groups_that_differ_only_in_overrides_get_distinct_names(tmp_path):
    summary = report.summarise(report.load_results([variant_runs(tmp_path)]))
    assert list(summary["name"]) == ["scratch",
                                     "sskt data.unlabeled=true method.alpha=0.1 method.unlabeled=true",
                                     "sskt method.alpha=0.1", "sskt method.alpha=1.0"]
    assert set(summary["setting"]) == {"data.labels_per_class=5 data.steps_per_epoch=20"}
    md = report.to_markdown(summary)
    assert sum(cells(ln)[:1] == ["sskt method.alpha=1.0"] for ln in md.splitlines()) == 1
    assert list(summary["num_val"]) == [200] * 4


def test_paired_gain_matches_a_hand_computation(tmp_path):
    summary = report.summarise(report.load_results([variant_runs(tmp_path)]))
    a1 = summary.set_index("name").loc["sskt method.alpha=1.0"]
    # gains in points, seed by seed: 80-70, 83-72, 79-69, 84-75, 80-71 = 10, 11, 10, 9, 9
    gains = [10.0, 11.0, 10.0, 9.0, 9.0]
    mean = sum(gains) / 5                                              # 9.8
    std = math.sqrt(sum((g - mean) ** 2 for g in gains) / 4)           # sqrt(2.8 / 4) = 0.83666
    half = 2.7764 * std / math.sqrt(5)                                 # t(0.975, 4) = 2.7764
    assert a1["n_paired"] == 5 and a1["wins"] == 5 and a1["baseline"] == "scratch"
    assert a1["gain_mean"] == pytest.approx(mean)
    assert a1["gain_std"] == pytest.approx(std)
    assert a1["gain_ci_low"] == pytest.approx(mean - half, abs=1e-9)
    assert a1["gain_ci_high"] == pytest.approx(mean + half, abs=1e-9)
    assert (mean - half, mean + half) == pytest.approx((8.7612, 10.8388), abs=1e-3)
    # alpha 0.1: gains 1, -2, 4, -1, 1 -> wins where strictly better: 3 of 5
    a01 = summary.set_index("name").loc["sskt method.alpha=0.1"]
    assert a01["wins"] == 3 and a01["gain_mean"] == pytest.approx(0.6)
    md = report.to_markdown(summary)
    (line,) = [ln for ln in md.splitlines() if cells(ln)[:1] == ["sskt method.alpha=1.0"]]
    assert cells(line)[6:9] == ["+9.80 ± 0.84", "[+8.76, +10.84]", "5/5"]
    assert "20 / 200 / 27000" in line


def test_t_quantiles():
    assert report.t_quantile_975(1) == pytest.approx(12.7062)
    assert report.t_quantile_975(4) == pytest.approx(2.7764)
    assert report.t_quantile_975(30) == pytest.approx(2.0423)
    assert 1.9799 < report.t_quantile_975(100) < 2.0003
    assert report.t_quantile_975(10 ** 9) == pytest.approx(1.96, abs=1e-3)
    assert math.isnan(report.t_quantile_975(0))


def test_only_seeds_both_groups_have_are_paired():
    runs = [{"data": "d", "model": "m", "method": "scratch", "seed": s, "test_acc": a}
            for s, a in [(0, 0.5), (1, 0.6), (2, 0.7)]]
    runs += [{"data": "d", "model": "m", "method": "kd", "seed": s, "test_acc": a}
             for s, a in [(1, 0.65), (2, 0.65), (3, 0.99)]]
    kd = report.summarise(runs).set_index("method").loc["kd"]
    assert kd["n_paired"] == 2 and kd["paired_seeds"] == [1, 2]
    assert kd["gain_mean"] == pytest.approx(0.0) and kd["wins"] == 1


def test_baseline_option_chooses_the_group(tmp_path):
    results = report.load_results([variant_runs(tmp_path)])
    summary = report.summarise(results, baseline="method.alpha=1.0")
    scratch = summary.set_index("name").loc["scratch"]
    assert scratch["baseline"] == "sskt method.alpha=1.0"
    assert scratch["gain_mean"] == pytest.approx(-9.8)
    # a spec that matches two groups says so instead of guessing
    summary = report.summarise(results, baseline="method=sskt")
    assert "3 groups match" in summary.set_index("name").loc["scratch", "baseline_note"]


def test_protocol_sidecar_names_and_search_trials(tmp_path):
    run_a = write_run(tmp_path, 0, None, method="sskt", seed=0, test_acc=0.9, best_val_acc=0.9)
    (run_a / "protocol.json").write_text(json.dumps({"name": "sskt_unlabeled", "setting": "5 labels",
                                                     "phase": "final", "params": {"method.alpha": 0.5}}))
    run_b = write_run(tmp_path, 1, None, method="sskt", seed=0, test_acc=0.1, best_val_acc=0.1)
    (run_b / "protocol.json").write_text(json.dumps({"name": "sskt", "setting": "5 labels", "phase": "search"}))
    results = report.load_results([tmp_path])
    assert [r["name"] for r in results] == ["sskt_unlabeled"]     # the search trial is left out
    assert len(report.load_results([tmp_path], include_search=True)) == 2
    summary = report.summarise(results)
    assert summary["name"].tolist() == ["sskt_unlabeled"] and summary["params"][0] == "method.alpha=0.5"
    # protocol runs group by (setting, name), even when an override differs per seed (a KD teacher path)
    run_c = write_run(tmp_path, 2, None, method="sskt", seed=1, test_acc=0.8, best_val_acc=0.8,
                      group="data=x method=sskt source.checkpoint.weights=/teachers/seed_1/last.ckpt")
    (run_c / "protocol.json").write_text(json.dumps({"name": "sskt_unlabeled", "setting": "5 labels",
                                                     "phase": "final", "params": {"method.alpha": 0.5}}))
    both = report.summarise(report.load_results([tmp_path]))
    assert both["name"].tolist() == ["sskt_unlabeled"] and both["n"].tolist() == [2]
    assert "| alpha=0.5 " in report.to_markdown(summary)


def test_protocols_of_other_data_with_the_same_setting_name_stay_apart(tmp_path):
    """Two protocol directories whose setting names agree (both default to their --out's name) but
    whose data differ are two settings, never one row of four runs with seeds 0,1,0,1."""
    job = 0
    for data, accs in (("cifar10", (0.9, 0.8)), ("stl10", (0.5, 0.4))):
        for seed, acc in enumerate(accs):
            run = write_run(tmp_path, job, None, data=data, method="scratch", seed=seed, test_acc=acc,
                            best_val_acc=acc)
            (run / "protocol.json").write_text(json.dumps({"name": "scratch", "setting": "main", "phase": "final"}))
            job += 1
    summary = report.summarise(report.load_results([tmp_path]))
    assert sorted(summary["data"]) == ["cifar10", "stl10"] and list(summary["n"]) == [2, 2]
    assert row_of(summary[summary["data"] == "stl10"], "scratch")["test_mean"] == pytest.approx(45.0)


def test_a_seed_twice_in_a_group_is_an_error_naming_both_runs(tmp_path):
    a = write_run(tmp_path, 0, None, method="scratch", seed=0, group=SCRATCH_GROUP, test_acc=0.5)
    b = write_run(tmp_path, 1, None, method="scratch", seed=0, group=SCRATCH_GROUP, test_acc=0.7)
    with pytest.raises(ReportError, match=r"seed\(s\) \[0\] more than once") as err:
        report.summarise(report.load_results([tmp_path]))
    assert str(a / "results.json") in str(err.value) and str(b / "results.json") in str(err.value)


def test_runs_without_the_metric_are_not_counted_in_n(tmp_path, capsys):
    for seed, acc in enumerate([0.70, 0.80, None]):
        write_run(tmp_path, seed, None, method="scratch", seed=seed, group=SCRATCH_GROUP, test_acc=acc)
    (row,) = report.summarise(report.load_results([tmp_path])).itertuples()
    assert row.n == 2 and row.seeds == [0, 1] and row.test_mean == pytest.approx(75.0)
    assert row.test_std == pytest.approx(math.sqrt(50.0))
    assert "1 run(s) of group" in capsys.readouterr().err


def test_overrides_outside_the_group_do_not_split_the_setting():
    """tags=, extras., callbacks.lr_monitor ... are left out of train.py's group: the report must not
    make them a setting of their own (scratch tagged [base] and sskt tagged [ours] still pair)."""
    runs = [{"data": "d", "model": "m", "method": m, "seed": s, "test_acc": a,
             "overrides": [f"method={m}", "data.labels_per_class=5", f"tags=[{tag}]", "extras.print_config=false",
                           "callbacks.lr_monitor.logging_interval=step"]}
            for m, tag, base in (("scratch", "base", 0.5), ("sskt", "ours", 0.6)) for s, a in
            ((0, base), (1, base + 0.1))]
    summary = report.summarise(runs)
    assert set(summary["setting"]) == {"data.labels_per_class=5"}
    assert row_of(summary, "sskt")["gain_mean"] == pytest.approx(10.0)


def test_why_a_setting_has_no_paired_gain_is_in_the_markdown(tmp_path, capsys):
    # two scratch groups (a swept learning rate) both match the default baseline method=scratch
    runs = [{"data": "d", "model": "m", "method": m, "seed": 0, "test_acc": 0.5,
             "group": " ".join([f"data=d model=m method={m} sources=-", *extra]), "overrides": [f"method={m}", *extra]}
            for m, extra in (("scratch", ["optim.optimizer.lr=0.1"]), ("scratch", ["optim.optimizer.lr=0.2"]),
                             ("sskt", []))]
    md = report.to_markdown(report.summarise(runs))
    assert "No paired gains: 2 groups match --baseline method=scratch" in md and "--baseline name=" in md
    # the baseline is there but shares no seed
    runs = [{"data": "d", "model": "m", "method": "scratch", "seed": 0, "test_acc": 0.5},
            {"data": "d", "model": "m", "method": "sskt", "seed": 1, "test_acc": 0.6}]
    summary = report.summarise(runs)
    md = report.to_markdown(summary)
    assert "No paired gains: no seed in common with scratch (the baseline); the seeds: scratch 0; sskt 1." in md
    assert math.isnan(row_of(summary, "sskt")["wins"])          # no pair, no win count (empty in the CSV)
    report.write_report(runs, tmp_path / "out", plots=False)
    assert "no seed in common with scratch" in capsys.readouterr().err


def test_an_unwritable_out_exits_2_with_the_fix(tree, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert report.main([str(tree), "--out", str(blocker / "report"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {blocker / 'report'}" in err and "--out DIR" in err and "Traceback" not in err


def test_failed_jobs_are_listed_beside_the_table(tree, tmp_path, capsys):
    bad = tree / "99"
    bad.mkdir()
    (bad / "failed.txt").write_text("Traceback (most recent call last):\n  ...\n"
                                    "sskt_lightning.errors.ConfigError: data.val_size=100000 is too large\n")
    bad2 = tree / "100"
    bad2.mkdir()
    (bad2 / "results.json").write_text(json.dumps({"status": "failed", "method": "sskt", "seed": 5,
                                                   "error": "non-finite loss at step 3 (aux_checkpoint)"}))
    failures = report.load_failures([tree])
    assert [Path(f["dir"]).name for f in failures] == ["99", "100"]
    assert failures[0]["reason"].endswith("data.val_size=100000 is too large")
    assert len(report.load_results([tree])) == 8                     # the failed results.json is not a result
    out = tmp_path / "out"
    assert report.main([str(tree), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    assert "## Failed jobs (2)" in md and "too large" in md and "non-finite loss at step 3" in md
    assert "2 failed job(s)" in capsys.readouterr().err


def test_all_failed_says_so(tmp_path, capsys):
    for k in range(3):
        d = tmp_path / str(k)
        d.mkdir()
        (d / "failed.txt").write_text(f"RuntimeError: boom {k}\n")
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "all 3 jobs failed" in err and "boom 2" in err
    assert "wait for the runs" not in err


def test_zoom_never_runs_past_100_percent():
    lo, hi = report._zoom([99.2, 99.8, 100.0], "%")
    assert hi <= 100.0 and lo < 99.2
    lo, hi = report._zoom([50.0, 51.0], "%")      # a small difference gets a readable window
    assert 47.0 < lo < 50.0 and 51.0 < hi < 54.0


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


@pytest.mark.slow
def test_plots_are_valid_pngs(tree, tmp_path):
    results = report.load_results([tree])
    summary = report.summarise(results)
    a = report.plot_test_acc(summary, tmp_path / "t.png")
    b = report.plot_val_curves(results, tmp_path / "v.png")
    c = report.plot_gains(summary, tmp_path / "g.png")
    for p in (a, b, c):
        w, h = png_size(p)
        assert w > 300 and h > 200
        assert p.stat().st_size > 5000


def test_plot_val_curves_without_any_curve(tmp_path):
    runs = [{"data": "d", "model": "m", "method": "kd", "seed": 0, "test_acc": 0.5,
             "_dir": str(tmp_path)}]
    w, h = png_size(report.plot_val_curves(runs, tmp_path / "v.png"))
    assert w > 100 and h > 100


@pytest.mark.slow
def test_main_writes_everything(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(tree), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "92.00 ± 2.00" in stdout and "best val (selected on validation)" in stdout
    for name in ("report.md", "report.csv", "runs.csv", "test_acc.png", "gains.png", "val_curves.png"):
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


@pytest.mark.slow
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


def same_unlabeled_runs(root: Path) -> Path:
    """One protocol setting, seeds 0-2 (test %, best val %): FreeMatch is the best on validation among
    the methods on the unlabeled images but FixMatch is the best on test; a reference that uses them
    has the highest validation of all."""
    runs = {  # name: (method, unlabeled, reference, tests, vals)
        "scratch": ("scratch", False, False, [70, 72, 71], [70, 72, 71]),
        "fixmatch": ("fixmatch", True, False, [85, 86, 84], [79, 80, 81]),
        "freematch": ("fixmatch", True, False, [82, 82, 83], [87, 88, 89]),
        "sskt_fixmatch": ("sskt", True, False, [90, 91, 87], [85, 86, 87]),
        "oracle": ("scratch", True, True, [99, 99, 99], [99, 99, 99]),
    }
    job = 0
    for name, (method, unl, ref, tests, vals) in runs.items():
        for seed, (t, v) in enumerate(zip(tests, vals)):
            run = write_run(root, job, None, method=method, seed=seed, test_acc=t / 100, best_val_acc=v / 100)
            (run / "protocol.json").write_text(json.dumps({
                "name": name, "setting": "5 labels", "phase": "final", "seed": seed, "params": {},
                "unlabeled": unl, "reference": ref}))
            job += 1
    return root


def test_gain_over_the_best_method_on_the_same_unlabeled_images_is_chosen_on_validation(tmp_path):
    summary = report.summarise(report.load_results([same_unlabeled_runs(tmp_path)])).set_index("name")
    # references last; within the rest the method order (scratch, sskt, fixmatch), then the name
    assert list(summary.index) == ["scratch", "sskt_fixmatch", "fixmatch", "freematch", "oracle"]
    assert summary["reference"].tolist() == [False, False, False, False, True]
    # the comparator: highest mean best-val among the OTHER unlabeled non-reference methods
    # (never oracle, a reference; never chosen by test: fixmatch has the best test but val 80)
    assert summary["same_unl_best"].to_dict() == {"scratch": "freematch", "sskt_fixmatch": "freematch",
                                                  "fixmatch": "freematch", "freematch": "sskt_fixmatch",
                                                  "oracle": "freematch"}
    s = summary.loc["sskt_fixmatch"]
    # gains 90-82, 91-82, 87-83 = 8, 9, 4: mean 7, std sqrt((1 + 4 + 9) / 2) = sqrt(7)
    half = 4.3027 * math.sqrt(7) / math.sqrt(3)                        # t(0.975, 2) = 4.3027
    assert s["same_unl_gain_mean"] == pytest.approx(7.0) and s["same_unl_gain_std"] == pytest.approx(math.sqrt(7))
    assert (s["same_unl_gain_ci_low"], s["same_unl_gain_ci_high"]) == pytest.approx((7 - half, 7 + half))
    assert s["same_unl_wins"] == 3 and s["same_unl_n_paired"] == 3 and s["same_unl_best_val"] == pytest.approx(88.0)
    # freematch against sskt_fixmatch: -8, -9, -4; fixmatch against freematch: 3, 4, 1
    assert summary.loc["freematch", "same_unl_gain_mean"] == pytest.approx(-7.0)
    assert summary.loc["freematch", "same_unl_wins"] == 0
    assert summary.loc["fixmatch", "same_unl_gain_mean"] == pytest.approx(8 / 3)
    # the gain over scratch is still there (sskt_fixmatch 20, 19, 16), though the reference oracle is a
    # method=scratch run too: a reference is never the baseline
    assert s["gain_mean"] == pytest.approx(55 / 3) and s["baseline"] == "scratch"
    md = report.to_markdown(report.summarise(report.load_results([tmp_path])))
    lines = table_lines(md, "5 labels")
    header = cells(lines[0])
    rows = {cells(ln)[0]: dict(zip(header, cells(ln))) for ln in lines[1:]}
    assert list(rows) == ["scratch", "sskt_fixmatch", "fixmatch", "freematch", "oracle (reference)"]
    sf = rows["sskt_fixmatch"]
    assert sf[report.tables.SAME_UNL_HEADER] == "freematch: +7.00 ± 2.65"
    assert sf["95 % CI (same unlabeled)"] == f"[+{7 - half:.2f}, +{7 + half:.2f}]" == "[+0.43, +13.57]"
    assert sf["wins (same unlabeled)"] == "3/3" and sf["unlabeled images"] == "yes"
    assert rows["scratch"]["unlabeled images"] == "no"
    assert "never chosen as the best method" in md and "chosen on validation, never on test" in md
    csv_rows = list(csv.DictReader(io.StringIO(report.to_csv(report.summarise(report.load_results([tmp_path]))))))
    by_name = {r["name"]: r for r in csv_rows}
    assert by_name["sskt_fixmatch"]["same_unl_best"] == "freematch" and by_name["oracle"]["reference"] == "True"
    assert float(by_name["sskt_fixmatch"]["same_unl_gain_mean"]) == pytest.approx(7.0)


def test_unlabeled_runs_are_recognised_from_their_overrides_without_a_protocol(tmp_path):
    """Plain runs (no protocol.json): data.unlabeled=true among the overrides marks them (the last wins);
    with a single unlabeled group there is no OTHER method to compare with."""
    summary = report.summarise(report.load_results([variant_runs(tmp_path)])).set_index("name")
    unl = [n for n in summary.index if summary.loc[n, "unlabeled"]]
    assert len(unl) == 1 and "data.unlabeled=true" in unl[0]
    assert summary.loc[unl[0], "same_unl_best"] == "" and summary.loc[unl[0], "same_unl_n_paired"] == 0
    # every other group is compared with it: scratch 70-90, 72-91, 69-88, 75-92, 71-90 = mean -18.8
    assert summary.loc["scratch", "same_unl_best"] == unl[0]
    assert summary.loc["scratch", "same_unl_gain_mean"] == pytest.approx(-18.8)
    assert report.statistics._uses_unlabeled({"overrides": ["data.unlabeled=true", "data.unlabeled=false"]}) is False
    assert report.statistics._uses_unlabeled({"unlabeled": True, "overrides": []}) is True


def test_markdown_header_lines_are_added_to_the_conventions(tree):
    md = report.to_markdown(report.summarise(report.load_results([tree])), header=["EMA: off for every method"])
    assert "- EMA: off for every method" in md.split("## ")[0]
    assert "unlabeled images" not in md.split("## ")[1]     # no column when no method uses them
