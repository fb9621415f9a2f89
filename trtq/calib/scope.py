"""What one calibration covers: the tensors it observes and the options it was made for.

``trtq calibrate`` and ``trtq quantize`` must agree tensor for tensor: a stats file is
useful only if it holds a histogram for every tensor the quantize plan puts a Q/DQ pair
on. So both build that plan here, on the same normalised graph with the same placement
options (:func:`planning_graph`, :func:`plan_tensors`); a stats file records what it was
made for (:class:`CalibrationScope`), and :func:`check_reused` refuses ranges made for
another model or other placement flags before any of them is used.

TensorRT's implicit INT8 (``trtq build --calib-mode trt``) is the other consumer. It
parses the model *as given*, not trtq's normalised graph, and asks its calibrator for a
scale for every float tensor of that network (:func:`trt_tensors`). Normalisation renames
no tensor that survives it, but it removes some: a Conv's output before a folded
BatchNormalization, Identity outputs. Those exist only in the model as given, so a
calibration meant for a TensorRT cache observes that model, where every surviving name
carries the same values as in the normalised graph (see ARCHITECTURE.md §Modules, "Calibration").
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from trtq.calib import validate
from trtq.errors import DataError, UserError
from trtq.graph import qdq
from trtq.graph.normalize import infer_shapes, normalize, upgrade_opset
from trtq.graph.patterns import float_activations
from trtq.proto import serialized

if TYPE_CHECKING:
    from trtq.calib.cache import CalibrationStats, TrtCache

log = logging.getLogger(__name__)

#: Opset that introduced float8 QuantizeLinear/DequantizeLinear (and FP16/BF16 Q/DQ scales).
FP8_MIN_OPSET = 19
#: Messages at least this large are hashed field by field (protobuf serialises < 2 GB).
_SERIALIZE_LIMIT = 1 << 30
#: What ``tensors`` may ask a calibration to observe.
TENSOR_SETS = ("quantizable", "all")
#: Placement option -> the flag that sets it (for messages that tell the user what to change).
PLACEMENT_FLAGS = {
    "precision": "--precision",
    "include_ops": "--include-ops",
    "exclude_ops": "--exclude-ops",
    "exclude_nodes": "--exclude-nodes",
    "min_channels": "--min-channels",
}


def model_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 of the model as given: stats are reused and shards merged for one model only.

    Hashed message by message (each initializer on its own), so a model over protobuf's
    2 GB limit, whose whole serialisation would fail, has a fingerprint too.
    """
    digest = hashlib.sha256()
    _hash_fields(digest, model)
    return digest.hexdigest()


def _hash_fields(digest: Any, message: Any) -> None:
    for descriptor, value in message.ListFields():
        digest.update(descriptor.name.encode())
        for item in value if _repeated(descriptor) else [value]:
            if descriptor.message_type is None:
                digest.update(repr(item).encode())
            else:
                data = serialized(item, limit=_SERIALIZE_LIMIT, deterministic=True)
                if data is None:
                    _hash_fields(digest, item)
                else:
                    digest.update(data)


def _repeated(descriptor: Any) -> bool:
    flag = getattr(descriptor, "is_repeated", None)  # protobuf >= 5.28; older ones: label
    return flag if flag is not None else descriptor.label == descriptor.LABEL_REPEATED


def planning_graph(
    model: onnx.ModelProto,
    placement: qdq.PlacementOptions | None,
    frozen: Mapping[str, np.ndarray] | None = None,
    *,
    mixed: bool = False,
) -> onnx.ModelProto:
    """The graph quantize plans on: normalised, at the opset its Q/DQ nodes need.

    FP8 Q/DQ, and Q/DQ with FP16/BF16 scales (``mixed``), need opset 19.
    """
    graph = normalize(model, frozen=frozen)
    if placement is not None and (placement.precision == "fp8" or mixed):
        graph = upgrade_opset(graph, FP8_MIN_OPSET)
    return graph


