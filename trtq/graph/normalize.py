"""Normalise an FP32 ONNX model so that quantization sees one canonical form.

Exporters disagree on how they write the same network: PaddlePaddle stores
weights as Constant nodes, PyTorch leaves BatchNormalization after every Conv,
old exports use opsets that cannot express per-channel Q/DQ. Each pass here
removes one of those differences. Graph passes are functions
``gs.Graph -> gs.Graph`` (they may modify the graph in place and return it, in
the style of onnx-graphsurgeon's ``cleanup().toposort()``); passes that need the
whole model (opset conversion, shape inference) take and return a ModelProto.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper, version_converter

from trtq.errors import ModelError
from trtq.graph.edit import NameAllocator, gs_graphs, stamp_producer
from trtq.graph.load import OLD_IR_RULES_UNTIL, with_ir_version
from trtq.graph.surgery import replace_uses
from trtq.proto import serialized

log = logging.getLogger(__name__)

#: Per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute) needs opset 13.
MIN_OPSET = 13
#: Constant folding never materialises a tensor larger than this (e.g. a huge ConstantOfShape).
FOLD_SIZE_LIMIT_BYTES = 64 << 20
#: Ops whose constant inputs must stay as they are: folding DequantizeLinear(int8 weight)
#: would silently turn an explicitly quantized weight back into float.
_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear"}

GraphPass = Callable[[gs.Graph], gs.Graph]


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ("" / "ai.onnx") operator set the model imports."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    raise ModelError("the model imports no default ONNX opset", "re-export the model")


def upgrade_opset(model: onnx.ModelProto, target: int = MIN_OPSET) -> onnx.ModelProto:
    """Convert a model whose opset is below ``target`` with onnx's version converter.

    Models at or above ``target`` are returned unchanged: converting upwards
    needlessly only risks the converter's gaps. Old exports (IR version 3) are first
    read by IR 4's rules, as ONNX Runtime reads them (initializers need not be graph
    inputs; the converter loses track of those that are not), and the result declares
    an IR version that can hold its new opset.
    """
    model = with_ir_version(model, OLD_IR_RULES_UNTIL + 1)
    current = default_opset(model)
    if current >= target:
        return model
    log.info("upgrading opset %d -> %d", current, target)
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot convert the model from opset {current} to {target}: {first}",
            f"re-export it with opset >= {target} (per-channel quantization needs it)",
        ) from exc
    needed = helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    converted.ir_version = max(converted.ir_version, needed)
    return converted


def constants_to_initializers(graph: gs.Graph) -> gs.Graph:
    """Replace Constant nodes by initializers, in the graph and its subgraphs.

    Weight detection (for per-channel scales) and BatchNorm folding look for
    initializers; PaddlePaddle and some TF converters emit weights as Constant
    nodes instead. A Constant whose output is a graph output stays a node,
    because ONNX graph outputs cannot be initializers.
    """
    for subgraph in gs_graphs(graph):
        for node in [n for n in subgraph.nodes if n.op == "Constant"]:
            output = node.outputs[0]
            if output in subgraph.outputs:
                continue
            value = _constant_node_value(node)
            if value is None:  # sparse_value: rare, left for ONNX Runtime to handle
                continue
            node.outputs.clear()
            replace_uses(output, gs.Constant(output.name, value))
        subgraph.cleanup()
    return graph


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        return np.asarray(attrs["value"].values)
    scalar_kinds = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    for key, dtype in scalar_kinds.items():
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    if "value_string" in attrs or "value_strings" in attrs:
        return np.asarray(attrs.get("value_string", attrs.get("value_strings")), dtype=object)
    return None


def name_nodes(graph: gs.Graph) -> gs.Graph:
    """Give every unnamed (or duplicate-named) node a unique name like ``Conv_3``.

    Reports, ``--exclude-nodes`` patterns and TensorRT's layer names all refer
    to nodes by name; exporters often leave them empty. Names the model already
    uses (for nodes or tensors, in any subgraph) are never handed out, and the
    first node to hold a name keeps it.
    """
    names = NameAllocator.for_graph(graph)
    seen: set[str] = set()
    index = 0
    for subgraph in gs_graphs(graph):  # names are unique across If/Loop bodies too
        for node in subgraph.nodes:
            if not node.name or node.name in seen:
                node.name = names.fresh(f"{node.op}_{index}")
            seen.add(node.name)
            index += 1
    return graph


def remove_identities(graph: gs.Graph) -> gs.Graph:
    """Bypass Identity nodes so that patterns (Conv -> BN, weight -> Conv) are adjacent.

    An Identity that produces a graph output is kept, so output names survive.
    """
    for node in [n for n in graph.nodes if n.op == "Identity"]:
        source, output = node.inputs[0], node.outputs[0]
        if output in graph.outputs:
            continue
        node.outputs.clear()
        replace_uses(output, source)
    return graph.cleanup()


def fold_batchnorm(graph: gs.Graph) -> gs.Graph:
    """Fold inference-mode BatchNormalization into the Conv/ConvTranspose before it.

    Per-channel weight scales must be computed on the weights TensorRT will
    actually run, i.e. after the BN scale is multiplied in; TensorRT fuses
    Conv+BN itself, so leaving BN in place would quantize the wrong weights.
    """
    names = NameAllocator.for_graph(graph)
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        conv = _foldable_producer(bn, graph)
        if conv is None:
            continue
        scale, shift, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
        factor = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        weight = conv.inputs[1].values
        bias = conv.inputs[2].values if len(conv.inputs) > 2 else np.zeros_like(mean)
        new_weight = _scale_output_channels(conv, weight.astype(np.float64), factor)
        new_bias = (bias.astype(np.float64) - mean) * factor + shift
        # Tensor names are unique in a graph; node names need not be (or exist).
        prefix, dtype = bn.outputs[0].name, weight.dtype
        conv.inputs[1] = gs.Constant(
            names.fresh(f"{prefix}_folded_weight"), new_weight.astype(dtype)
        )
        bias_tensor = gs.Constant(names.fresh(f"{prefix}_folded_bias"), new_bias.astype(dtype))
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias_tensor
        else:
            conv.inputs.append(bias_tensor)
        folded_output = bn.outputs[0]
        bn.outputs.clear()
        conv.outputs[0] = folded_output
    return graph.cleanup()


def _foldable_producer(bn: gs.Node, graph: gs.Graph) -> gs.Node | None:
    """The Conv/ConvTranspose feeding ``bn`` if folding is exact and safe, else None."""
    if len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0):
        return None
    if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return None
    data = bn.inputs[0]
    if len(data.inputs) != 1 or len(data.outputs) != 1 or data in graph.outputs:
        return None
    conv = data.inputs[0]
    if conv.op not in ("Conv", "ConvTranspose") or not isinstance(conv.inputs[1], gs.Constant):
        return None
    if len(conv.inputs) > 2 and not isinstance(conv.inputs[2], gs.Constant):
        return None
    if not np.issubdtype(conv.inputs[1].values.dtype, np.floating):
        return None
    return conv


def _scale_output_channels(conv: gs.Node, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Multiply each output channel of a Conv/ConvTranspose weight by ``factor``.

    Conv weights are [C_out, C_in/g, k...]; ConvTranspose weights are
    [C_in, C_out/g, k...], where output channel ``c`` of group ``g`` sits at
    column ``c mod (C_out/g)`` of the rows belonging to group ``g``.
    """
    kernel_rank = weight.ndim - 2
    if conv.op == "Conv":
        return weight * factor.reshape(-1, *([1] * (kernel_rank + 1)))
    groups = int(conv.attrs.get("group", 1))
    c_in, c_out_per_group = weight.shape[:2]
    grouped = weight.reshape(groups, c_in // groups, c_out_per_group, *weight.shape[2:])
    grouped = grouped * factor.reshape(groups, 1, c_out_per_group, *([1] * kernel_rank))
    return grouped.reshape(weight.shape)


def fold_constants(graph: gs.Graph) -> gs.Graph:
    """Evaluate subgraphs that depend only on constants (with ONNX Runtime, via graphsurgeon).

    Turns Transpose(weight), Reshape(weight), Shape arithmetic on static dims
    and the like into initializers, so a MatMul's weight is recognisable as a
    weight. Q/DQ nodes are never folded, and no tensor above
    :data:`FOLD_SIZE_LIMIT_BYTES` is materialised.
    """
    import onnxruntime

    # graphsurgeon evaluates constants in ONNX Runtime sessions of its own, whose optimizer
    # warnings ("UnsqueezeElimination cannot remove node") are noise to trtq's users.
    onnxruntime.set_default_logger_severity(3)
    graph.fold_constants(
        # Inlining If branches with constant conditions is left off: graphsurgeon's
        # flattening drops branch outputs (seen on silero-vad's nested Ifs).
        flatten_subgraphs=False,
        size_threshold=FOLD_SIZE_LIMIT_BYTES,
        should_exclude_node=lambda node: node.op in _NEVER_FOLD,
    )
    return graph.cleanup()


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run ONNX shape inference; models over protobuf's 2 GB limit go through a file."""
    try:
        data = serialized(model)
        if data is not None:
            return onnx.shape_inference.infer_shapes(data, data_prop=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp, "in.onnx"), Path(tmp, "out.onnx")
            onnx.save(model, src, save_as_external_data=True, location="in.data")
            onnx.shape_inference.infer_shapes_path(str(src), str(dst), data_prop=True)
            return onnx.load(dst)
    except onnx.shape_inference.InferenceError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(
            f"ONNX shape inference failed: {first}", "check the model with onnx.checker"
        ) from exc


def inline_constant_ifs(graph: gs.Graph) -> gs.Graph:
    """Replace every If whose condition is a constant by the branch it always takes.

    Exporters wrap whole networks in an If on a setting input (silero-vad picks
    its 8 kHz or 16 kHz network by sample rate); with the input frozen
    (:func:`freeze_inputs`) the condition folds to a constant, and inlining the
    taken branch brings its Conv/Gemm/LSTM into the main graph, where they can
    be quantized. Nested Ifs are inlined as they surface.
    """
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            condition = node.inputs[0] if node.op == "If" and node.inputs else None
            if not isinstance(condition, gs.Constant):
                continue
            taken = node.attrs["then_branch" if bool(condition.values) else "else_branch"]
            _inline_branch(graph, node, taken)
            changed = True
        graph.cleanup()
    return graph


def _inline_branch(graph: gs.Graph, node: gs.Node, branch: gs.Graph) -> None:
    """Move ``branch``'s nodes into ``graph`` in place of the If ``node``.

    A branch's own tensor or node whose name the outer graph already uses is renamed
    ``<If name>/<name>`` (or a fresh variant of it).
    """
    outer = graph.tensors().values()
    outer_ids, outer_names = {id(t) for t in outer}, {t.name for t in outer}
    outer_names |= {n.name for n in graph.nodes if n is not node}
    names = NameAllocator.for_graph(graph)
    for tensor in branch.tensors().values():  # the branch's own tensors, not outer-scope ones
        if id(tensor) not in outer_ids and tensor.name in outer_names:
            tensor.name = names.fresh(f"{node.name}/{tensor.name}")
    for inner in branch.nodes:
        if inner.name in outer_names:
            inner.name = names.fresh(f"{node.name}/{inner.name}")
    results = list(node.outputs)
    node.outputs.clear()
    graph.nodes.extend(branch.nodes)
    for produced, result in zip(branch.outputs, results, strict=True):
        name = names.fresh(f"{node.name}/{result.name}")
        graph.nodes.append(gs.Node("Identity", name, inputs=[produced], outputs=[result]))


def freeze_inputs(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """Turn graph inputs into constants (``--freeze-input sr=16000``).

    A model specialised to one setting loses the control flow that chose among
    settings (see :func:`inline_constant_ifs`). The value takes the input's
    declared element type.
    """
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)  # the caller's model keeps its inputs
    model = frozen
    inputs = {v.name: v for v in model.graph.input}
    for name, value in values.items():
        if name not in inputs:
            raise ModelError(
                f"--freeze-input {name}: the model has no input {name!r}",
                f"inputs: {', '.join(inputs)}",
            )
        elem = inputs[name].type.tensor_type.elem_type
        array = np.asarray(value, dtype=onnx.helper.tensor_dtype_to_np_dtype(elem))
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        model.graph.input.remove(inputs[name])
    return model


#: The graph passes of :func:`normalize`, in order: constants first so that the
#: later passes see weights as initializers.
GRAPH_PASSES: tuple[GraphPass, ...] = (
    constants_to_initializers,
    fold_constants,
    inline_constant_ifs,
    fold_constants,
    remove_identities,
    fold_batchnorm,
    name_nodes,
)


def normalize(
    model: onnx.ModelProto,
    passes: tuple[GraphPass, ...] = GRAPH_PASSES,
    *,
    frozen: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """Apply every normalisation pass: frozen inputs, opset upgrade, graph passes, shapes."""
    if frozen:
        model = freeze_inputs(model, frozen)
    model = upgrade_opset(model)
    graph = gs.import_onnx(model)
    for graph_pass in passes:
        log.debug("pass %s", graph_pass.__name__)
        graph = graph_pass(graph)
    return infer_shapes(export(graph, like=model))


def export(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graph, keeping the model-level fields graphsurgeon does not carry.

    ``producer_name``/``producer_version`` say trtq: the graph is trtq's rewrite.
    """
    model = gs.export_onnx(graph.cleanup().toposort())
    # graphsurgeon drops the shape of scalar outputs (an empty tuple reads as "unknown");
    # keep each output's declared type when the original had one.
    declared = {v.name: v.type for v in like.graph.output if v.type.tensor_type.HasField("shape")}
    for output in model.graph.output:
        if output.name in declared and not output.type.tensor_type.HasField("shape"):
            output.type.CopyFrom(declared[output.name])
    model.ir_version = like.ir_version
    stamp_producer(model)
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model
