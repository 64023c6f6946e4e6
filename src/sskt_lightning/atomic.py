"""Atomic file writes in the target's own directory: every file a run writes (checkpoints,
``results.json``, ``config.yaml``, ``failed.txt``) goes through :func:`atomic_write`.

The new content is written to an unnamed file in the target's directory (Linux ``O_TMPFILE``; a
hidden ``.<name>.<pid>.tmp`` elsewhere), flushed and ``fsync``-ed, then given the target's name by
``os.replace`` and the directory is ``fsync``-ed. So a reader sees the old file or the complete new
one, never a mix; a ``kill -9`` during the write leaves the previous file intact (and, with
``O_TMPFILE``, no temporary file at all: the kernel drops an unnamed file when its writer dies); a
failed write (full disk, read-only file system) removes its temporary file and raises
:class:`~sskt_lightning.errors.OutputError` naming the file and the fix.

Stdlib only (``torch`` is imported by :func:`atomic_torch_save` when called).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from sskt_lightning.errors import OutputError

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":   # (os.kill(pid, 0) would end a process on Windows)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in ``directory`` (only those of
    processes that no longer run); returns what was removed."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TMP_RE.match(p.name)
        if m and not _pid_alive(int(m["pid"])):
            with suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, or one in its ``__cause__`` / ``__context__`` chain.

    torch.save hides a full disk that way: the write's ``OSError: [Errno 28]`` becomes the context
    of the ``RuntimeError: ... inline_container.cc ... unexpected pos`` its zip writer raises while
    closing."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(path: str | Path) -> int | None:
    """Free space on the file system holding ``path`` (its nearest existing parent), or None."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def explain_os_error(err: OSError, path: str | Path, what: str = "writing",
                     needed: int | None = None) -> OutputError:
    """An :class:`OutputError` that says what failed on which file and what to do; for a full disk,
    also the directory, how much the write needed (``needed`` bytes, when the writer knows) and how
    much is free there."""
    path = Path(path)
    if err.errno in _FULL:
        free = free_bytes(path.parent)
        space = [f"it needed about {_size(needed)}" if needed else None,
                 f"{_size(free)} free there now" if free is not None else None]
        fix = (f"the disk is full ({', '.join([repr(str(path.parent)), *filter(None, space)])})"
               + ": free space, or write the run elsewhere (hydra.run.dir=<dir on another disk>, or "
               "hydra.sweep.dir for -m)")
    elif err.errno in _READ_ONLY:
        fix = ("the directory is read-only (or not yours): choose a writable run directory with "
               "hydra.run.dir=<dir> (hydra.sweep.dir for -m)")
    elif err.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(err, NotADirectoryError):
        fix = ("a part of the path is a file, not a directory: choose another run directory with "
               "hydra.run.dir=<dir>")
    else:
        fix = "check the run directory (hydra.run.dir) is a writable directory"
    explained = OutputError(f"Could not finish {what} {str(path)!r} ({os.strerror(err.errno) if err.errno else err}); "
                            f"{fix}. Any previous version of the file is intact.")
    explained.errno = err.errno   # the cause's errno, for callers that give their own advice (the cache)
    return explained


def is_disk_full(err: BaseException) -> OSError | None:
    """The full-disk OSError (ENOSPC, EDQUOT, EFBIG) behind ``err``, if that is what it is."""
    found = os_error_in(err)
    return found if found is not None and found.errno in _FULL and not isinstance(found, OutputError) else None


def _open_tmpfile(directory: Path) -> tuple[int, str | None]:
    """(fd, name): an unnamed O_TMPFILE in ``directory`` (name None), or a named hidden temp file."""
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            return os.open(directory, flag | os.O_WRONLY, 0o644), None
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
    return -1, ""


def _link_fd(fd: int, name: str, directory: Path) -> None:
    """Give the unnamed file ``fd`` the name ``name`` (``linkat`` with ``AT_SYMLINK_FOLLOW`` on its
    /proc entry; passing a ``src_dir_fd`` makes Python call ``linkat`` rather than ``link``)."""
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.link(f"/proc/self/fd/{fd}", name, src_dir_fd=dfd, follow_symlinks=True)
    finally:
        os.close(dfd)


def _fsync_dir(directory: Path) -> None:
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], what: str = "writing",
                 needed: int | None = None) -> Path:
    """Replace ``path`` atomically by what ``write(file)`` writes into a binary file object.

    A write that fails for the file system (an OSError, also one that ``write`` wrapped in another
    exception, as torch.save does) raises :class:`OutputError` naming the file, the fix and, for a
    full disk, the space: ``needed`` (bytes, when the caller knows the size) and what is free."""
    path = Path(path)
    directory = path.parent
    tmp: str | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, _ = _open_tmpfile(directory)
        if fd < 0:
            tmp = str(directory / f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if tmp is None:   # name the unnamed file (the only window in which a kill leaves a temp)
                tmp = str(directory / f".{path.name}.{os.getpid()}.tmp")
                with suppress(FileNotFoundError):
                    os.unlink(tmp)
                _link_fd(f.fileno(), tmp, directory)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
        return path
    except Exception as err:
        os_err = os_error_in(err)
        if isinstance(err, OutputError) or os_err is None:
            raise
        raise explain_os_error(os_err, path, what, needed) from None
    finally:
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data), needed=len(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically (streamed to the temporary file, not held in memory)."""
    import torch
    return atomic_write(path, lambda f: torch.save(obj, f), what="saving the checkpoint",
                        needed=tensor_bytes(obj))


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a (nested) checkpoint: about the size torch.save writes."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
