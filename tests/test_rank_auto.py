"""``source=[auto,<candidates>...] rank.top_k=K``: rank the listed candidates, train with the top K."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from sskt_lightning.compose import compose_config
from sskt_lightning.errors import ConfigError
from sskt_lightning.ranking import auto
from sskt_lightning.train import run
from test_rank import TWO_SOURCES

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights")

# test_rank's two random-weight candidates (no download: a 10-class and a 100-class ResNet-20), after auto
CANDIDATES = ["source=[auto,timm,imagenet_resnet18]", *TWO_SOURCES[1:]]
SMOKE = ["data=cifar10", "model=resnet20", "trainer=smoke", "data.batch_size=8", "data.val_size=16",
         "data.num_workers=0", "trainer.limit_train_batches=3", "trainer.max_epochs=1", "method=sskt",
         "rank.bootstrap=20", "rank.device=cpu"]


def _cfg(cifar_dir, out, *extra):
    return compose_config([f"paths.data_dir={cifar_dir}", *SMOKE, *CANDIDATES, *extra], out)


@pytest.mark.parametrize("score", ["leep", "logme"])
def test_auto_ranks_the_candidates_then_trains_with_the_best_and_records_it(cifar_dir, tmp_path, score):
    out = tmp_path / "run"
    results = run(_cfg(cifar_dir, out, f"rank.score={score}"))
    ranking = json.loads((out / auto.RECORD).read_text())
    rows = ranking["ranking"]
    assert sorted(r["candidate"] for r in rows) == ["imagenet_resnet18", "timm"]
    best = max(rows, key=lambda r: r[score]["value"])["candidate"]
    chosen = results["source_ranking"]
    assert chosen["chosen"] == [best] == [rows[0]["candidate"]] and chosen["score"] == score
    assert chosen["candidates"] == ["timm", "imagenet_resnet18"] and chosen["top_k"] == 1
    assert chosen["scores"][best][score] == rows[0][score]["value"] and chosen["reused_record"] is False
    # the run trained with that source only: results, the saved config, the checkpoint's config
    assert results["sources"] == [best]
    assert list(_saved_sources(out)) == [best]
    ckpt = torch.load(out / results["checkpoints"]["last"], weights_only=True)
    assert list(ckpt["hyper_parameters"]["config"]["source"]) == [best]
    assert (out / "ranking.csv").is_file() and (out / "ranking.png").is_file()
    assert ranking["split"] == "train" and ranking["top_k"] == 1 and ranking["fingerprint"]


def _saved_sources(out):
    from omegaconf import OmegaConf
    return OmegaConf.load(out / "config.yaml").source


def test_top_k_two_keeps_both_in_rank_order(cifar_dir, tmp_path):
    results = run(_cfg(cifar_dir, tmp_path / "run", "rank.top_k=2"))
    rows = json.loads((tmp_path / "run" / auto.RECORD).read_text())["ranking"]
    assert results["sources"] == results["source_ranking"]["chosen"] == [r["candidate"] for r in rows]


def test_the_run_that_follows_the_ranking_reads_its_soft_labels_from_the_cache(cifar_dir, tmp_path):
    """With method.cache on, the ranking's forward passes fill the soft-label cache that the training
    run then reads: with the identity view the only view (no crop, no flip), every labelled image the
    run sees is a hit and the chosen source never runs on them again."""
    out = tmp_path / "run"
    results = run(_cfg(cifar_dir, out, "method.cache=read_write", f"paths.cache_dir={tmp_path / 'cache'}",
                       "data.augment_pad=0", "data.augment_flip=false", "rank.top_k=1"))
    best = results["source_ranking"]["chosen"][0]
    ranked = {r["candidate"]: r for r in json.loads((out / auto.RECORD).read_text())["ranking"]}
    assert ranked[best]["cache"]["written"] == 64 and ranked[best]["cache"]["misses"] == 64
    labeled = results["method_settings"]["cache_stats"][best][0]
    assert labeled["misses"] == 0 and labeled["hits"] == 3 * 8      # 3 steps of 8 labelled images


def _never_rank(*args, **kwargs):
    raise AssertionError("ranked again: the recorded ranking should have been read")


def test_a_resumed_run_reads_the_recorded_choice_and_a_changed_candidate_is_ranked_again(cifar_dir, tmp_path,
                                                                                        monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    first = auto.choose_sources(_cfg(cifar_dir, out), out)
    import sskt_lightning.rank as R
    monkeypatch.setattr(R, "rank", _never_rank)
    cfg = _cfg(cifar_dir, out)
    again = auto.choose_sources(cfg, out)
    assert again["chosen"] == first["chosen"] and again["reused_record"] is True
    assert list(cfg.source) == first["chosen"]
    # another option of a candidate (here its class count): another fingerprint, ranked again
    with pytest.raises(AssertionError, match="ranked again"):
        auto.choose_sources(_cfg(cifar_dir, out, "source.imagenet_resnet18.num_classes=50"), out)
    # top_k is not part of the ranking: the record serves any K
    assert auto.choose_sources(_cfg(cifar_dir, out, "rank.top_k=2"), out)["chosen"][0] == first["chosen"][0]


def test_other_ranks_wait_for_rank_zeros_ranking_and_never_rank(cifar_dir, tmp_path, monkeypatch):
    """Every DDP process must train with the same sources: a rank > 0 reads rank 0's record."""
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "zero").mkdir()
    zero = auto.choose_sources(_cfg(cifar_dir, tmp_path / "zero"), tmp_path / "zero")     # rank 0's
    record = (tmp_path / "zero" / auto.RECORD).read_text()
    import sskt_lightning.rank as R
    monkeypatch.setattr(R, "rank", _never_rank)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(auto, "WAIT_S", 0.5)
    (out / auto.RECORD).write_text("[]")      # not a record (another tool's file): waited past, not a crash
    with pytest.raises(ConfigError, match=r"rank 0 wrote no ranking to .*SSKT_RANK_WAIT_S"):
        auto.choose_sources(_cfg(cifar_dir, out), out)
    monkeypatch.setattr(auto, "WAIT_S", 30)
    writer = threading.Timer(1.0, lambda: (out / auto.RECORD).write_text(record))
    writer.start()
    t0 = time.monotonic()
    got = auto.choose_sources(_cfg(cifar_dir, out), out)
    writer.join()
    assert got["reused_record"] is True and time.monotonic() - t0 >= 0.9
    assert got["chosen"] == zero["chosen"]


