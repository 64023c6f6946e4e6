"""What the weight average's BatchNorm statistics do to a finished run: one checkpoint, four networks.

    python experiments/fashion_transfer/ema_bn.py RUN_DIR [RUN_DIR ...] [--images 4096] [--split test|val]

For each run directory (a run of ``benchmark.py`` with ``model.ema``: ``checkpoints/last.ckpt``
holds the average in ``state_dict`` and the raw weights under ``"ema"``) the test accuracy (%) of

* ``ema``: the averaged weights with the averaged BatchNorm buffers (what the harness evaluates,
  ``AveragedModel(use_buffers=True)``);
* ``ema, raw BN``: the averaged weights with the raw network's buffers (what USB's and the FixMatch
  PyTorch reimplementations' EMA do: they copy buffers);
* ``ema, BN recomputed``: the averaged weights with BatchNorm statistics recomputed by
  ``torch.optim.swa_utils.update_bn`` over ``--images`` images of the run's unlabeled pool (runs
  without one: its labelled images), unaugmented, in train mode: the images ``model.ema_bn=recompute``
  uses (``ImageDataModule.statistics_images``);
* ``raw``: the raw weights with their own buffers;

and the median relative distance ``|ema - raw| / |raw|`` of the convolution weights. Evaluated in
float32 on the checkpoint's recorded data (the test split of its classes), one thread, so the ``ema`` and
``raw`` columns can differ from the bf16 run's results.json by a few tenths. A diagnostic of finished
runs: nothing is selected with it. ``--split val`` scores the validation split instead (its ``ema``
column is then the run's ``last_val_acc``): for search trials, to see what the selection would have
seen with other BatchNorm statistics.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from sskt_lightning import eval as E
from sskt_lightning import weights as W
from sskt_lightning.data.datamodule import normalize


def networks(ckpt: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(average, raw) target networks of a checkpoint written with ``model.ema``."""
    if not isinstance(ckpt.get("ema"), dict):
        raise SystemExit("the checkpoint has no weight average (it was trained without model.ema)")
    average = E.build_target(ckpt).eval()
    raw_state = {**ckpt["state_dict"], **ckpt["ema"]["raw_state_dict"]}
    raw = copy.deepcopy(average)
    W.load_into(raw, W.extract_state_dict({**ckpt, "state_dict": raw_state}), "the raw target")
    return average, raw.eval()


def with_buffers_of(net: torch.nn.Module, donor: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(net)
    buffers = dict(donor.named_buffers())
    for name, b in out.named_buffers():
        b.copy_(buffers[name])
    return out


def recomputed(net: torch.nn.Module, images: torch.Tensor, mean, std) -> torch.Tensor:
    out = copy.deepcopy(net)
    loader = DataLoader(TensorDataset(normalize(images, mean, std)), batch_size=256)
    update_bn(loader, out)
    return out.eval()


@torch.no_grad()
def accuracy(net: torch.nn.Module, loader, mean, std) -> float:
    correct = total = 0
    for x, y, *_ in loader:
        correct += int((net(normalize(x, mean, std)).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def run(run_dir: Path, n_images: int, split: str = "test") -> dict:
    if split not in ("test", "val"):
        raise SystemExit(f"--split {split!r}: choose test or val")
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = E.read_checkpoint(ckpt_path)
    average, raw = networks(ckpt)
    dm = E.recorded_data_module(dict(ckpt["hyper_parameters"]["config"]["data"]), ckpt_path, user_data_dir=False)
    dm.setup("fit")
    pool = dm.statistics_images(n_images)      # the images model.ema_bn=recompute uses
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    with torch.no_grad():
        dist = sorted(float((a - r).norm() / r.norm()) for a, r in zip(average.parameters(), raw.parameters())
                      if a.dim() == 4)
    return {"run": str(run_dir), "ema": accuracy(average, loader, dm.mean, dm.std),
            "ema_raw_bn": accuracy(with_buffers_of(average, raw), loader, dm.mean, dm.std),
            "ema_bn_recomputed": accuracy(recomputed(average, pool, dm.mean, dm.std), loader,
                                          dm.mean, dm.std),
            "raw": accuracy(raw, loader, dm.mean, dm.std), "conv_distance": dist[len(dist) // 2]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (holding checkpoints/last.ckpt)")
    p.add_argument("--images", type=int, default=4096, help="images for the recomputed BatchNorm statistics")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="the split scored (default test; val: what a search's selection sees)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{args.split} accuracy (%):\n")
    print("| run | ema | ema, raw BN | ema, BN recomputed | raw | conv \\|ema − raw\\| / \\|raw\\| |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for run_dir in args.runs:
        r = run(run_dir, args.images, args.split)
        rows.append(r)
        name = "/".join(run_dir.parts[-3:])
        print(f"| {name} | {r['ema']:.2f} | {r['ema_raw_bn']:.2f} | {r['ema_bn_recomputed']:.2f} | {r['raw']:.2f} "
              f"| {r['conv_distance']:.3f} |", flush=True)
    if len(rows) > 1:
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("ema", "ema_raw_bn", "ema_bn_recomputed", "raw")}
        print(f"| mean | {mean['ema']:.2f} | {mean['ema_raw_bn']:.2f} | {mean['ema_bn_recomputed']:.2f} "
              f"| {mean['raw']:.2f} | |")


if __name__ == "__main__":
    main()