def quant_plan(graph: onnx.ModelProto, placement: qdq.PlacementOptions) -> qdq.QuantPlan:
    """The quantize plan before calibration (MACs, which only feed coverage, left out).

    The plan is decided from the graph alone, so calibrate and quantize get the same
    tensors (and range groups) from the same graph and options.
    """
    return qdq.plan(gs.import_onnx(graph), {}, placement)


def plan_tensors(graph: onnx.ModelProto, placement: qdq.PlacementOptions) -> list[str]:
    """Every tensor the quantize plan needs a range for, in graph order."""
    return quant_plan(graph, placement).activations()


def trt_tensors(model: onnx.ModelProto) -> list[str]:
    """Every float tensor of ``model`` as given: what TensorRT's implicit INT8 asks scales for.

    Tensors TensorRT's parser creates inside one ONNX node (its "(Unnamed Layer* N)"
    names) cannot be known without TensorRT, so they are not asked for here; a cache that
    TensorRT writes itself has them too.
    """
    return float_activations(infer_shapes(model))


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """The names of the main graph's inputs and node outputs."""
    names = {value.name for value in model.graph.input}
    names.update(name for node in model.graph.node for name in node.output if name)
    return names


def placement_json(options: qdq.PlacementOptions) -> dict[str, Any]:
    return {
        "precision": options.precision,
        "include_ops": sorted(options.include_ops),
        "exclude_ops": sorted(options.exclude_ops),
        "exclude_nodes": options.exclude_nodes,
        "min_channels": options.min_channels,
    }


def frozen_json(frozen: Mapping[str, Any] | None) -> dict[str, Any]:
    return {name: np.asarray(value).tolist() for name, value in sorted((frozen or {}).items())}


