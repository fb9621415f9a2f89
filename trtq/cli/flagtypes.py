"""argparse ``type=`` callables: every flag value is checked while the command line is parsed.

A value that fails here stops the command before any file is read or written, with one
line that names the flag (``trtq calibrate: error: argument --shard: ...``, printed by
:class:`trtq.cli.common.ArgumentParser`) and exit status 2. Each callable raises
:class:`argparse.ArgumentTypeError` with a "problem. fix." message. Values the library
parses itself (memory sizes, shards, shapes, image options, frozen inputs) go through the
library's own parser here, so the command line and the Python API accept the same text;
its :class:`~trtq.errors.UserError` becomes the flag's error.

Callables that only validate (regular expressions, shapes, frozen inputs, the TensorRT
version) return the text unchanged: the commands keep handing the library the strings it
takes, and parse-time checking is all they add.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from trtq.errors import UserError

if TYPE_CHECKING:
    from trtq.calib.collect import Shard

T = TypeVar("T")


def integer(least: int, most: int | None = None) -> Callable[[str], int]:
    """A whole number in ``[least, most]`` (no upper bound when ``most`` is None)."""

    def parse(text: str) -> int:
        value = _whole(text, example=least)
        if value < least or (most is not None and value > most):
            bounds = f"at least {least}" if most is None else f"from {least} to {most}"
            raise _error(f"{value} is out of range", f"give a number {bounds}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in ``[low, high]`` (``(low, high]`` with ``low_open``); NaN is refused."""
    if math.isinf(high):
        bounds = f"above {low:g}" if low_open else f"of at least {low:g}"
    else:
        bounds = f"above {low:g} and at most {high:g}" if low_open else f"from {low:g} to {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise _error(f"{text!r} is not a number", "write e.g. 0.5") from None
        if not math.isfinite(value):
            raise _error(f"{text.strip()} is not a finite number", f"give a number {bounds}")
        if not ((value > low if low_open else value >= low) and value <= high):
            raise _error(f"{text.strip()} is out of range", f"give a number {bounds}")
        return value

    parse.__name__ = "number"
    return parse


def power_of_two(least: int, most: int) -> Callable[[str], int]:
    """A power of two in ``[least, most]`` (histogram bins)."""

    def parse(text: str) -> int:
        value = _whole(text, example=least)
        if not least <= value <= most or value & (value - 1):
            raise _error(
                f"{value} is not a power of two from {least} to {most}",
                f"use e.g. {least}, {least * 2} or {most}",
            )
        return value

    parse.__name__ = "power_of_two"
    return parse


def regex(text: str) -> str:
    """A regular expression Python's ``re`` compiles (returned as text)."""
    try:
        re.compile(text)
    except re.error as exc:
        raise _error(
            f"{text!r} is not a valid regular expression ({exc})",
            r"escape special characters with a backslash, e.g. 'conv\.1' or '/head/.*'",
        ) from None
    return text


def op_types(allowed: frozenset[str] | None = None) -> Callable[[str], str]:
    """Comma-separated ONNX op types (``Conv,MatMul``), each in ``allowed`` if given.

    Returned as text. A misspelt op would otherwise match no node and change nothing.
    """

    def parse(text: str) -> str:
        for op in (part.strip() for part in text.split(",")):
            if not op:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", op):
                raise _error(f"{op!r} is not an ONNX op type", "write op types like Conv,MatMul")
            if allowed is not None and op not in allowed:
                raise _error(
                    f"{op} is not an op type this flag takes",
                    f"choose from {','.join(sorted(allowed))}",
                )
        return text

    parse.__name__ = "op_types"
    return parse


def providers(text: str) -> str:
    """ONNX Runtime execution providers, comma-separated (``cuda,cpu``), available here."""
    from trtq.sessions import resolve_providers

    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise _error(f"{text!r} names no provider", "write e.g. cuda,cpu")
    _through(resolve_providers, names)
    return text


def memory_size(text: str) -> int:
    """A size in bytes: ``512M``, ``4G``, ``1.5GiB``, ``1000000``."""
    from trtq.calib.collect import parse_memory

    return _through(parse_memory, text)


def shard(text: str) -> Shard:
    """``K/N``: shard K (1-based) of N, as :class:`trtq.calib.collect.Shard`."""
    from trtq.calib.collect import Shard

    return _through(Shard.parse, text)


def ray_address(text: str) -> str:
    """A Ray address: ``auto``, ``local``, ``ray://HOST:PORT`` or ``HOST:PORT`` (not contacted)."""
    from trtq.ray_cluster import parse_address

    return _through(parse_address, text)


def shapes(text: str) -> str:
    """trtexec's ``name:1x3x224x224[,name2:...]`` syntax (returned as text)."""
    from trtq.runtime.base import parse_shapes

    _through(parse_shapes, text)
    return text


def frozen_input(text: str) -> str:
    """``NAME=VALUE[,VALUE...]`` for ``--freeze-input`` (returned as text)."""
    from trtq.cli.common import parse_frozen

    _through(parse_frozen, [text])
    return text


def trt_version(text: str) -> str:
    """A TensorRT version with calibrators (TensorRT 10 and before), e.g. ``10.13.3``."""
    from trtq.calib.cache import trt_version_int

    _through(trt_version_int, text)
    major = int(text.strip().split(".")[0])
    if major > 10 or major < 5:
        raise _error(
            f"TensorRT {text.strip()} has no INT8 calibration cache "
            "(TensorRT 11 removed calibrators; versions before 5 are not supported)",
            "give the TensorRT 10 (or 8) version that will read the cache, e.g. 10.13.3",
        )
    return text.strip()


def image_option(flag: str) -> Callable[[str], str]:
    """``--resize``, ``--mean``, ``--std`` or ``--scale``, checked as the image reader will."""
    keyword = flag.lstrip("-")

    def parse(text: str) -> str:
        from trtq.calib.data import ImagePreprocess

        _through(lambda value: ImagePreprocess.parse(**{keyword: value}), text)
        return text

    parse.__name__ = keyword
    return parse


def _whole(text: str, *, example: int) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise _error(f"{text!r} is not a whole number", f"write e.g. {example}") from None


def _through(parse: Callable[..., T], value) -> T:
    """Call a library parser; its one-line UserError becomes the flag's error."""
    try:
        return parse(value)
    except UserError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _error(problem: str, fix: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(UserError(problem, fix).message)


# --- flags that several commands share ------------------------------------------------------

#: ``--percentile``: of |x|, for ``--method percentile``; 0 would clip everything.
percentile = number(0.0, 100.0, low_open=True)
#: ``--bins``: a histogram is re-binned by halving, so a power of two; at least one bin per
#: INT8 level (128), and at most 65536 (0.5 MiB per observed tensor).
histogram_bins = power_of_two(128, 1 << 16)
#: ``--batch-size``, ``--limit``, ``--iterations``, ``--threads``: counts of one or more.
count = integer(1)
#: ``--min-cosine``: a cosine similarity.
cosine = number(-1.0, 1.0)
#: ``--max-rel-l2``: a relative error.
relative_error = number(0.0)
#: ``--max-drop``: accuracy percentage points.
accuracy_points = number(0.0, 100.0)
