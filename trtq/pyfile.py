"""Import a user's ``.py`` file by path: data-loader scripts and TensorRT Python plugins.

Both are files trtq is pointed at (``--calib loader.py``, ``--plugins my_plugin.py``),
not modules on ``sys.path``. Each import gets a module name of its own (the file's stem
plus a hash of its resolved path), so two files called ``loader.py`` in different folders
never replace each other in ``sys.modules``. The module is registered there while it
runs, because dataclasses, pickling and ``tensorrt.plugin``'s decorators look their
module up by name; a file that fails to import is removed again.

Whatever the file raises while it is imported (a missing package, a syntax error, an
exception at top level) is the user's to fix, so it becomes one line naming the file,
the exception type and its first line, in the error type and with the fix the caller
gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from trtq.errors import UserError


def import_file(
    path: str | Path,
    *,
    kind: str,
    prefix: str,
    fix: str,
    error: type[UserError] = UserError,
    importable_folder: bool = False,
) -> ModuleType:
    """Execute the ``.py`` file at ``path`` as a new module and return it.

    ``kind`` names the file in messages ("loader script"), ``prefix`` starts the module
    name (``trtq_plugin`` -> ``trtq_plugin_<stem>_<hash>``), ``fix`` is the message's
    second half and ``error`` its type. With ``importable_folder``, the file's folder is
    on ``sys.path`` while it runs, as with ``python file.py``, so it can import its
    neighbours.
    """
    path = Path(path)
    key = path.resolve()
    stem = re.sub(r"\W", "_", key.stem)
    name = f"{prefix}_{stem}_{hashlib.sha1(str(key).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, key)
    if spec is None or spec.loader is None:
        raise error(f"cannot import {kind} {path}: not a Python file", "pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _on_sys_path(key.parent) if importable_folder else contextlib.nullcontext():
            spec.loader.exec_module(module)
    except KeyboardInterrupt:
        sys.modules.pop(name, None)
        raise
    except BaseException as exc:  # anything the file raises (sys.exit too) is the file's problem
        sys.modules.pop(name, None)
        raise error(f"cannot import {kind} {path}: {describe_exception(exc)}", fix) from exc
    return module


def describe_exception(exc: BaseException) -> str:
    """``ModuleNotFoundError: No module named 'x'``: the type and the message's first line."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # the file may have removed it itself
            sys.path.remove(str(folder))
