"""Which source? LEEP, NCE and LogME against hand computations, and ``python -m sskt_lightning.rank``."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from method_contract import SMALL_SOURCE
from sskt_lightning.compose import compose_config
from sskt_lightning.errors import ConfigError
from sskt_lightning.ranking.scores import bootstrap_interval, leep, logme, logme_fit, nce


# ---------------------------------------------------------------------------------------- LEEP

def _leep_by_loops(theta, y, num_classes):
    n, z_count = len(theta), len(theta[0])
    joint = [[0.0] * z_count for _ in range(num_classes)]
    for i in range(n):
        for z in range(z_count):
            joint[y[i]][z] += theta[i][z] / n
    total = 0.0
    for i in range(n):
        inner = 0.0
        for z in range(z_count):
            pz = sum(joint[c][z] for c in range(num_classes))
            inner += joint[y[i]][z] / pz * theta[i][z]
        total += math.log(inner)
    return total / n


def test_leep_is_its_definition_computed_with_plain_loops():
    rng = np.random.default_rng(0)
    theta = rng.dirichlet(np.ones(4), size=12)
    y = np.array([0, 1, 2] * 4)
    assert leep(theta, y) == pytest.approx(_leep_by_loops(theta.tolist(), y.tolist(), 3), abs=1e-12)
    # a target class with no image: its row of the joint is empty, nothing changes
    assert leep(theta, y, num_classes=5) == pytest.approx(_leep_by_loops(theta.tolist(), y.tolist(), 5), abs=1e-12)


def test_leep_keeps_the_log():
    """Some public copies drop the log; a source that is certain and right scores log(1) = 0."""
    y = np.array([0, 1, 0, 1])
    assert leep(np.eye(2)[y], y) == pytest.approx(0.0, abs=1e-12)
    assert leep(np.full((4, 2), 0.5), y) == pytest.approx(math.log(0.5), abs=1e-12)


def test_a_source_with_the_targets_classes_ranks_above_a_random_one():
    rng = np.random.default_rng(1)
    n, classes = 400, 5
    y = np.arange(n) % classes
    perm = rng.permutation(classes)                  # the source's own numbering of the same classes
    logits = 3.0 * np.eye(classes)[perm[y]] + rng.standard_normal((n, classes))
    informed = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    random = rng.dirichlet(np.ones(50), size=n)      # 50 classes unrelated to the target's
    assert leep(informed, y) > leep(random, y) + 0.5
    assert nce(informed.argmax(1), y) > nce(random.argmax(1), y) + 0.5
    a = bootstrap_interval(lambda i: leep(informed[i], y[i], classes), n, 200, 0)
    b = bootstrap_interval(lambda i: leep(random[i], y[i], classes), n, 200, 0)
    assert a["low"] > b["high"]


# ---------------------------------------------------------------------------------------- NCE

def test_nce_from_counts():
    z = np.array([0, 0, 1, 1, 1, 2])
    y = np.array([0, 0, 0, 1, 1, 1])
    # Z=0 -> Y=0 twice, Z=2 -> Y=1 once (no uncertainty); Z=1 -> Y=0 once, Y=1 twice
    expected = (3 / 6) * ((1 / 3) * math.log(1 / 3) + (2 / 3) * math.log(2 / 3))
    assert nce(z, y) == pytest.approx(expected, abs=1e-12)
    assert nce(y, y) == 0.0                          # Z determines Y
    assert nce(np.zeros(6, int), y) == pytest.approx(math.log(0.5), abs=1e-12)   # -H(Y)


# ---------------------------------------------------------------------------------------- LogME

def _direct_evidence(f, t, alpha, beta):
    """log p(t | F, alpha, beta) / n from its definition, with the posterior mean and log|A| direct."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ t)
    _, logdet = np.linalg.slogdet(a)
    ev = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - beta / 2 * np.sum((f @ m - t) ** 2)
          - alpha / 2 * (m @ m) - logdet / 2 - n / 2 * math.log(2 * math.pi))
    return ev / n, m


