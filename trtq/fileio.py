"""Atomic file output: a reader never sees a half-written model, cache or report.

Everything trtq writes goes to a temporary file in the destination folder and is renamed
over the target only once complete, so an interrupted run leaves the previous file (or
nothing) behind, never a corrupt one. Which targets may be written at all is
:mod:`trtq.outputs`' policy, applied here to every write; streams it allows
(``/dev/stdout``, ``/dev/null``) are written in place.

Failures of the operating system while writing (a read-only folder, a full disk, a file
size limit, a closed pipe) become one-line :class:`UserError` naming the target, and the
temporary file is removed. A writer killed outright cannot remove its temporary file; the
names say whose they are (``.NAME.trtq-PID-XXXXXXXX.tmp``), and the next write of the same
target removes the stale ones: those whose writing process is gone, and those untouched for
:data:`STALE_AFTER_S` seconds. The process check is exact on one machine; the age covers a
dead writer whose process id was reused, and writers on other machines sharing the folder.
Two trtq processes writing one target at the same time are not supported.

Models over 2 GB keep their weights in a data file beside them. Its name is new on every
save (``NAME.trtq-<16 hex>.data``), so writing it never touches the data of the model in
place; the model's rename is the single commit point; data files of earlier saves are
removed after it. A crash at any step leaves the old model with its old data, or the new
model with its new data, plus at most an unreferenced data file the next save removes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from trtq.errors import UserError
from trtq.outputs import name_max, writable_target

if TYPE_CHECKING:  # onnx is imported where models are saved: the rest stays light
    import onnx

log = logging.getLogger(__name__)

#: A temporary file untouched this long is stale even if its writer's process id is in use.
STALE_AFTER_S = 3600

_TEMP_TAG = "trtq-"
_TEMP_SUFFIX = ".tmp"
#: Room a temporary or data name needs beyond the target's key: ".", ".trtq-PID-XXXXXXXX.tmp".
_NAME_OVERHEAD = 40


@contextlib.contextmanager
def atomic_path(target: str | Path, *, stream_ok: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    A stream target (``/dev/stdout``, ``/dev/null``; see :mod:`trtq.outputs`) is yielded
    itself, to be opened and written in place; ``stream_ok=False`` refuses streams for
    files that are read back or have a companion named after them.
    """
    where = writable_target(target, stream_ok=stream_ok)
    if where.stream:
        with os_errors(target):
            yield where.path
        return
    with os_errors(target):
        sweep_stale_temps(where.path)
        tmp = _new_temp(where.path)
    try:
        with os_errors(target):
            yield tmp
            os.replace(tmp, where.path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def os_errors(target: str | Path) -> Iterator[None]:
    """Turn an OSError while writing ``target`` into a one-line :class:`UserError`."""
    try:
        yield
    except OSError as exc:
        raise write_error(target, exc) from exc


def write_error(target: str | Path, exc: OSError) -> UserError:
    """One line naming the target, what the system said, and what to do."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return UserError(f"cannot write {target}: {reason}", _FIXES.get(exc.errno, "check the path"))


_FIXES = {
    errno.ENOSPC: "free space on the disk or write somewhere else",
    errno.EDQUOT: "free space within your quota or write somewhere else",
    errno.EFBIG: "the file size limit (ulimit -f) is too small for it: raise it",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "choose a folder you may write to, or fix its rights",
    errno.EPERM: "choose a folder you may write to, or fix its rights",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.EPIPE: "the reader of the pipe exited early: keep it reading, or write to a file",
    errno.EISDIR: "name a file, not a directory",
}


def ignore_file_size_signal() -> None:
    """Make a file size limit (``ulimit -f``) an error of the write, not a killed process.

    By default the system kills a process that writes past RLIMIT_FSIZE with SIGXFSZ
    (leaving its temporary file behind); ignored, the write fails with EFBIG, which
    :func:`os_errors` reports. Called by the CLI at start; process-wide, so a library
    does not do it behind its caller's back. Signals can only be set from the main thread.
    """
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _read_umask() -> int:
    # The only way to read the umask is to set it; done once, at import, before any threads.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, payload: object) -> None:
    """Indented JSON with a final newline, written atomically."""
    import json

    write_text(target, json.dumps(payload, indent=2) + "\n")


def save_model(
    model: onnx.ModelProto, target: str | Path, *, external_data_over: int | None = None
) -> None:
    """Save a model atomically; models over 2 GB get their weights in a data file beside it.

    ``external_data_over`` (bytes, default protobuf's 2 GB limit) is where that starts;
    tests lower it to exercise the path with small models.
    """
    import onnx

    from trtq.proto import serialized

    data = serialized(model)
    if data is not None and (external_data_over is None or len(data) < external_data_over):
        write_bytes(target, data)
        return
    where = writable_target(target, stream_ok=False).path
    key = _key(where)
    data_name = f"{key}.{_TEMP_TAG}{secrets.token_hex(8)}.data"
    # onnx moves the weights out of the proto it saves, so save a copy.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with os_errors(target):
        sweep_stale_temps(where)
        staging = Path(tempfile.mkdtemp(_TEMP_SUFFIX, _temp_prefix(where), where.parent))
    try:
        with os_errors(target):
            onnx.save(copy, staging / where.name, save_as_external_data=True, location=data_name)
            # A new name, referenced by no model in place yet: renaming it changes nothing.
            os.replace(staging / data_name, where.with_name(data_name))
            try:
                os.replace(staging / where.name, where)  # the commit point of model + data
            except BaseException:
                where.with_name(data_name).unlink(missing_ok=True)
                raise
        _remove_replaced_data(where, keep=data_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sweep_stale_temps(target: Path) -> None:
    """Remove temporary files of ``target`` that a killed writer left behind (see above)."""
    pattern = re.compile(re.escape(_prefix(target)) + r"(\d+)-[^.]*\.tmp")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match[1])
        if _process_alive(pid) and not _untouched(entry.path):
            continue  # a write in progress (this process's own, too)
        log.info("removing %s, left behind by an interrupted write (process %d)", entry.path, pid)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _new_temp(target: Path) -> Path:
    fd, name = tempfile.mkstemp(_TEMP_SUFFIX, _temp_prefix(target), target.parent)
    # mkstemp creates the file 0600; give the result the mode a plain open() would (a
    # serving container running as another user must be able to read an engine).
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
    finally:
        os.close(fd)
    return Path(name)


def _temp_prefix(target: Path) -> str:
    """``.NAME.trtq-PID-``: whose temporary file it is, and for which target."""
    return f"{_prefix(target)}{os.getpid()}-"


def _prefix(target: Path) -> str:
    return f".{_key(target)}.{_TEMP_TAG}"


def _key(target: Path) -> str:
    """The target's name, or for names too long to extend, a prefix of it plus a hash.

    Temporary and data file names add up to :data:`_NAME_OVERHEAD` bytes to the key, and
    must still fit the file system; the hash keeps keys of different long names apart.
    """
    raw = os.fsencode(target.name)
    limit = name_max(target.parent) - _NAME_OVERHEAD
    if len(raw) <= limit:
        return target.name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return raw[: limit - 17].decode("utf-8", "ignore") + "~" + digest


def _untouched(path: str) -> bool:
    """Nothing in ``path`` (a file, or a staging folder and its files) changed for a while."""
    try:
        newest = os.stat(path).st_mtime
        if os.path.isdir(path):
            newest = max([newest, *(e.stat().st_mtime for e in os.scandir(path))])
    except OSError:
        return False
    return time.time() - newest > STALE_AFTER_S


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, owned by another user
        return True
    return True


def _remove_replaced_data(model: Path, keep: str) -> None:
    """Data files of earlier saves of ``model`` (the committed model refers to ``keep``)."""
    pattern = re.compile(re.escape(f"{_key(model)}.{_TEMP_TAG}") + r"[0-9a-f]{16}\.data")
    for entry in os.scandir(model.parent):
        if entry.name != keep and pattern.fullmatch(entry.name):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
