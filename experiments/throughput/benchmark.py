"""Training throughput (images/second) of scratch and SSKT with 1 and 2 ResNet-50 sources.

Runs the real TransferModule and Lightning Trainer on synthetic 32 px images (the data pipeline is
not what is measured), on whatever device is present:

    python experiments/throughput/benchmark.py                       # CPU or the GPU if present
    python experiments/throughput/benchmark.py --precision bf16-mixed --channels-last --batch 128

Sources get random weights (no download); their cost does not depend on the weights' values.
Prints a markdown table and writes it (with the device name) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from sskt_lightning.callbacks import ThroughputMeter
from sskt_lightning.compose import compose_config
from sskt_lightning.data.augment import BatchAugment, normalize
from sskt_lightning.module import TransferModule

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class SyntheticData(L.LightningDataModule):
    """Random uint8 CIFAR-shaped images; normalised and augmented on the device like the real ones."""

    def __init__(self, n: int, batch: int, size: int = 32, classes: int = 10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.batch, self.augment = batch, BatchAugment(4, True)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y, torch.arange(len(self.y))), batch_size=self.batch,
                          shuffle=True, drop_last=True)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y, i = batch
        return normalize(self.augment(x), MEAN, STD), y, i


def measure(method: list[str], args) -> float:
    overrides = ["model=" + args.model, "data=cifar10", *method, f"channels_last={args.channels_last}"]
    cfg = compose_config(overrides, "/tmp/sskt_benchmark")
    info = {"name": "synthetic", "num_classes": 10, "in_chans": 3, "image_size": [32, 32],
            "mean": list(MEAN), "std": list(STD), "multi_label": False, "class_names": [str(i) for i in range(10)]}
    module = TransferModule(OmegaConf.to_container(cfg, resolve=True), info)
    meter = ThroughputMeter()
    trainer = L.Trainer(accelerator="auto", devices=1, precision=args.precision, max_epochs=args.epochs,
                        limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
                        benchmark=True)
    trainer.fit(module, datamodule=SyntheticData(args.batch * args.steps, args.batch))
    return meter.images_per_second


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=2, help="the first epoch is warm-up, not counted")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--source-size", type=int, default=74, help="source input px (reference: 74 for CIFAR)")
    p.add_argument("--out", type=Path, default=Path("experiments/throughput/results.json"))
    args = p.parse_args(argv)
    src = ["source.{k}.pretrained=false", "source.{k}.input_size=" + str(args.source_size), "source.{k}.name=resnet50"]
    cases = {
        "scratch": ["method=scratch"],
        "sskt, 1 ResNet-50 source": ["method=sskt", "source=[imagenet_resnet50]",
                                     *(s.format(k="imagenet_resnet50") for s in src)],
        "sskt, 2 ResNet-50 sources": ["method=sskt", "source=[imagenet_resnet50,places365_resnet50]",
                                      *(s.format(k=k) for k in ("imagenet_resnet50", "places365_resnet50") for s in src)],
    }
    rows = []
    for name, overrides in cases.items():
        start = time.perf_counter()
        ips = measure(overrides, args)
        rows.append({"case": name, "images_per_s": round(ips, 1), "seconds": round(time.perf_counter() - start, 1)})
    dev = device_name()
    print(f"\n{dev} | {args.model} | batch {args.batch} | {args.precision} | channels_last={args.channels_last} "
          f"| sources at {args.source_size} px")
    print("| case | images/s |\n|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['images_per_s']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"device": dev, "torch": torch.__version__, "settings": {k: str(v) for k, v in vars(args).items()},
              "rows": rows}
    history = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.write_text(json.dumps([*history, record], indent=2))


if __name__ == "__main__":
    import warnings
    warnings.filterwarnings("ignore", message=".*RANDOM weights")
    main()
