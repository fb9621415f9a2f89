"""Atomic file output: a reader never sees a half-written model, cache or report.

Everything trtq writes goes to a temporary file in the destination folder and
is renamed over the target only once complete, so an interrupted run leaves
the previous file (or nothing) behind, never a corrupt one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from trtq.errors import UserError

if TYPE_CHECKING:  # onnx is imported where models are saved: the rest stays light
    import onnx


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"output folder does not exist: {folder}", "create it first")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    # mkstemp creates the file 0600; give the result the mode a plain open() would (a
    # serving container running as another user must be able to read an engine).
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


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


def save_model(model: onnx.ModelProto, target: str | Path) -> None:
    """Save a model atomically; models over 2 GB get their weights in ``<name>.data`` beside it."""
    import onnx

    target = Path(target)
    if model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:
        write_bytes(target, model.SerializeToString())
        return
    data_name = f"{target.name}.data"
    # onnx moves the weights out of the proto it saves, so save a copy. The weights
    # file is renamed into place before the model that references it.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        onnx.save(copy, Path(tmp, target.name), save_as_external_data=True, location=data_name)
        os.replace(Path(tmp, data_name), target.with_name(data_name))
        os.replace(Path(tmp, target.name), target)
