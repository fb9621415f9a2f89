"""Shapes, names and exceptions written out for one-line error messages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from trtq.graph.load import Dim, TensorSpec


def dims(shape: Sequence[Dim]) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def expected_shape(spec: TensorSpec) -> str:
    """The input's shape for a message: ``Nx3x224x224 (N dynamic)``."""
    dynamic = list(dict.fromkeys(d for d in spec.shape if isinstance(d, str)))
    return f"{dims(spec.shape)} ({', '.join(dynamic)} dynamic)" if dynamic else dims(spec.shape)


def quoted(names: Iterable[Any]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
