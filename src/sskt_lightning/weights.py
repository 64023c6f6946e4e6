"""Read weight files: safetensors, torch ``.pth``/``.pth.tar``/``.ckpt`` (``weights_only=True``),
and checkpoints written by this project. Every failure is a :class:`WeightsError` naming the fix.

What timm already does is timm's: wrapper prefixes (DDP's ``module.``, ``torch.compile``'s
``_orig_mod.``) are removed by ``timm.models.clean_state_dict``. timm's file readers
(``timm.models.load_state_dict`` / ``load_checkpoint``, ``create_model(checkpoint_path=...)``) are
deliberately not used: they call ``torch.load`` themselves with an allow-list widened to
``argparse.Namespace``, raise ``RuntimeError``/bare ``FileNotFoundError`` and advise
``weights_only=False`` on a refusal. Every file here goes through :func:`read_file` instead
(``weights_only=True``, nothing allow-listed, a :class:`WeightsError` that names the option). What
remains below is what timm has no helper for: this project's checkpoints (the target under
``target.net.``), nested keys beyond timm's ``state_dict``/``model``, user-given prefixes, and the
readable key/shape mismatch report of :func:`load_into`.
"""
from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch

from sskt_lightning.errors import WeightsError

# Keys under which common training scripts nest the state dict.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
TARGET_PREFIX = "target.net."   # this project's TransferModule keeps the target under this name


def read_file(path: str | Path, option: str = "source.<name>.weights") -> dict:
    """The raw object stored in a weights file (a dict): the one loader of every checkpoint and
    weights file the harness reads (resume, sources, teachers, peers).

    Torch files are read with ``torch.load(weights_only=True)``: tensors and plain containers only,
    so a file carrying pickled code is refused instead of run. ``option`` names the setting that
    gave the path, for the error messages.
    """
    text = str(path)
    if "://" in text:
        raise WeightsError(f"{option}={text}: a URL is not a file. Download it first, or use the option "
                           "that takes a URL (source.<name>.url; resume= accepts http(s) URLs).")
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{option}={text}: the file does not exist. Check the path (absolute, or "
                           f"relative to where you run).")
    if not path.is_file():
        raise WeightsError(f"{option}={text} is not a file (a directory?); give the file itself, e.g. "
                           "<run dir>/checkpoints/last.ckpt.")
    if path.stat().st_size == 0:
        raise WeightsError(f"{option}={text}: the file is empty (0 bytes; an interrupted copy?).")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # refused pickles, truncated archives, corrupt or foreign formats
        raise WeightsError(_unreadable(f"{option}={text}", err)) from None


def _unreadable(label: str, err: Exception) -> str:
    """Why a weights file could not be loaded, for a :class:`WeightsError`: never torch's own text
    advising ``weights_only=False`` (that would run whatever the file carries)."""
    if isinstance(err, pickle.UnpicklingError):
        found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        if found:   # weights_only refused a reference to a Python object: the file could run code
            return (f"{label}: refused to load: the file holds Python objects other than tensors "
                    f"and plain containers, and loading them could run code ({found[0][:200]}). Only files "
                    "that torch.load(weights_only=True) accepts are read; re-save the weights as a plain "
                    "state dict (torch.save(model.state_dict(), ...)) or as .safetensors.")
        reason = next((ln.strip() for ln in reversed(str(err).splitlines())
                       if ln.strip() and "documentation" not in ln and "weights_only" not in ln), "")
    else:
        reason = str(err).splitlines()[0] if str(err) else ""
    return (f"Could not read weights from {label}: truncated, corrupt or not a weights file "
            f"({type(err).__name__}{': ' + reason[:200] if reason else ''}). Supported: .safetensors, or torch files (.pth, .pt, "
            ".ckpt) that torch.load(weights_only=True) accepts.")


def is_project_checkpoint(obj: dict) -> bool:
    hp = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    return isinstance(hp, dict) and "config" in hp and "data_info" in hp