@pytest.mark.parametrize("n,d", [(40, 6), (5, 9)], ids=["more images than features", "fewer"])
def test_logme_is_the_evidence_at_its_fixed_point(n, d):
    rng = np.random.default_rng(2)
    y = np.arange(n) % 3
    f = rng.standard_normal((n, d)) + np.eye(3)[y] @ rng.standard_normal((3, d))
    fit = logme_fit(f, y)
    assert fit["score"] == pytest.approx(fit["evidence"].mean(), abs=1e-15)
    for c in range(3):
        t = (y == c).astype(float)
        alpha, beta = fit["alpha"][c], fit["beta"][c]
        direct, m = _direct_evidence(f, t, alpha, beta)
        assert fit["evidence"][c] == pytest.approx(direct, rel=1e-9, abs=1e-12)
        # MacKay's condition alpha = gamma / |m|^2 holds, and it is a maximum in alpha
        eig = np.linalg.eigvalsh(beta * f.T @ f)
        gamma = np.sum(eig / (alpha + eig))
        assert alpha == pytest.approx(gamma / (m @ m), rel=1e-5)
        for da in (1.05, 1 / 1.05):
            assert _direct_evidence(f, t, alpha * da, beta)[0] < direct
        if n > d:   # beta = (n - gamma) / |F m - t|^2 too, a maximum in beta
            assert beta == pytest.approx((n - gamma) / np.sum((f @ m - t) ** 2), rel=1e-5)
            for db in (1.05, 1 / 1.05):
                assert _direct_evidence(f, t, alpha, beta * db)[0] < direct
        else:       # a column fitted exactly: the evidence's supremum lies at beta -> infinity
            assert _direct_evidence(f, t, alpha, beta / 1.05)[0] <= direct + 1e-12
            assert _direct_evidence(f, t, alpha, beta * 1.05)[0] <= direct + 1e-7


def test_logme_of_features_that_are_all_zero_is_the_noise_models_evidence():
    """A dead feature layer: only t ~ N(0, I/beta) is left, at its best beta = n / |t|^2."""
    y = np.arange(20) % 2
    per_class = []
    for c in range(2):
        t = (y == c).astype(float)
        beta = 20 / (t @ t)
        per_class.append((10 * math.log(beta) - beta / 2 * (t @ t) - 10 * math.log(2 * math.pi)) / 20)
    assert logme(np.zeros((20, 4)), y) == pytest.approx(np.mean(per_class), abs=1e-12)


def test_logme_prefers_features_that_predict_the_labels():
    rng = np.random.default_rng(3)
    n = 120
    y = np.arange(n) % 4
    good = np.hstack([np.eye(4)[y] + 0.1 * rng.standard_normal((n, 4)), rng.standard_normal((n, 6))])
    bad = rng.standard_normal((n, 10))
    assert logme(good, y) > logme(bad, y) + 0.5


def test_the_bootstrap_is_seeded_and_placed_around_the_estimate():
    rng = np.random.default_rng(4)
    theta, y = rng.dirichlet(np.ones(30), size=80), np.arange(80) % 4
    score = lambda i: leep(theta[i], y[i], 4)  # noqa: E731
    one, two = bootstrap_interval(score, 80, 100, 7), bootstrap_interval(score, 80, 100, 7)
    assert one == two and bootstrap_interval(score, 80, 100, 8) != one
    assert one["low"] < leep(theta, y) < one["high"]
    # the raw resampled LEEPs sit above the estimate (duplicated images fit the joint table better)
    assert one["shift"] > 0
    assert bootstrap_interval(score, 80, 0, 7) is None
    # a resample as weights (how the command bootstraps LEEP and NCE) is the resample itself
    idx = np.random.default_rng(5).integers(0, 80, 80)
    w = np.bincount(idx, minlength=80)
    assert leep(theta, y, 4, weights=w) == pytest.approx(leep(theta[idx], y[idx], 4), abs=1e-12)
    assert nce(theta.argmax(1), y, 4, weights=w) == pytest.approx(nce(theta[idx].argmax(1), y[idx], 4), abs=1e-12)


# ---------------------------------------------------------------------------------------- the command

