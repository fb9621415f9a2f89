"""Graph passes that hand ops TensorRT cannot import to trtq's TensorRT plugins (``plugins/``).

TensorRT's ONNX parser has no importer for ``STFT`` (nor ``DFT`` or ``HannWindow``: "N" in
onnx-tensorrt's operator table for TensorRT 10.x), so an audio model exported with
``torch.stft`` at opset >= 17 (the spectrogram or log-mel front end of a keyword spotter, an
ASR encoder or a VAD) does not build. :func:`stft_to_plugin` rewrites each ONNX ``STFT``
node into a ``trtq::STFT`` node, which the parser maps to the plugin in
``plugins/stft/stft_plugin.py`` (``trtq build ... --plugins plugins/stft/stft_plugin.py``).

A custom node is what TensorRT's parser looks up in its plugin registry: op type = plugin
name (``STFT``), attribute ``plugin_namespace`` = ``trtq``, the plugin's attributes as node
attributes, and ``aot`` choosing the plugin's implementation (1: the kernel is compiled into
the engine, which then runs without Python; 0: TensorRT calls back into Python at run time).

ONNX Runtime cannot run the rewritten node; :func:`reference_evaluator` runs the rewritten
model with ``onnx.reference`` and a numpy implementation of ``trtq::STFT``
(:class:`STFT`), so the rewrite stays verifiable on a CPU. Rewrite after quantizing:
calibration runs the original model in ONNX Runtime.

    import onnx
    from trtq.graph.plugins import reference_evaluator, use_plugins

    model = use_plugins(onnx.load("kws.int8.onnx"), ["stft"])
    onnx.save(model, "kws.plugins.onnx")
    outputs = reference_evaluator(model).run(None, {"audio": clip})
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference.op_run import OpRun

from trtq.errors import ModelError, UserError
from trtq.graph.edit import NameAllocator, gs_graphs, stamp_producer

log = logging.getLogger(__name__)

#: ONNX domain of trtq's plugin ops, and the TensorRT plugin namespace they map to.
PLUGIN_DOMAIN = "trtq"
PLUGIN_OPSET = 1
PLUGIN_VERSION = "1"
STFT_DOMAIN = PLUGIN_DOMAIN
STFT_OP = "STFT"
#: The kernel keeps 12 bytes per frame sample in shared memory (plugins/stft/stft.cu).
STFT_MAX_FRAME_LENGTH = 4096

GraphPass = Callable[..., gs.Graph]


# --- the pass ------------------------------------------------------------------------------


def stft_to_plugin(graph: gs.Graph, *, aot: bool = True) -> gs.Graph:
    """Replace every ONNX ``STFT`` node by a ``trtq::STFT`` plugin node, in place.

    The plugin's attributes come from the node's constant inputs (``frame_step``,
    ``frame_length``); a missing window becomes a rectangular one (ones). Refused, with one
    line naming the node: non-constant frame_step/frame_length, ``onesided=0``, complex
    signals, non-float32 signals or windows, a window whose length is not frame_length,
    and frames longer than :data:`STFT_MAX_FRAME_LENGTH`.
    """
    rewritten = 0
    names = NameAllocator.for_graph(graph)
    for subgraph in list(gs_graphs(graph)):
        nodes = [n for n in subgraph.nodes if _is_onnx_stft(n)]
        for node in nodes:
            _rewrite_stft(node, aot, names)
        if nodes:  # drop the frame_step/frame_length constants nothing reads any more
            subgraph.cleanup().toposort()
            rewritten += len(nodes)
    if rewritten:
        _import_domain(graph)
        log.info("%d STFT node(s) -> %s::%s", rewritten, PLUGIN_DOMAIN, STFT_OP)
    return graph


#: The names :func:`use_plugins` takes -> the passes they run.
PLUGIN_PASSES: dict[str, GraphPass] = {"stft": stft_to_plugin}


def use_plugins(
    model: onnx.ModelProto, ops: Iterable[str] = ("stft",), *, aot: bool = True
) -> onnx.ModelProto:
    """``model`` with the ops named in ``ops`` (keys of :data:`PLUGIN_PASSES`) as plugin nodes.

    A result with plugin nodes imports the ``trtq`` domain, so ``onnx.checker`` accepts it.
    """
    unknown = sorted(set(ops) - set(PLUGIN_PASSES))
    if unknown:
        raise UserError(
            f"no trtq plugin for {', '.join(unknown)}",
            f"choose from: {', '.join(sorted(PLUGIN_PASSES))}",
        )
    graph = gs.import_onnx(model)
    for op in ops:
        graph = PLUGIN_PASSES[op](graph, aot=aot)
    result = stamp_producer(gs.export_onnx(graph))
    result.ir_version = model.ir_version
    for prop in model.metadata_props:
        result.metadata_props.add(key=prop.key, value=prop.value)
    if any(node.domain == PLUGIN_DOMAIN for node in result.graph.node):
        ensure_opset_import(result)
    return result


def ensure_opset_import(
    model: onnx.ModelProto, domain: str = PLUGIN_DOMAIN, version: int = PLUGIN_OPSET
) -> onnx.ModelProto:
    """Add ``domain`` to the model's opset imports if it is missing (in place)."""
    if not any(opset.domain == domain for opset in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    return model


def _is_onnx_stft(node: gs.Node) -> bool:
    return node.op == "STFT" and (node.domain or "") in ("", "ai.onnx")


def _rewrite_stft(node: gs.Node, aot: bool, names: NameAllocator) -> None:
    name = node.name or names.fresh(f"{node.outputs[0].name}_{STFT_OP}")
    where = f"STFT node '{name}'"
    inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
    signal, step_input, window, length_input = inputs[:4]
    window = window if _present(window) else None

    onesided = int(node.attrs.get("onesided", 1))
    if onesided != 1:
        raise UserError(
            f"{where} has onesided={onesided}; {PLUGIN_DOMAIN}::{STFT_OP} computes onesided "
            "transforms of real signals only",
            "export with onesided=True (torch.stft(..., onesided=True, return_complex=False))",
        )
    _check_signal(signal, where)
    frame_step = _constant_int(step_input, "frame_step", where)
    if _present(length_input):
        frame_length = _constant_int(length_input, "frame_length", where)
    elif window is not None and _static_length(window) is not None:
        frame_length = _static_length(window)
    else:
        raise UserError(
            f"{where} has no frame_length and no window of known length",
            "export the STFT with a window or a constant frame_length",
        )
    if frame_step < 1 or not 1 <= frame_length <= STFT_MAX_FRAME_LENGTH:
        raise UserError(
            f"{where}: frame_step {frame_step}, frame_length {frame_length}; "
            f"{PLUGIN_DOMAIN}::{STFT_OP} needs frame_step >= 1 and frame_length in "
            f"1..{STFT_MAX_FRAME_LENGTH}",
            "keep this STFT out of TensorRT",
        )
    if window is None:
        window = gs.Constant(
            names.fresh(f"{name}_rectangular_window"), np.ones(frame_length, np.float32)
        )
    else:
        _check_window(window, frame_length, where)

    node.inputs.clear()
    node.inputs.extend([signal, window])
    node.op = STFT_OP
    node.domain = PLUGIN_DOMAIN
    node.name = name
    node.attrs.clear()
    node.attrs.update(stft_attributes(frame_step, frame_length, aot=aot))


def stft_attributes(frame_step: int, frame_length: int, *, aot: bool = True) -> dict[str, object]:
    """The attributes of a ``trtq::STFT`` node (TensorRT's parser reads all of them)."""
    return {
        "frame_step": int(frame_step),
        "frame_length": int(frame_length),
        "onesided": 1,
        "plugin_namespace": PLUGIN_DOMAIN,
        "plugin_version": PLUGIN_VERSION,
        "aot": int(bool(aot)),
    }


def _present(tensor: gs.Tensor | None) -> bool:
    """Omitted optional inputs are missing or named ''."""
    return tensor is not None and bool(tensor.name)


def _constant_int(tensor: gs.Tensor, what: str, where: str) -> int:
    value = _constant_value(tensor)
    if value is None:
        raise UserError(
            f"{where}: {what} ('{tensor.name}') is computed at run time, but "
            f"{PLUGIN_DOMAIN}::{STFT_OP} needs it as a constant",
            "fold constants first (trtq normalize), or export with a fixed hop/frame length",
        )
    if value.size != 1 or not np.issubdtype(value.dtype, np.integer):
        raise ModelError(f"{where}: {what} must be one integer, got {value!r}", "fix the export")
    return int(value.reshape(-1)[0])


def _constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is not None and producer.op == "Constant" and "value" in producer.attrs:
        return np.asarray(producer.attrs["value"].values)
    return None


def _static_length(window: gs.Tensor) -> int | None:
    shape = window.shape
    if shape is not None and len(shape) == 1 and isinstance(shape[0], int | np.integer):
        return int(shape[0])
    return None


def _check_signal(signal: gs.Tensor, where: str) -> None:
    dtype = _dtype(signal)
    if dtype is not None and dtype != np.float32:
        raise UserError(
            f"{where}: the signal is {dtype}, {PLUGIN_DOMAIN}::{STFT_OP} computes float32",
            "rewrite before converting to FP16/BF16, or keep STFT in FP32 (--keep-fp32-ops STFT)",
        )
    # The ONNX spec says [batch, signal_length, 1 or 2]; torch.onnx.export writes a real
    # signal as [batch, signal_length], which ONNX Runtime and the plugin accept too.
    shape = signal.shape
    if shape is not None and len(shape) not in (2, 3):
        raise ModelError(
            f"{where}: the signal has rank {len(shape)}; ONNX STFT takes "
            "[batch, signal_length, 1 or 2]",
            "fix the export",
        )
    if shape is not None and len(shape) == 3 and shape[2] == 2:
        raise UserError(
            f"{where} transforms a complex signal; {PLUGIN_DOMAIN}::{STFT_OP} takes real ones",
            "keep this STFT out of TensorRT",
        )


def _check_window(window: gs.Tensor, frame_length: int, where: str) -> None:
    dtype = _dtype(window)
    if dtype is not None and dtype != np.float32:
        raise UserError(
            f"{where}: the window is {dtype}, {PLUGIN_DOMAIN}::{STFT_OP} computes float32",
            "rewrite before converting to FP16/BF16, or keep STFT in FP32",
        )
    length = _static_length(window)
    if length is not None and length != frame_length:
        raise UserError(
            f"{where}: window length {length} differs from frame_length {frame_length}; "
            f"{PLUGIN_DOMAIN}::{STFT_OP} needs them equal",
            "export with a window of frame_length samples",
        )


def _dtype(tensor: gs.Tensor) -> np.dtype | None:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:  # an onnx.TensorProto data type graphsurgeon could not map
        return None


def _import_domain(graph: gs.Graph) -> None:
    if graph.import_domains is None:
        graph.import_domains = [onnx.helper.make_opsetid("", graph.opset)]
    if not any(opset.domain == PLUGIN_DOMAIN for opset in graph.import_domains):
        graph.import_domains.append(onnx.helper.make_opsetid(PLUGIN_DOMAIN, PLUGIN_OPSET))


# --- numpy reference -----------------------------------------------------------------------


def stft_reference(
    signal: np.ndarray, window: np.ndarray | None, frame_step: int, frame_length: int
) -> np.ndarray:
    """ONNX STFT (real signal, onesided) as a direct DFT in float64: [B, frames, bins, 2] float32.

    The same sum the CUDA kernel computes, with the twiddle index k * n reduced mod N
    exactly, so it checks the kernel independently of any FFT.
    """
    x = np.asarray(signal, dtype=np.float64)
    if x.ndim == 3:
        if x.shape[-1] != 1:
            raise ValueError(f"expected a real signal [batch, length, 1], got {x.shape}")
        x = x[..., 0]
    if x.ndim != 2:
        raise ValueError(f"expected a signal [batch, length(, 1)], got {x.shape}")
    n = np.arange(frame_length)
    w = np.ones(frame_length) if window is None else np.asarray(window, np.float64)
    if w.shape != (frame_length,):
        raise ValueError(f"window shape {w.shape} is not ({frame_length},)")
    frames = 1 + (x.shape[1] - frame_length) // frame_step
    if frames < 1:
        raise ValueError(f"signal of {x.shape[1]} samples is shorter than one frame")
    starts = np.arange(frames) * frame_step
    windowed = x[:, starts[:, None] + n[None, :]] * w  # [B, frames, N]
    k = np.arange(frame_length // 2 + 1)
    angle = 2 * np.pi * ((k[:, None] * n[None, :]) % frame_length) / frame_length  # [bins, N]
    real = windowed @ np.cos(angle).T
    imag = -(windowed @ np.sin(angle).T)
    return np.stack([real, imag], axis=-1).astype(np.float32)


class STFT(OpRun):
    """``trtq::STFT`` for ``onnx.reference.ReferenceEvaluator``: :func:`stft_reference`."""

    op_domain = PLUGIN_DOMAIN

    def _run(self, signal, window, frame_step=None, frame_length=None, onesided=1, **_plugin):
        if int(onesided) != 1:
            raise ValueError(f"{PLUGIN_DOMAIN}::{STFT_OP} computes onesided transforms only")
        return (stft_reference(signal, window, int(frame_step), int(frame_length)),)


#: ``new_ops`` that let ``onnx.reference.ReferenceEvaluator`` run trtq's plugin nodes.
REFERENCE_OPS: tuple[type[OpRun], ...] = (STFT,)


def reference_evaluator(model: onnx.ModelProto, **kwargs):
    """``onnx.reference.ReferenceEvaluator`` for a model with ``trtq`` plugin nodes."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=list(REFERENCE_OPS), **kwargs)


# --- ONNX Runtime, through onnxruntime-extensions ------------------------------------------

#: onnxruntime-extensions serves Python custom ops from this one domain only.
_PYOP_DOMAIN = "ai.onnx.contrib"
_PYOP_REGISTERED = False


def onnxruntime_session(model: onnx.ModelProto):
    """An ONNX Runtime session that runs ``trtq`` plugin nodes with the numpy reference.

    ONNX Runtime has no ``trtq::STFT`` kernel; onnxruntime-extensions (``trtq[dev]``) lets a
    Python function serve as one, under its own domain, so the plugin nodes are moved there
    in a copy of the model. The rest of the graph runs on ONNX Runtime's own kernels.
    """
    import onnxruntime as ort

    from trtq.errors import require

    extensions = require(
        "onnxruntime_extensions", "dev", "running trtq plugin nodes in ONNX Runtime"
    )
    _register_pyops(extensions)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain == PLUGIN_DOMAIN:
            node.domain = _PYOP_DOMAIN
    if not any(o.domain == _PYOP_DOMAIN for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid(_PYOP_DOMAIN, 1))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.register_custom_ops_library(extensions.get_library_path())
    return ort.InferenceSession(
        copy.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _register_pyops(extensions) -> None:
    global _PYOP_REGISTERED
    if _PYOP_REGISTERED:
        return
    kinds = extensions.PyCustomOpDef

    @extensions.onnx_op(
        op_type=STFT_OP,
        inputs=[kinds.dt_float, kinds.dt_float],
        outputs=[kinds.dt_float],
        attrs={
            "frame_step": kinds.dt_int64,
            "frame_length": kinds.dt_int64,
            "onesided": kinds.dt_int64,
            "aot": kinds.dt_int64,
        },
    )
    def _stft(signal, window, **attrs):
        return stft_reference(signal, window, int(attrs["frame_step"]), int(attrs["frame_length"]))

    _PYOP_REGISTERED = True
