"""Input shapes for a TensorRT build: trtexec's shape flags and the optimization profile.

An engine needs an optimization profile for every input with a dynamic dimension:
the shapes it accepts, from ``min`` to ``max``, and the ``opt`` shape it is tuned
for. They come from ``--shapes`` (one fixed shape per input) or from
``--min-shapes``/``--opt-shapes``/``--max-shapes`` (a range), in trtexec's syntax
(``input:1x3x224x224``), or as a mapping from the Python API. Everything here is
checked before TensorRT is asked to build, each problem as one line naming the flag.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral

from trtq.errors import UserError

Shape = tuple[int, ...]
#: What the Python API takes for a set of shapes: trtexec text, a list of it, or a mapping.
ShapesArgument = str | Iterable[str] | Mapping[str, Sequence[int]] | None


@dataclass(frozen=True)
class ShapeRange:
    """One input's optimization-profile shapes: the engine accepts min <= shape <= max."""

    min: Shape
    opt: Shape
    max: Shape

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class TensorInfo:
    """A network input or output as TensorRT sees it (-1 marks a dynamic dimension)."""

    name: str
    shape: Shape
    dtype: str

    @property
    def dynamic(self) -> bool:
        return any(d < 0 for d in self.shape)


def optimization_profile(
    shapes: Mapping[str, Shape],
    min_shapes: Mapping[str, Shape],
    opt_shapes: Mapping[str, Shape],
    max_shapes: Mapping[str, Shape],
) -> dict[str, ShapeRange]:
    """The profile's shapes per input, from fixed ``shapes`` or from the three range flags."""
    ranged = min_shapes or opt_shapes or max_shapes
    if shapes and ranged:
        raise UserError(
            "both --shapes and --min/--opt/--max-shapes were given",
            "use --shapes for one fixed shape per input, or the three range flags",
        )
    if not ranged:
        return {name: ShapeRange(s, s, s) for name, s in shapes.items()}
    return _ranges(min_shapes, opt_shapes, max_shapes)


def check_profile(inputs: list[TensorInfo], profile: Mapping[str, ShapeRange]) -> None:
    """Every dynamic input covered; every given shape names an input and fits its fixed dims."""
    by_name = {t.name: t for t in inputs}
    unknown = [name for name in profile if name not in by_name]
    if unknown:
        raise UserError(
            f"shapes given for {', '.join(map(repr, unknown))}, which the model has no input "
            f"called",
            f"its inputs are: {', '.join(t.name for t in inputs) or 'none'}",
        )
    for name, shapes in profile.items():
        _check_fits(by_name[name], shapes)
    uncovered = [t for t in inputs if t.dynamic and t.name not in profile]
    if uncovered:
        listed = ", ".join(f"{t.name} ({format_shape(t.shape)})" for t in uncovered)
        example = ",".join(f"{t.name}:{format_shape(example_shape(t.shape))}" for t in uncovered)
        raise UserError(
            f"input(s) with dynamic dimensions need shapes: {listed}",
            f"pass e.g. --shapes {example} (or --min-shapes/--opt-shapes/--max-shapes)",
        )


def _check_fits(tensor: TensorInfo, shapes: ShapeRange) -> None:
    for given in (shapes.min, shapes.opt, shapes.max):
        if len(given) != len(tensor.shape):
            raise UserError(
                f"shape {format_shape(given)} for input '{tensor.name}' has {len(given)} "
                f"dimension(s); the input has {len(tensor.shape)} ({format_shape(tensor.shape)})",
                "give one size per dimension, e.g. 1x3x224x224",
            )
        for axis, (want, got) in enumerate(zip(tensor.shape, given, strict=True)):
            if want >= 0 and want != got:
                raise UserError(
                    f"shape {format_shape(given)} for input '{tensor.name}': dimension {axis} is "
                    f"fixed to {want} in the model ({format_shape(tensor.shape)})",
                    "change only the dynamic (-1) dimensions",
                )