@dataclass(frozen=True)
class CalibrationScope:
    """What a stats file was made for, recorded in it so that its reuse can be checked.

    ``placement`` is :func:`placement_json` of the quantize plan's options (None when the
    tensors were named by the caller); ``frozen`` the frozen inputs as JSON values;
    ``tensors`` the set observed beyond the plan (see :data:`TENSOR_SETS`);
    ``trt_tensors`` the float tensors of the model as given, when they were observed (a
    complete TensorRT cache can be written from the stats only then); ``range_groups``
    the plan's tensors that share one range (:attr:`trtq.graph.qdq.QuantPlan.range_groups`),
    so that a cache gives them the range quantize would.
    """

    placement: dict[str, Any] | None
    method: str
    percentile: float
    frozen: dict[str, Any] = field(default_factory=dict)
    tensors: str = "quantizable"
    trt_tensors: tuple[str, ...] | None = None
    range_groups: tuple[tuple[str, ...], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "method": self.method,
            "percentile": self.percentile,
            "frozen_inputs": self.frozen,
            "tensors": self.tensors,
            "trt_tensors": None if self.trt_tensors is None else list(self.trt_tensors),
            "range_groups": [list(group) for group in self.range_groups],
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> CalibrationScope:
        try:
            placement = data["placement"]
            if placement is not None and set(placement) != set(PLACEMENT_FLAGS):
                raise ValueError("placement fields")
            trt = data["trt_tensors"]
            scope = cls(
                placement=None if placement is None else dict(placement),
                method=str(data["method"]),
                percentile=float(data["percentile"]),
                frozen=dict(data["frozen_inputs"]),
                tensors=str(data["tensors"]),
                trt_tensors=None if trt is None else tuple(str(name) for name in trt),
                range_groups=tuple(
                    tuple(str(name) for name in group) for group in data["range_groups"]
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{source} does not say what it was calibrated for ({exc})", "regenerate it"
            ) from exc
        if scope.tensors not in TENSOR_SETS:
            raise DataError(
                f"{source} has an unknown tensor set {scope.tensors!r}", "regenerate it"
            )
        return scope

    def with_method(self, method: str, percentile: float) -> CalibrationScope:
        return replace(self, method=method, percentile=percentile)


def scope_difference(mine: CalibrationScope | None, other: CalibrationScope | None) -> str | None:
    """The first option two scopes disagree on, as ``--flag A vs --flag B`` (None if none)."""
    if mine is None or other is None:
        return None if mine is other else "one records its options, the other does not"
    if mine.frozen != other.frozen:
        return f"--freeze-input {_frozen_text(mine.frozen)} vs {_frozen_text(other.frozen)}"
    if mine.placement != other.placement:
        key, flag = _first_placement_difference(mine.placement, other.placement)
        return f"{flag} {_flag_value(mine.placement, key)} vs {_flag_value(other.placement, key)}"
    if mine.tensors != other.tensors or mine.trt_tensors != other.trt_tensors:
        return f"--tensors {mine.tensors} vs {other.tensors}"
    return None


def check_reused(
    model: onnx.ModelProto,
    stats: CalibrationStats | None,
    cache: TrtCache | None,
    *,
    placement: qdq.PlacementOptions | None,
    frozen: Mapping[str, Any] | None,
    method: str,
) -> None:
    """Ranges handed to quantize: usable values, made for this model and this placement.

    Values go through :mod:`trtq.calib.validate`. A stats file also names its model and
    options; a TensorRT cache cannot, so for a cache only the tensor check of quantize
    (every planned tensor present) applies.
    """
    if cache is not None:
        validate.check_cache(_origin(cache, "the calibration cache"), cache.scales)
    if stats is None:
        return
    source = _origin(stats, "the stats")
    validate.check_stats(stats, source)
    fingerprint = model_fingerprint(model)
    if stats.model_sha256 != fingerprint:
        raise DataError(
            f"{source} was calibrated on another model (sha256 {stats.model_sha256[:12]}..., "
            f"this one {fingerprint[:12]}...)",
            "calibrate this model: trtq calibrate MODEL --calib DATA -o STATS",
        )
    scope = stats.scope
    if scope is None:
        return
    if scope.frozen != frozen_json(frozen):
        raise DataError(
            f"{source} was calibrated with --freeze-input {_frozen_text(scope.frozen)}, this run "
            f"has {_frozen_text(frozen_json(frozen))}",
            "freeze the same inputs to the same values in both commands",
        )
    if placement is not None and scope.placement is not None:
        wanted = placement_json(placement)
        if wanted != scope.placement:
            key, flag = _first_placement_difference(scope.placement, wanted)
            made, asked = _flag_value(scope.placement, key), _flag_value(wanted, key)
            raise DataError(
                f"{source} was calibrated for {flag} {made}, this run has {flag} {asked}",
                f"calibrate again with {flag} {asked} (trtq calibrate takes the placement flags "
                f"of trtq quantize), or quantize with {flag} {made}",
            )
    if scope.method != method:
        log.info(
            "%s was made with --method %s; ranges are chosen again from its histograms by %s",
            source,
            scope.method,
            method,
        )


def check_trt_cache(cache: TrtCache, model: onnx.ModelProto, source: str) -> None:
    """A cache for TensorRT's implicit INT8 covers every float tensor of the model it parses.

    TensorRT runs a tensor without a scale in float, silently, so an incomplete cache
    builds an engine that is mostly not INT8.
    """
    validate.check_cache(source, cache.scales)
    wanted = trt_tensors(model)
    missing = [name for name in wanted if name not in cache.scales]
    if missing:
        raise UserError(
            f"{source} has no scale for {len(missing)} of the {len(wanted)} float tensors "
            f"TensorRT would quantize, e.g. {missing[0]!r}; TensorRT would run them in float",
            "write a complete cache with: trtq calibrate MODEL --calib DATA -o stats.json "
            "--cache FILE",
        )


def _origin(ranges: Any, default: str) -> str:
    return getattr(ranges, "origin", None) or default


def _first_placement_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, str]:
    for key, flag in PLACEMENT_FLAGS.items():
        if a.get(key) != b.get(key):
            return key, flag
    raise AssertionError("placements differ in no known option")


def _flag_value(placement: Mapping[str, Any], key: str) -> str:
    value = placement.get(key)
    if isinstance(value, list):
        return ",".join(value) or "''"
    return "(none)" if value is None else str(value)


def _frozen_text(frozen: Mapping[str, Any]) -> str:
    return ",".join(f"{name}={value}" for name, value in frozen.items()) or "(none)"
