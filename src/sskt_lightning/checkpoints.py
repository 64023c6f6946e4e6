"""Checkpoints of a run: how Lightning writes and reads them here, and what ``resume=`` accepts.

* :class:`SafeCheckpointIO` is the trainer's checkpoint I/O: it writes atomically in the run
  directory (:func:`sskt_lightning.atomic.atomic_torch_save`) and reads only through
  :func:`sskt_lightning.weights.read_file` (``torch.load(weights_only=True)``), whatever
  ``weights_only`` Lightning asks for, and never from a URL.
* :func:`prepare_resume` turns ``resume=`` into a verified local file before anything trains: an
  ``http(s)://`` URL is downloaded into the run directory (atomically) and then checked like a local
  file; a missing, empty, truncated, hostile or foreign file is refused with a message naming it.
* :func:`check_resume_fits` refuses (before training) a checkpoint of another architecture,
  method, data set, class list or source set than the run being resumed, and then one whose
  recorded config (``hyper_parameters.config``) differs from this run's in any key that defines
  the experiment (:func:`config_differences`): seed, data and split, method, model, sources,
  optimizer and schedule, precision, training length, callbacks that act on training. Only the
  keys of :func:`keys_that_may_differ` (where files are, logging, progress, devices, speed) and
  callbacks that only observe may change; ``trainer.max_epochs`` may grow when the schedule does
  not depend on it (:data:`LENGTH_FREE_SCHEDULES`).
"""
from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from sskt_lightning import weights as W
from sskt_lightning.atomic import atomic_torch_save, atomic_write
from sskt_lightning.errors import ResumeConfigError, ResumeError, WeightsError

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


def _uses_sources(method: Mapping) -> bool:
    """Whether the method of a recorded config takes sources (its class's ``needs_sources``); a
    class that cannot be imported here counts as taking them (its sources are compared)."""
    target = method.get("_target_")
    if not target:
        return False
    from hydra.utils import get_class
    try:
        cls = get_class(str(target))
    except Exception:
        return True
    return bool(getattr(cls, "needs_sources", True))


def _describe_sources(config: Mapping) -> list[str]:
    if not _uses_sources(config.get("method") or {}):
        return []
    return sorted((config.get("source") or {}).keys())


# What a resume may change besides the keys loggers.NOT_IN_GROUP leaves out of the experiment's
# group (paths, loggers, devices, progress bar, workers, tags, extras, ...; but not the seed, which
# the group leaves out so that seeds aggregate): where the data is read from, the evaluation batch
# (BatchNorm is in eval mode there: accuracy is per image), the distributed strategy that goes with
# the devices, logging cadence, and kernel choices - compile.* and channels_last (a compiled run
# resumes an eager one, see compiling.py), cudnn benchmark / deterministic algorithms. These change
# floating-point rounding at most, never the data, the objective or the schedule.
RESUME_MAY_DIFFER = ("data.data_dir", "data.download", "data.eval_batch_size", "trainer.strategy",
                     "trainer.sync_batchnorm", "trainer.enable_model_summary", "trainer.log_every_n_steps",
                     "trainer.benchmark", "trainer.deterministic", "compile", "channels_last")
# Learning-rate schedules that do not depend on trainer.max_epochs: with one of these (or none,
# stepped per epoch) a resume may extend the run with a larger trainer.max_epochs. optim=sgd
# (multistep_by_fraction) decays at fractions of max_epochs and sgd_cosine spreads its steps over
# the whole run: there a longer run is another schedule, i.e. another run.
LENGTH_FREE_SCHEDULES = ("sskt_lightning.optim.step_decay",)
ABSENT = object()
# model keys added after checkpoints were first written, with the value every older run had (a
# checkpoint without them ran that way): the fine-tuning file, the frozen backbone, weight averaging
MODEL_KEYS_ADDED = {"weights": None, "freeze": None, "ema": None, "ema_warmup": True, "ema_bn": "average",
                    "ema_bn_images": 1024}


def _as_older_runs_had(theirs: Mapping) -> Mapping:
    """The checkpoint's config with the keys added since it was written filled in as its run had
    them: the model keys of :data:`MODEL_KEYS_ADDED`, and each method option the checkpoint lacks
    with its constructor's default (the house rule: a new option's default keeps the old behaviour,
    e.g. SSKT's ``consistency=none``, KD's ``loss=kd``, ``unlabeled=false``). So resuming a run
    written before an option existed is no config difference, unless this run sets the option."""
    import copy
    import inspect
    theirs = copy.deepcopy(dict(theirs))
    model = theirs.get("model")
    if isinstance(model, Mapping):
        theirs["model"] = {**model, **{k: v for k, v in MODEL_KEYS_ADDED.items() if k not in model}}
    method = theirs.get("method")
    target = method.get("_target_") if isinstance(method, Mapping) else None
    if target:
        from hydra.utils import get_class
        try:
            params = inspect.signature(get_class(str(target)).__init__).parameters.values()
        except Exception:     # not importable here: nothing to fill in, every difference counts
            return theirs
        defaults = {p.name: p.default for p in params
                    if p.name != "self" and p.default is not inspect.Parameter.empty}
        theirs["method"] = {**method, **{k: v for k, v in defaults.items() if k not in method}}
    return theirs


