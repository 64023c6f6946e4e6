"""Checkpoints of a run: how Lightning writes and reads them here, and what ``resume=`` accepts.

* :class:`SafeCheckpointIO` is the trainer's checkpoint I/O: it writes atomically in the run
  directory (:func:`sskt_lightning.atomic.atomic_torch_save`) and reads only through
  :func:`sskt_lightning.weights.read_file` (``torch.load(weights_only=True)``), whatever
  ``weights_only`` Lightning asks for, and never from a URL.
* :func:`prepare_resume` turns ``resume=`` into a verified local file before anything trains: an
  ``http(s)://`` URL is downloaded into the run directory (atomically) and then checked like a local
  file; a missing, empty, truncated, hostile or foreign file is refused with a message naming it.
* :func:`check_resume_fits` refuses (before training) a checkpoint of another architecture,
  method, data set, class list or source set than the run being resumed.
"""
from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sskt_lightning import weights as W
from sskt_lightning.atomic import atomic_torch_save, atomic_write
from sskt_lightning.errors import ResumeError, WeightsError

REMOTE = ("http://", "https://")
DOWNLOAD_NAME = "resume_download.ckpt"   # where a remote resume= lands, inside the run directory
TRAINING_KEYS = ("state_dict", "epoch", "global_step", "loops", "optimizer_states", "hyper_parameters")


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic writes in the checkpoint's own directory; ``weights_only=True`` reads of local files."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO takes no storage_options.")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if str(path).startswith(REMOTE) or "://" in str(path):
            raise ResumeError(f"Refusing to let Lightning load {path} itself: remote checkpoints go through "
                              "resume=<url>, which downloads and checks the file first.")
        try:
            return W.read_file(path, option="resume")
        except WeightsError as err:
            raise ResumeError(str(err)) from None


def _download(url: str, dest: Path, timeout: float = 60.0) -> Path:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            atomic_write(dest, lambda f: shutil.copyfileobj(response, f, 1 << 20),
                         what=f"downloading {url} to")
    except (TimeoutError, urllib.error.URLError, ConnectionError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ResumeError(f"resume={url}: could not download it ({type(err).__name__}: {reason}). Check the "
                          "URL, or download the file yourself and pass resume=/path/to/last.ckpt.") from None
    return dest


def prepare_resume(resume: str, output_dir: Path) -> tuple[Path, dict]:
    """The local file behind ``resume=`` and its content, checked to be a training checkpoint of
    this project (read with ``weights_only=True``). Raises :class:`ResumeError` otherwise."""
    text = str(resume)
    if text.startswith(REMOTE):
        path = _download(text, Path(output_dir) / DOWNLOAD_NAME)
    elif "://" in text:
        raise ResumeError(f"resume={text}: only local paths and http(s):// URLs are accepted.")
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise ResumeError(f"resume={text}: no such file. Give the checkpoint of the run to continue, "
                              "e.g. resume=outputs/<date>/<time>/checkpoints/last.ckpt.")
        if path.is_dir():
            raise ResumeError(f"resume={text} is a directory; give the checkpoint file itself, e.g. "
                              f"resume={path / 'checkpoints' / 'last.ckpt'}.")
    try:
        obj = W.read_file(path, option="resume")
    except WeightsError as err:
        raise ResumeError(f"{err} (resume= takes a last.ckpt written by sskt_lightning.train.)") from None
    missing = [k for k in TRAINING_KEYS if not isinstance(obj, Mapping) or k not in obj]
    if missing or not W.is_project_checkpoint(obj):
        raise ResumeError(
            f"resume={text}: {path} is not a training checkpoint of this project (it lacks "
            f"{missing or ['hyper_parameters.config / data_info']}). resume= continues a run from its "
            "checkpoints/last.ckpt; to start from other weights use source.<name>.weights (sources, "
            "teachers) or method.peers[k].weights (DML).")
    return path, obj


def _describe_sources(config: Mapping) -> list[str]:
    method = config.get("method") or {}
    if method.get("name") not in ("sskt", "kd"):
        return []
    return sorted((config.get("source") or {}).keys())


def check_resume_fits(obj: Mapping, module, path: Path | str) -> None:
    """Refuse a checkpoint that is not of this run's kind: every difference named, one message."""
    hp = obj["hyper_parameters"]
    ckpt_cfg, info = hp.get("config") or {}, hp.get("data_info") or {}
    mine = module.data_info
    diffs = []

    def compare(what: str, theirs, ours) -> None:
        if theirs != ours:
            diffs.append(f"{what}: checkpoint {theirs!r} vs this run {ours!r}")

    compare("architecture", hp.get("model_name"), module.model_name)
    compare("method", (ckpt_cfg.get("method") or {}).get("name"), module.method.name)
    compare("data", info.get("name"), mine.get("name"))
    compare("number of classes", info.get("num_classes"), mine.get("num_classes"))
    if info.get("num_classes") == mine.get("num_classes") and info.get("class_names") != mine.get("class_names"):
        compare("class names", info.get("class_names"), mine.get("class_names"))
    compare("input channels", info.get("in_chans"), mine.get("in_chans"))
    compare("sources", _describe_sources(ckpt_cfg), _describe_sources(module.cfg))
    if not diffs:   # same kind of run: the tensors must fit too (heads, peers, generator, kwargs)
        theirs = obj["state_dict"]
        ours = {k: v for k, v in module.state_dict().items() if not k.startswith("sources.")}
        missing = [k for k in ours if k not in theirs]
        unexpected = [k for k in theirs if k not in ours and not k.startswith("sources.")]
        shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}" for k in ours
                  if k in theirs and hasattr(theirs[k], "shape") and theirs[k].shape != ours[k].shape]
        if missing or unexpected or shapes:
            diffs.append(f"weights: {len(missing)} tensors missing {missing[:3]}, {len(unexpected)} "
                         f"unexpected {unexpected[:3]}, shape mismatches {shapes[:3]}")
    if diffs:
        raise ResumeError(f"resume={path} does not fit this run: " + "; ".join(diffs) + ". Resume with the "
                          "overrides of the run that wrote it (its run directory's config.yaml), or start "
                          "a new run without resume=.")
