"""Plugins into TensorRT's registry, before a model is parsed or an engine deserialized.

TensorRT finds a plugin by name in its registry: the ONNX parser when it meets a
node it has no importer for, the runtime when a plan names one. So every plugin
is registered first, and one that does not load is reported as that, in one line,
instead of surfacing later as an unrelated "unsupported operator" or a failed
deserialization. A plugin is a shared library (``.so``, loaded by the registry) or
a Python module (``.py``, ``tensorrt.plugin``, TensorRT >= 10.6) whose decorators
register its plugins when it is imported. Rewriting ONNX nodes for a plugin is
another job: :mod:`trtq.graph.plugins`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from trtq.errors import UserError
from trtq.pyfile import import_file
from trtq.trt import first_line

log = logging.getLogger(__name__)


def load_plugins(trt: ModuleType, logger: Any, plugins: Iterable[str | Path]) -> None:
    """Register TensorRT's bundled plugins, then each library of ``plugins``, in order.

    Done before parsing, because the ONNX parser looks up a node's plugin in the
    registry when it meets it. A library that does not load would otherwise
    surface later as an unrelated "unsupported operator". A ``.py`` file is a Python
    plugin module (``tensorrt.plugin``, TensorRT >= 10.6): importing it registers its
    plugins (see :func:`import_plugin_module`).
    """
    plugins = [Path(p) for p in plugins]
    init = getattr(trt, "init_libnvinfer_plugins", None)
    if init is not None and not init(logger, ""):
        log.debug("TensorRT's bundled plugins were not registered")
    if not plugins:
        return
    registry = trt.get_plugin_registry()
    for path in plugins:
        if not path.is_file():
            raise UserError(f"plugin library not found: {path}", "check the path")
        if registry is None:
            raise UserError(
                f"cannot load plugin library {path}: TensorRT has no plugin registry",
                "check that TensorRT and a GPU are usable here",
            )
        if path.suffix == ".py":
            import_plugin_module(path)
            continue
        try:
            handle = registry.load_library(str(path))
        except Exception as exc:  # the bindings raise RuntimeError or TypeError
            raise UserError(
                f"TensorRT could not load plugin library {path}: {first_line(exc)}",
                "check that it was built for this TensorRT and that its dependencies are "
                "on LD_LIBRARY_PATH",
            ) from exc
        if handle is None:
            raise UserError(
                f"TensorRT could not load plugin library {path} (see the log above)",
                "check that it was built for this TensorRT, its dependencies are on "
                "LD_LIBRARY_PATH, and no plugin in it is registered twice",
            )
        log.debug("loaded plugin library %s", path)


#: Python plugin modules imported so far, by resolved path: a second import would register
#: the same plugins again, which ``tensorrt.plugin`` refuses.
_PLUGIN_MODULES: dict[Path, ModuleType] = {}


def import_plugin_module(path: str | Path) -> ModuleType:
    """Import the Python plugin module at ``path`` once; its decorators register its plugins."""
    key = Path(path).resolve()
    if key in _PLUGIN_MODULES:
        return _PLUGIN_MODULES[key]
    module = import_file(
        path,
        kind="plugin module",
        prefix="trtq_plugin",
        fix="check that it imports with this TensorRT (Python plugins need TensorRT >= 10.6) "
        "and that no other module registers the same plugins",
    )
    _PLUGIN_MODULES[key] = module
    log.debug("imported plugin module %s", path)
    return module


def unique_plugins(plugins: Sequence[str | Path] | None) -> list[Path]:
    """``plugins`` as paths, each file once, in the order given.

    Only what the caller names is ever loaded: an engine's sidecar records the plugins
    it was built with, but that record is used in messages only (see
    :mod:`trtq.runtime.engine_loading`), and files next to an engine are never looked at.
    """
    if isinstance(plugins, str | Path):
        raise UserError(
            f"plugins must be a list of paths, not one {type(plugins).__name__}",
            f"pass plugins=[{str(plugins)!r}]",
        )
    unique: dict[Path, Path] = {}
    for plugin in map(Path, plugins or []):
        unique.setdefault(plugin.resolve(), plugin)
    return list(unique.values())