def keys_that_may_differ() -> tuple[str, ...]:
    """Config keys (dotted prefixes) a resume may change: :data:`loggers.NOT_IN_GROUP` (overrides that
    do not change the experiment) less the seed and Hydra's own, plus :data:`RESUME_MAY_DIFFER`."""
    from sskt_lightning.loggers import NOT_IN_GROUP
    same_experiment = [p.rstrip("=.").replace("/", ".") for p in NOT_IN_GROUP
                       if not p.startswith(("seed", "hydra"))]
    return (*same_experiment, *RESUME_MAY_DIFFER)


def _only_observes(node) -> bool:
    """A callback entry whose class cannot change what the run computes (progress bars, checkpoint
    writers, learning-rate monitors, the weights digest, or a class that says
    ``affects_training = False``): it may be added or left out on resume."""
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not target:
        return False
    from hydra.utils import get_class
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.callbacks.progress import ProgressBar

    from sskt_lightning.callbacks import WeightsDigest
    try:
        cls = get_class(str(target))
    except Exception:     # not importable here: cannot tell, so it counts
        return False
    return (issubclass(cls, (ProgressBar, ModelCheckpoint, LearningRateMonitor, WeightsDigest))
            or getattr(cls, "affects_training", True) is False)


def _walk(theirs, ours, key: str):
    """(key, checkpoint value, this run's value) for every difference; a subtree present on one
    side only is one difference."""
    if isinstance(theirs, Mapping) and isinstance(ours, Mapping):
        for k in [*theirs, *(k for k in ours if k not in theirs)]:
            sub = f"{key}.{k}" if key else str(k)
            a, b = theirs.get(k, ABSENT), ours.get(k, ABSENT)
            if a is ABSENT or b is ABSENT:
                yield sub, a, b
            else:
                yield from _walk(a, b, sub)
    elif theirs != ours or isinstance(theirs, bool) != isinstance(ours, bool):   # 1 == True, not the same
        yield key, theirs, ours


def _may_extend(theirs: Mapping, ours: Mapping) -> bool:
    """A larger trainer.max_epochs whose schedule does not depend on it."""
    a = (theirs.get("trainer") or {}).get("max_epochs")
    b = (ours.get("trainer") or {}).get("max_epochs")
    if not (isinstance(a, int) and isinstance(b, int) and b > a):
        return False
    optim = ours.get("optim") or {}
    schedule = optim.get("scheduler")
    if schedule is None:
        return True
    return (schedule.get("_target_") in LENGTH_FREE_SCHEDULES
            and str(optim.get("interval") or "epoch") == "epoch")


def config_differences(theirs: Mapping, ours: Mapping, uses_sources: bool = True) -> list[tuple[str, object, object]]:
    """Where this run's resolved config differs from the checkpoint's in what defines the
    experiment: ``[(dotted key, checkpoint value, this run's value)]``, in config order. Keys added
    since the checkpoint was written count as the values its run had (:func:`_as_older_runs_had`)."""
    theirs = _as_older_runs_had(theirs)
    allowed = keys_that_may_differ() + (() if uses_sources else ("source",))
    theirs_cb, ours_cb = theirs.get("callbacks") or {}, ours.get("callbacks") or {}
    for name in {*theirs_cb, *ours_cb}:
        sides = [side[name] for side in (theirs_cb, ours_cb) if side.get(name)]
        if all(_only_observes(node) for node in sides):
            allowed += (f"callbacks.{name}",)
    if _may_extend(theirs, ours):
        allowed += ("trainer.max_epochs",)
    return [(key, a, b) for key, a, b in _walk(theirs, ours, "")
            if not any(key == p or key.startswith(p + ".") for p in allowed)]


def _show(value) -> str:
    text = "(absent)" if value is ABSENT else repr(value)
    return text if len(text) <= 160 else text[:150] + " ...}"


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
    mine = OmegaConf.to_container(module.cfg) if isinstance(module.cfg, DictConfig) else module.cfg
    changed = config_differences(ckpt_cfg, mine, uses_sources=module.method.needs_sources)
    if changed:
        keys = {key for key, _, _ in changed}
        extend = (" trainer.max_epochs may only grow, and only when the learning-rate schedule does not "
                  "depend on it (optim.scheduler=null or sskt_lightning.optim.step_decay, stepped per epoch); "
                  "optim=sgd decays at fractions of max_epochs." if "trainer.max_epochs" in keys else "")
        raise ResumeConfigError(
            f"resume={path} was trained with other settings than this run; a resume continues the same "
            "run, so these must not change (checkpoint value -> this run's value):\n  "
            + ";\n  ".join(f"{key}: {_show(a)} -> {_show(b)}" for key, a, b in changed)
            + "\nResume with the checkpoint's values (all in the config.yaml of the run directory that wrote "
            "it: drop or change the overrides above), or start a new run without resume=." + extend)
