"""Which paths trtq may write: one output policy for every command and every writer.

Every file trtq writes (models, engines and their sidecars, stats, caches, reports, saved
outputs, loader scripts, timing caches) meets the same rules, checked twice: by the CLI
before any work starts (:func:`check_command_paths`, so a typo fails in a second rather
than after an hour of calibration), and by :mod:`trtq.fileio` at the moment of writing
(:func:`writable_target`, so the Python API, and paths that changed meanwhile, meet them
too).

* An output is a regular file or does not exist yet. A directory, FIFO, socket or device
  is refused: renaming a finished temporary file over ``/dev/null`` as root would replace
  the system's null device with a regular file.
* Two exceptions are written through a plain ``open``, with no temporary file and no
  rename: the process's own standard output or error (``/dev/stdout``, ``/dev/fd/2``,
  whatever terminal, pipe or file they are), and the null device (``/dev/null``, or any
  node with its device number). Writing to them is what
  the user means (pipe a model into another tool, throw a report away). Outputs that are
  read back when they exist (``--stats``, ``--cache``, ``--timing-cache``) and outputs with
  a companion named after them (an engine and its ``.json`` sidecar) take no stream.
* A symbolic link is followed: the file it points to is replaced, the link stays.
* The folder exists and is writable, and the name fits the file system (255 bytes).
* The files a command names are distinct, compared as files (symbolic and hard links to
  one file are that file): no output is an input, no two outputs are one file. Inputs may
  repeat (comparing a model with itself is fine), and so may outputs thrown away to the
  null device. An output with a data suffix (``.npz``, an image) directly inside a data
  folder is refused too: the next run would read it as data.
"""

from __future__ import annotations

import contextlib
import enum
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trtq.errors import UserError

#: The longest file name when the file system does not say (Linux's NAME_MAX).
DEFAULT_NAME_MAX = 255


class Role(enum.Enum):
    """What a command does with a path it is given."""

    INPUT = "input"
    #: Written; a stream (/dev/stdout, /dev/null) is fine.
    OUTPUT = "output"
    #: Written, with a companion file named after it: a regular file only.
    FILE_OUTPUT = "file output"
    #: Read if it exists, else written: never a stream, and only written when absent.
    READ_OR_WRITE = "read or write"


@dataclass(frozen=True)
class NamedPath:
    """A path as the user gave it, with the option that named it (for messages)."""

    option: str
    path: str | Path
    role: Role


@dataclass(frozen=True)
class Target:
    """Where an output goes: ``path`` (symbolic links followed), and how.

    ``stream`` targets are written through a plain ``open`` of ``path``; the others
    through a temporary file renamed onto ``path``.
    """

    path: Path
    stream: bool


def writable_target(path: str | Path, option: str = "output", *, stream_ok: bool = True) -> Target:
    """Where and how ``path`` may be written, or a one-line :class:`UserError` why not."""
    given = Path(path)
    if not str(path):
        raise UserError(f"{option}: the path is empty", "name a file")
    _check_name(given, option)
    try:
        info = os.stat(given)
    except FileNotFoundError:
        info = None
    except OSError as exc:  # a loop of links, a folder in the path that is a file, ...
        raise UserError(f"{option} {path}: {exc.strerror}", "name a file trtq can write") from exc
    if info is not None and _is_stream(info):
        if not stream_ok:
            raise UserError(
                f"{option} {path} is a stream, but this file is read back or has a "
                "companion file named after it",
                "name a regular file",
            )
        return Target(given, stream=True)
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise UserError(f"{option} {path} is {_kind(info.st_mode)}", _fix_for(info.st_mode))
    target = given.resolve()
    _check_folder(target, option, path)
    return Target(target, stream=False)