def example_shape(shape: Shape) -> Shape:
    """A shape to suggest in messages: each dynamic dimension as 1."""
    return tuple(d if d >= 0 else 1 for d in shape)


def format_shape(shape: Iterable[int]) -> str:
    """``(1, 3, -1)`` -> ``"1x3x-1"`` (trtexec's syntax)."""
    return "x".join(str(d) for d in shape) or "scalar"


# --- shape flags -------------------------------------------------------------------------

_SHAPE = re.compile(r"\d+(?:x\d+)*")


def parse_shapes(text: str | Iterable[str] | None) -> dict[str, Shape]:
    """trtexec's shape syntax: ``"input:1x3x224x224,mask:1x128"`` -> ``{name: shape}``.

    Also takes the values of a repeated flag (a list of such strings). The
    shape follows the *last* colon, so names with colons (``'input:0'``, from
    TensorFlow exports) work, quoted or not.
    """
    if text is None:
        return {}
    parts = [text] if isinstance(text, str) else list(text)
    shapes: dict[str, Shape] = {}
    for item in (p.strip() for part in parts for p in part.split(",")):
        if not item:
            continue
        name, sep, dims = item.rpartition(":")
        name = name.strip().strip("'\"")
        dims = dims.strip().lower()
        if not sep or not name or not _SHAPE.fullmatch(dims):
            raise UserError(
                f"bad shape {item!r}", "write it as name:1x3x224x224 (several: a:1x3,b:1x128)"
            )
        if name in shapes:
            raise UserError(f"shape for input '{name}' given twice", "give each input once")
        shape = tuple(int(d) for d in dims.split("x"))
        if 0 in shape:
            raise UserError(f"bad shape {item!r}: dimensions must be positive", "use sizes >= 1")
        shapes[name] = shape
    return shapes


def as_shapes(value: ShapesArgument) -> dict[str, Shape]:
    """Shapes given to the Python API: trtexec text (as the flags) or ``{name: dims}``."""
    if not isinstance(value, Mapping):
        return parse_shapes(value)
    shapes: dict[str, Shape] = {}
    for name, dims in value.items():
        given = tuple(dims) if isinstance(dims, Iterable) else (dims,)
        if not all(isinstance(d, Integral) and not isinstance(d, bool) and d > 0 for d in given):
            raise UserError(
                f"bad shape {dims!r} for input '{name}': dimensions must be positive integers",
                "give e.g. {'input': (1, 3, 224, 224)}",
            )
        shapes[str(name)] = tuple(int(d) for d in given)
    return shapes


def _ranges(
    mins: Mapping[str, Shape], opts: Mapping[str, Shape], maxs: Mapping[str, Shape]
) -> dict[str, ShapeRange]:
    """Zip min/opt/max shapes per input; each input needs all three, ordered min <= opt <= max."""
    ranges = {}
    flags = {"--min-shapes": mins, "--opt-shapes": opts, "--max-shapes": maxs}
    for name in dict.fromkeys([*mins, *opts, *maxs]):
        missing = [flag for flag, given in flags.items() if name not in given]
        if missing:
            raise UserError(
                f"input '{name}' has no shape in {', '.join(missing)}",
                "give each input in all of --min-shapes, --opt-shapes and --max-shapes",
            )
        shapes = ShapeRange(mins[name], opts[name], maxs[name])
        if not len(shapes.min) == len(shapes.opt) == len(shapes.max):
            raise UserError(f"min/opt/max shapes of input '{name}' differ in rank", "fix the flags")
        ordered = all(
            a <= b <= c for a, b, c in zip(shapes.min, shapes.opt, shapes.max, strict=True)
        )
        if not ordered:
            raise UserError(
                f"input '{name}': need min <= opt <= max in every dimension, got "
                f"{format_shape(shapes.min)}, {format_shape(shapes.opt)}, "
                f"{format_shape(shapes.max)}",
                "fix the shape flags",
            )
        ranges[name] = shapes
    return ranges