def extract_state_dict(obj: dict, strip_prefixes: tuple[str, ...] = (),
                       what: str = "The weights file") -> dict[str, torch.Tensor]:
    """The tensor dict inside ``obj`` with known wrapper prefixes removed.

    Handles nesting (``state_dict``/``model``/...), this project's checkpoints (``target.net.``),
    DDP's ``module.`` / ``torch.compile``'s ``_orig_mod.`` (timm's ``clean_state_dict``) and any
    ``strip_prefixes`` given in the source config (removed only when every key has it). ``what``
    names the file (and the option that gave it) in the errors.
    """
    # imported here, not at the top: read_file (every checkpoint read) stays timm-free
    from timm.models import clean_state_dict

    if is_project_checkpoint(obj):
        sd = _tensor_dict(obj.get("state_dict"), what)
        return {k[len(TARGET_PREFIX):]: v for k, v in sd.items() if k.startswith(TARGET_PREFIX)}
    for key in _NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = _tensor_dict(obj, what)
    if not sd:
        raise WeightsError(f"{what} holds no tensors (expected a state dict).")
    sd = clean_state_dict(sd)
    for prefix in strip_prefixes:
        if prefix and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return clean_state_dict(sd)   # a wrapper prefix under a user prefix ("model.module.")


def _tensor_dict(obj, what: str) -> dict[str, torch.Tensor]:
    """The tensor entries of ``obj``, which must be a dict keyed by parameter names (str)."""
    fix = ("expected a state dict: a dict of parameter names to tensors, as "
           "torch.save(model.state_dict(), ...) writes. Re-save the weights that way.")
    if not isinstance(obj, dict):
        if isinstance(obj, torch.Tensor):
            held = f"a single tensor of shape {tuple(obj.shape)}"
        elif isinstance(obj, (list, tuple)):
            held = f"a {type(obj).__name__} of {len(obj)} items"
        else:
            held = f"a {type(obj).__name__}"
        raise WeightsError(f"{what} holds {held}, not a dict of named tensors; {fix}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise WeightsError(f"{what} holds tensors under keys that are not parameter names "
                           f"({', '.join(repr(k) for k in bad[:3])}: {type(bad[0]).__name__}); {fix}")
    return sd


def fetch_url(url: str, what: str, fix: str) -> dict:
    """Download (or read from torch's hub cache) the file at ``url``; clear error when offline.

    A file that downloads but does not load (refused by ``weights_only=True``, corrupt, not a
    weights file) is a :class:`WeightsError` naming the cached copy to delete: torch keeps it in the
    hub cache and would load that same copy on every later run.
    """
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache / os.path.basename(urlparse(url).path)   # where torch.hub puts it (no file_name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)   # a blocked host must not hang the run
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True,
                                                  check_hash=False, progress=False)
    except Exception as err:
        # torch.hub downloads to a temporary name and moves it into place when complete: a file at
        # the cached path means the download is done and loading it failed
        if cached.is_file():
            raise WeightsError(
                f"{_unreadable(f'{url} ({what})', err)} The downloaded copy stays "
                f"in torch's hub cache and would be loaded again on every run: delete {cached}, then "
                f"check that {url} serves a plain state dict (.pth or .safetensors).") from None
        if isinstance(err, (URLError, OSError, RuntimeError, ValueError)):
            raise WeightsError(
                f"Could not fetch the weights of {what} from {url} ({type(err).__name__}: "
                f"{str(err)[:200]}). Looked in the cache {cache} first. {fix}") from None
        raise
    finally:
        socket.setdefaulttimeout(previous)


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a readable error listing the first mismatches."""
    result = model.state_dict()
    missing = [k for k in result if k not in sd]
    unexpected = [k for k in sd if k not in result]
    shape = [f"{k}: file {tuple(sd[k].shape)} vs net {tuple(result[k].shape)}"
             for k in result if k in sd and sd[k].shape != result[k].shape]
    if missing or unexpected or shape:
        raise WeightsError(
            f"The weights for {what} do not fit the network {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}, "
            f"shape mismatches {shape[:3]}. Check source.<name>.name matches the architecture the "
            "file was saved from, and strip_prefix for wrapper prefixes.")
    model.load_state_dict(sd, strict=True)
