"""Rewrite UINT8 QuantizeLinear/DequantizeLinear pairs as symmetric signed INT8 for TensorRT.

TensorRT's explicit quantization takes INT8 with zero point 0 only. NNCF emits UINT8 for
activations whose calibrated range is non-negative (after ReLU, Sigmoid): zero point 0 and
scale s cover [0, 255 s]. The faithful signed equivalent keeps the range and loses one bit:
scale 255 s / 127, zero point 0. A UINT8 pair with zero point 128 is already symmetric and maps
exactly (scale kept). Any other zero point (asymmetric) becomes symmetric over the larger side:
scale s * max(zp, 255 - zp) / 127. Needs onnx and numpy only (it runs in a peer's environment).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def signed_scale(scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """The INT8 (zero point 0) scale that covers what UINT8 ``scale``/``zero_point`` covered."""
    zp = zero_point.astype(np.float64)
    reach = np.maximum(zp, 255.0 - zp)
    converted = scale.astype(np.float64) * reach / 127.0
    exact = zp == 128  # -128..127 around zero: the same grid, shifted
    return np.where(exact, scale.astype(np.float64), converted).astype(scale.dtype)


def uint8_to_int8(model: onnx.ModelProto) -> int:
    """Convert every Q/DQ pair reading a UINT8 zero point, in place; return how many scales.

    Scales and zero points may be shared between nodes, so the (scale, zero point) pairs are
    collected before anything is rewritten: each initializer is converted once, from its
    original value.
    """
    inits = {init.name: init for init in model.graph.initializer}
    pairs = {
        (node.input[1], node.input[2])
        for node in model.graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear")
        and len(node.input) >= 3
        and node.input[2] in inits
        and inits[node.input[2]].data_type == onnx.TensorProto.UINT8
    }
    zero_points = {zp: numpy_helper.to_array(inits[zp]) for _, zp in pairs}
    for scale_name, zp_name in pairs:
        scale = numpy_helper.to_array(inits[scale_name])
        new = signed_scale(scale, zero_points[zp_name])
        inits[scale_name].CopyFrom(numpy_helper.from_array(new, scale_name))
    for zp_name, zero_point in zero_points.items():
        inits[zp_name].CopyFrom(
            numpy_helper.from_array(np.zeros_like(zero_point, np.int8), zp_name)
        )
    # The zero points and the quantized tensors (QuantizeLinear outputs) are INT8 now: retype
    # what the graph declares about them, or shape inference finds UINT8 contradicted.
    retyped = set(zero_points) | {
        node.output[0]
        for node in model.graph.node
        if node.op_type == "QuantizeLinear"
        and len(node.input) >= 3
        and node.input[2] in zero_points
    }
    for value in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        if value.name in retyped:
            value.type.tensor_type.elem_type = onnx.TensorProto.INT8
    return len({scale for scale, _ in pairs})