def check_command_paths(paths: Sequence[NamedPath]) -> None:
    """Every output writable (:func:`writable_target`) and distinct from every other path."""
    for named in paths:
        if named.role is Role.INPUT:
            continue
        if named.role is Role.READ_OR_WRITE and Path(named.path).is_file():
            continue  # only read: it need not be writable, but must still be distinct
        writable_target(named.path, named.option, stream_ok=named.role is Role.OUTPUT)
    for index, first in enumerate(paths):
        for second in paths[index + 1 :]:
            if first.role is Role.INPUT and second.role is Role.INPUT:
                continue
            if same_file(first.path, second.path) and not _is_null(first.path):
                # Named from the later path: the one that repeats an earlier one.
                output, other = (first, second) if second.role is Role.INPUT else (second, first)
                raise _clash(output, other)
    inputs = [named for named in paths if named.role is Role.INPUT]
    for named in paths:
        if named.role is not Role.INPUT:
            _check_not_data(named, inputs)


def same_file(first: str | Path, second: str | Path) -> bool:
    """Whether two paths name one file: one inode when both exist, else one resolved path."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        pass
    try:
        return Path(first).resolve() == Path(second).resolve()
    except (OSError, RuntimeError):  # a loop of symbolic links: no file to be
        return False


def name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system of ``folder`` takes."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def _is_stream(info: os.stat_result) -> bool:
    """This process's stdout or stderr (any kind of file), or a node of the null device."""
    if stat.S_ISCHR(info.st_mode) and info.st_rdev == _NULL_DEVICE:
        return True  # the null device
    streams = []
    for fd in (1, 2):
        with contextlib.suppress(OSError):  # closed
            streams.append(os.fstat(fd))
    return any((info.st_dev, info.st_ino) == (s.st_dev, s.st_ino) for s in streams)


def _is_null(path: str | Path) -> bool:
    """Whether ``path`` is the null device, which any number of outputs may share."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == _NULL_DEVICE


def _null_device() -> int | None:
    with contextlib.suppress(OSError):
        info = os.stat(os.devnull)
        if stat.S_ISCHR(info.st_mode):
            return info.st_rdev
    return None


#: The device number of /dev/null (None where it is missing or not a device).
_NULL_DEVICE = _null_device()


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def _fix_for(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "name a file (inside the directory, if that is where it should go)"
    return "name a regular file (trtq writes streams only to /dev/stdout, /dev/stderr, /dev/null)"


def _check_folder(target: Path, option: str, given: str | Path) -> None:
    folder = target.parent
    if not folder.is_dir():
        raise UserError(f"{option}: folder {Path(given).parent} does not exist", "create it first")
    _check_name(target, option)
    # The effective ids decide what the process may create (they differ under setuid/sudo).
    effective = os.access in os.supports_effective_ids
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=effective):
        raise UserError(
            f"{option}: folder {folder} is not writable", "choose another folder or fix its rights"
        )


def _check_name(path: Path, option: str) -> None:
    limit = name_max(path.parent if path.parent.is_dir() else Path("."))
    size = len(os.fsencode(path.name))
    if size > limit:
        raise UserError(
            f"{option}: file name {path.name[:40]}... is {size} bytes, over the "
            f"{limit}-byte limit of its file system",
            "choose a shorter name",
        )


def _clash(output: NamedPath, other: NamedPath) -> UserError:
    problem = f"{output.option} {output.path} is the same file as {other.option} {other.path}"
    if other.role is Role.INPUT:
        return UserError(problem, "writing it would destroy the input: choose another path")
    return UserError(problem, "give each output a path of its own")


def _check_not_data(output: NamedPath, inputs: list[NamedPath]) -> None:
    from trtq.calib.data.formats import ARRAY_SUFFIXES, IMAGE_SUFFIXES

    path = Path(output.path)
    if path.suffix.lower() not in ARRAY_SUFFIXES + IMAGE_SUFFIXES:
        return
    for named in inputs:
        if Path(named.path).is_dir() and same_file(path.parent or ".", named.path):
            raise UserError(
                f"{output.option} {output.path} is in the data folder of {named.option} "
                f"{named.path}, where the next run would read it as data",
                "write it outside the data folder",
            )