@pytest.mark.parametrize("extra, message", [
    (["rank.top_k=3"], r"rank.top_k=3 but only 2 candidate\(s\) are listed"),
    (["rank.top_k=0"], r"rank.top_k=0: .* >= 1"),
    (["method=scratch"], r"method=scratch uses none"),
])
def test_bad_auto_settings_are_refused_before_anything_ranks(cifar_dir, tmp_path, monkeypatch, extra, message):
    import sskt_lightning.rank as R
    monkeypatch.setattr(R, "rank", _never_rank)
    with pytest.raises(ConfigError, match=message):
        auto.choose_sources(_cfg(cifar_dir, tmp_path, *extra), tmp_path)


def test_auto_without_candidates_and_too_few_scored_candidates_are_refused(cifar_dir, tmp_path, monkeypatch):
    bare = compose_config([f"paths.data_dir={cifar_dir}", *SMOKE, "source=[auto]"], tmp_path / "a")
    with pytest.raises(ConfigError, match=r"source=\[auto\] has no candidates.*source=\[auto,"):
        auto.choose_sources(bare, tmp_path / "a")
    from test_rank import poison_logits
    poison_logits(monkeypatch, "timm")
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match=r"rank.top_k=2 but only 1 candidate\(s\) could be scored \(left out: timm"):
        auto.choose_sources(_cfg(cifar_dir, tmp_path / "b", "rank.top_k=2"), tmp_path / "b")


@pytest.mark.slow
def test_auto_through_the_command_line_under_ddp_every_rank_trains_the_chosen_source(cifar_dir, tmp_path):
    """sskt-train source=[auto,...] with two gloo processes: rank 0 ranks, rank 1 (started by
    Lightning's launcher once rank 0 reaches fit) reads its record; both train the same source (a
    different one would not even have the same heads: their weights agree), results.json records
    the choice."""
    from test_defaults import train
    digest = "+callbacks.digest._target_=sskt_lightning.callbacks.WeightsDigest"
    out = tmp_path / "ddp"
    results = train(out, cifar_dir, ["trainer=ddp_cpu", digest, "method=sskt", *CANDIDATES, "rank.bootstrap=20",
                                     "rank.device=cpu", "rank.top_k=1"])
    rows = json.loads((out / auto.RECORD).read_text())["ranking"]
    assert results["source_ranking"]["chosen"] == results["sources"] == [rows[0]["candidate"]]
    digests = [json.loads((out / f"weights_digest_rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["parameters"] == digests[1]["parameters"]