# two random-weight candidates, no download: SMALL_SOURCE's 10-class net and a 100-class one
TWO_SOURCES = ["source=[timm,imagenet_resnet18]", *SMALL_SOURCE[1:], "source.imagenet_resnet18.name=cifar_resnet20",
               "source.imagenet_resnet18.pretrained=false", "source.imagenet_resnet18.num_classes=100"]


def _config(cifar_dir, tmp_path, *extra):
    return compose_config(["data=cifar10", f"paths.data_dir={cifar_dir}", "data.val_size=20", *TWO_SOURCES,
                           "rank.bootstrap=30", "rank.logme_bootstrap=10", "rank.device=cpu", *extra],
                          tmp_path / "run", config_name="rank")


def test_rank_writes_a_sorted_table_json_csv_and_chart(cifar_dir, tmp_path):
    from sskt_lightning.rank import rank
    result = rank(_config(cifar_dir, tmp_path, "rank.score=logme"))
    run = tmp_path / "run"
    written = json.loads((run / "ranking.json").read_text())
    assert written == json.loads(json.dumps(result))
    rows = written["ranking"]
    assert [r["candidate"] for r in rows] and sorted(r["candidate"] for r in rows) == ["imagenet_resnet18", "timm"]
    values = [r["logme"]["value"] for r in rows]
    assert values == sorted(values, reverse=True) and [r["rank"] for r in rows] == [1, 2]
    assert written["num_images"] == 60 and written["split"] == "train" and written["failed"] == []
    for r in rows:
        for s in ("leep", "nce", "logme"):
            assert r[s]["low"] <= r[s]["value"] <= r[s]["high"]
        assert r["feature_dim"] == 64 and r["params"] > 2e5 and r["ms_per_image"] > 0
    assert {r["candidate"]: r["num_classes"] for r in rows} == {"timm": 10, "imagenet_resnet18": 100}
    with open(run / "ranking.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["candidate"] for t in table] == [r["candidate"] for r in rows]
    assert float(table[0]["logme"]) == pytest.approx(rows[0]["logme"]["value"], rel=1e-12)
    assert (run / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the scores are the functions' on the same arrays: LEEP re-sorted by another key, same values
    again = rank(_config(cifar_dir, tmp_path, "rank.score=leep"))
    by_name = {r["candidate"]: r for r in rows}
    for r in again["ranking"]:
        assert r["leep"]["value"] == pytest.approx(by_name[r["candidate"]]["leep"]["value"], abs=1e-12)
    leeps = [r["leep"]["value"] for r in again["ranking"]]
    assert leeps == sorted(leeps, reverse=True)


def test_the_test_split_and_one_label_per_class_are_refused(cifar_dir, tmp_path):
    from sskt_lightning.rank import rank
    with pytest.raises(ConfigError, match=r"rank.split=test is refused"):
        rank(_config(cifar_dir, tmp_path, "rank.split=test"))
    with pytest.raises(ConfigError, match=r"fewer than 2 labelled images .* not meaningful"):
        rank(_config(cifar_dir, tmp_path, "data.labels_per_class=1"))


def test_an_unloadable_candidate_is_named_and_the_others_rank(cifar_dir, tmp_path, offline):
    from sskt_lightning.rank import rank
    cfg = _config(cifar_dir, tmp_path, "source=[timm,imagenet_resnet18,imagenet_vgg16,checkpoint]",
                  "source.imagenet_vgg16.name=resnet10t.c3_in1k")       # hub weights, not cached, offline
    result = rank(cfg)
    assert sorted(r["candidate"] for r in result["ranking"]) == ["imagenet_resnet18", "timm"]
    hub, checkpoint = result["failed"]
    assert hub["candidate"] == "imagenet_vgg16" and "source.imagenet_vgg16.weights=" in hub["reason"]
    assert checkpoint == {"candidate": "checkpoint", "reason": "source.checkpoint.weights is required: set "
                                                               "source.checkpoint.weights=<value>."}


def poison_logits(monkeypatch, key: str) -> None:
    """Candidate ``key``'s logits get a NaN (its forward pass through the bank, as ranked)."""
    import sskt_lightning.rank as R
    real = R._forward

    def poisoned(source, *args, **kwargs):
        logits, feats, seconds = real(source, *args, **kwargs)
        if source.key == key:
            logits[0, 0] = float("nan")
        return logits, feats, seconds

    monkeypatch.setattr(R, "_forward", poisoned)


def test_a_non_finite_score_is_refused_naming_the_candidate(cifar_dir, tmp_path, monkeypatch):
    import torch

    import sskt_lightning.rank as R
    poison_logits(monkeypatch, "timm")
    result = R.rank(_config(cifar_dir, tmp_path))
    assert [r["candidate"] for r in result["ranking"]] == ["imagenet_resnet18"]
    assert result["failed"][0]["candidate"] == "timm" and "refused" in result["failed"][0]["reason"]
    with pytest.raises(ConfigError, match="candidate 'x'.*NaN"):
        R.score_candidate("x", torch.full((4, 3), float("nan")), torch.zeros(4, 2), np.array([0, 0, 1, 1]), 2,
                          _config(cifar_dir, tmp_path).rank)


def test_the_soft_labels_go_through_the_cache_a_training_run_reads(cifar_dir, tmp_path):
    """rank.cache=read_write stores each candidate's identity-view logits where a training run with
    the same source finds them: a second ranking is served by the cache, and the store that
    ``method=sskt method.cache=read_only`` opens for its labelled stream holds every ranked image."""
    import torch

    from sskt_lightning.cache.__main__ import _open_run_stores
    from sskt_lightning.nets.factory import create_network
    from sskt_lightning.rank import rank
    weights = tmp_path / "source.pth"
    torch.save(create_network("cifar_resnet20", 10, 3).state_dict(), weights)   # the same weights in both runs
    source = ["source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.pretrained=false",
              f"source.timm.weights={weights}"]
    common = ["data=cifar10", f"paths.data_dir={cifar_dir}", "data.val_size=20", *source,
              f"paths.cache_dir={tmp_path / 'cache'}"]
    opts = ["rank.bootstrap=0", "rank.logme_bootstrap=0", "rank.device=cpu", "rank.cache=read_write"]
    first = rank(compose_config([*common, *opts], tmp_path / "r1", config_name="rank"))["ranking"][0]
    second = rank(compose_config([*common, *opts], tmp_path / "r2", config_name="rank"))["ranking"][0]
    assert (first["cache"]["misses"], first["cache"]["written"]) == (60, 60)
    assert (second["cache"]["hits"], second["cache"]["misses"]) == (60, 0)
    assert second["leep"]["value"] == first["leep"]["value"]       # the stored rows, hit or miss
    train_cfg = compose_config([*common, "method=sskt", "method.cache=read_only"], tmp_path / "t")
    dm, bank, _, stores = _open_run_stores(train_cfg, "read_only", torch.device("cpu"))
    store = stores["labeled"][0]
    assert store.count_filled() == 60
    hit, _ = store.lookup(dm.train_indices.numpy(), np.full(60, dm.augment.identity_view))
    assert hit.all()
    store.close()


def test_the_validation_split_and_on_device_images_give_the_same_scores(cifar_dir, tmp_path):
    from sskt_lightning.rank import rank
    val = ["rank.split=val", "data.val_per_class=2", "rank.bootstrap=0", "rank.logme_bootstrap=0"]
    host = rank(_config(cifar_dir, tmp_path, *val))
    gathered = rank(_config(cifar_dir, tmp_path, *val, "data.on_device=true"))
    assert host["num_images"] == 20 and host["split"] == "val"
    assert [(r["candidate"], r["leep"]["value"], r["logme"]["value"]) for r in host["ranking"]] == \
        [(r["candidate"], r["leep"]["value"], r["logme"]["value"]) for r in gathered["ranking"]]


@pytest.mark.slow
def test_command_line_refusals_exit_2_without_a_traceback(tmp_path):
    import subprocess
    import sys
    for args, expected in ((["rank.split=test"], "rank.split=test is refused"),
                           (["source=[nosuch]"], "no config named ['nosuch']")):
        proc = subprocess.run([sys.executable, "-m", "sskt_lightning.rank", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr
