"""SmoothQuant: the FP32 function is unchanged, outlier channels stop costing INT8 its levels,
Q/K/V share one scale, unrolled LayerNorms and post-LN residual readers are handled; depthwise
Conv inputs are flattened into their filters (folded into a Conv, or a Mul), in CNNs too, and
group-1 Conv inputs smoothed with 1/s moved back through pooling and Relu (into the producing
Conv, or a Mul before the pool on its branch); mask-filled inputs are left alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import checked_model, float_value, run
from onnx import TensorProto, helper, numpy_helper

from trtq.graph import invariants
from trtq.graph import smooth as smooth_module
from trtq.graph.coverage import quantized_compute_nodes
from trtq.graph.smooth import channel_maxima, find_sites, first_batches, outlier_ratio, smooth
from trtq.quantizer import CalibrationOptions, quantize

WIDTH, SEQ = 64, 16
OUTLIER_CHANNELS = [3, 17, 40]
#: Max ranges keep every outlier channel in range, the case SmoothQuant is for (entropy's
#: guard or mse would clip the outliers instead, trading their error for the others').
QUIET = {"progress": False, "method": "max"}


def _gamma(rng: np.random.Generator, outliers: bool) -> np.ndarray:
    """A LayerNorm scale; with ``outliers`` a few channels 50x the rest (as in BERT)."""
    gamma = rng.uniform(0.8, 1.2, WIDTH).astype(np.float32)
    if outliers:
        gamma[OUTLIER_CHANNELS] *= 50.0
    return gamma


def layer_norm(
    nodes: list, arrays: dict, x: str, out: str, prefix: str, gamma: np.ndarray, unrolled: bool
) -> None:
    """LayerNormalization over the last axis, as one op or as exporters unroll it."""
    rng = np.random.default_rng(len(nodes))
    arrays[f"{prefix}_gamma"] = gamma
    arrays[f"{prefix}_beta"] = rng.normal(0, 0.1, WIDTH).astype(np.float32)
    if not unrolled:
        nodes.append(
            helper.make_node(
                "LayerNormalization",
                [x, f"{prefix}_gamma", f"{prefix}_beta"],
                [out],
                name=prefix,
                axis=-1,
            )
        )
        return
    arrays[f"{prefix}_two"] = np.array(2.0, np.float32)
    arrays[f"{prefix}_eps"] = np.array(1e-5, np.float32)
    p = prefix
    nodes += [
        helper.make_node("ReduceMean", [x], [f"{p}_mean"], name=f"{p}_rm1", axes=[-1]),
        helper.make_node("Sub", [x, f"{p}_mean"], [f"{p}_d"], name=f"{p}_sub"),
        helper.make_node("Pow", [f"{p}_d", f"{p}_two"], [f"{p}_sq"], name=f"{p}_pow"),
        helper.make_node("ReduceMean", [f"{p}_sq"], [f"{p}_var"], name=f"{p}_rm2", axes=[-1]),
        helper.make_node("Add", [f"{p}_var", f"{p}_eps"], [f"{p}_ve"], name=f"{p}_add_eps"),
        helper.make_node("Sqrt", [f"{p}_ve"], [f"{p}_std"], name=f"{p}_sqrt"),
        helper.make_node("Div", [f"{p}_d", f"{p}_std"], [f"{p}_n"], name=f"{p}_div"),
        helper.make_node("Mul", [f"{p}_n", f"{p}_gamma"], [f"{p}_g"], name=f"{p}_mul"),
        helper.make_node("Add", [f"{p}_g", f"{p}_beta"], [out], name=f"{p}_add"),
    ]


def _model(nodes: list, arrays: dict, outputs: list[str]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "smooth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, WIDTH])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def projections_model(
    *, unrolled: bool = False, outliers: bool = True, heads: int = 3, residual: bool = False
) -> onnx.ModelProto:
    """x -> LayerNorm -> ``heads`` MatMul projections (Q, K, V), each a graph output;
    with ``residual`` the LayerNorm output is also added back (a post-LN reader)."""
    rng = np.random.default_rng(0)
    nodes: list = []
    arrays: dict = {}
    layer_norm(nodes, arrays, "x", "ln_out", "ln", _gamma(rng, outliers), unrolled)
    outputs = []
    for i, name in enumerate("qkv"[:heads]):
        arrays[f"w_{name}"] = rng.normal(0, 0.1, (WIDTH, WIDTH)).astype(np.float32)
        nodes.append(
            helper.make_node("MatMul", ["ln_out", f"w_{name}"], [name], name=f"{name}_proj")
        )
        outputs.append(name)
        if i == 0 and residual:
            nodes.append(helper.make_node("Add", ["ln_out", name], ["res"], name="residual"))
            outputs[-1] = "res"
    return _model(nodes, arrays, outputs)


def bert_like_model(*, unrolled: bool = False, outliers: bool = True, layers: int = 2):
    """A post-LN transformer encoder (BERT's layout): attention with 4 heads and an FFN per
    layer, every LayerNorm output also read by the next residual Add."""
    rng = np.random.default_rng(1)
    nodes: list = []
    arrays: dict = {
        "heads_shape": np.array([0, 0, 4, WIDTH // 4], np.int64),
        "merge_shape": np.array([0, 0, WIDTH], np.int64),
        "inv_sqrt_d": np.array(1.0 / np.sqrt(WIDTH // 4), np.float32),
        "gelu_k": np.array(1.702, np.float32),
    }

    def linear(x: str, out: str, name: str, n_in: int, n_out: int) -> None:
        arrays[f"{name}_w"] = rng.normal(0, 1 / np.sqrt(n_in), (n_in, n_out)).astype(np.float32)
        arrays[f"{name}_b"] = rng.normal(0, 0.02, n_out).astype(np.float32)
        nodes.append(helper.make_node("MatMul", [x, f"{name}_w"], [f"{out}_mm"], name=name))
        nodes.append(
            helper.make_node("Add", [f"{out}_mm", f"{name}_b"], [out], name=f"{name}_bias")
        )

    def heads(x: str, out: str, perm: list[int]) -> None:
        nodes.append(
            helper.make_node("Reshape", [x, "heads_shape"], [f"{out}_r"], name=f"{out}_rs")
        )
        nodes.append(helper.make_node("Transpose", [f"{out}_r"], [out], name=f"{out}_t", perm=perm))

    layer_norm(nodes, arrays, "x", "h0", "emb_ln", _gamma(rng, outliers), unrolled)
    h = "h0"
    for i in range(layers):
        p = f"l{i}"
        for proj in "qkv":
            linear(h, f"{p}_{proj}", f"{p}_{proj}_proj", WIDTH, WIDTH)
        heads(f"{p}_q", f"{p}_qh", [0, 2, 1, 3])
        heads(f"{p}_k", f"{p}_kh", [0, 2, 3, 1])
        heads(f"{p}_v", f"{p}_vh", [0, 2, 1, 3])
        nodes += [
            helper.make_node("MatMul", [f"{p}_qh", f"{p}_kh"], [f"{p}_s"], name=f"{p}_scores"),
            helper.make_node("Mul", [f"{p}_s", "inv_sqrt_d"], [f"{p}_ss"], name=f"{p}_scale"),
            helper.make_node("Softmax", [f"{p}_ss"], [f"{p}_a"], name=f"{p}_softmax", axis=-1),
            helper.make_node("MatMul", [f"{p}_a", f"{p}_vh"], [f"{p}_c"], name=f"{p}_context"),
            helper.make_node(
                "Transpose", [f"{p}_c"], [f"{p}_ct"], name=f"{p}_ct", perm=[0, 2, 1, 3]
            ),
            helper.make_node("Reshape", [f"{p}_ct", "merge_shape"], [f"{p}_cm"], name=f"{p}_merge"),
        ]
        linear(f"{p}_cm", f"{p}_o", f"{p}_out_proj", WIDTH, WIDTH)
        nodes.append(helper.make_node("Add", [h, f"{p}_o"], [f"{p}_r1"], name=f"{p}_res1"))
        layer_norm(nodes, arrays, f"{p}_r1", f"{p}_h1", f"{p}_ln1", _gamma(rng, outliers), unrolled)
        linear(f"{p}_h1", f"{p}_f1", f"{p}_ffn1", WIDTH, 4 * WIDTH)
        nodes += [
            helper.make_node("Mul", [f"{p}_f1", "gelu_k"], [f"{p}_gk"], name=f"{p}_gelu_k"),
            helper.make_node("Sigmoid", [f"{p}_gk"], [f"{p}_gs"], name=f"{p}_gelu_sig"),
            helper.make_node("Mul", [f"{p}_f1", f"{p}_gs"], [f"{p}_g"], name=f"{p}_gelu"),
        ]
        linear(f"{p}_g", f"{p}_f2", f"{p}_ffn2", 4 * WIDTH, WIDTH)
        nodes.append(helper.make_node("Add", [f"{p}_h1", f"{p}_f2"], [f"{p}_r2"], name=f"{p}_res2"))
        layer_norm(nodes, arrays, f"{p}_r2", f"{p}_h2", f"{p}_ln2", _gamma(rng, outliers), unrolled)
        h = f"{p}_h2"
    linear(h, "y", "head", WIDTH, WIDTH)
    return _model(nodes, arrays, ["y"])


def data(count: int = 4, batch: int = 8, seed: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (batch, SEQ, WIDTH)).astype(np.float32)} for _ in range(count)]


def smoothed(model: onnx.ModelProto, alpha: float = 0.5, automatic: bool = False):
    sites, _ = find_sites(model)
    maxima = channel_maxima(model, [s.tensor for s in sites], data(2))
    return smooth(model, maxima, alpha, automatic=automatic)


def max_relative_change(
    a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None
) -> float:
    feeds = data(1, seed=9)[0] if feeds is None else feeds
    worst = 0.0
    for expected, got in zip(run(a, feeds), run(b, feeds), strict=True):
        diff = np.max(np.abs(expected.astype(np.float64) - got))
        worst = max(worst, float(diff / np.max(np.abs(expected))))
    return worst


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


# --- the rewrite --------------------------------------------------------------------------------


@pytest.mark.parametrize("unrolled", [False, True])
def test_qkv_share_one_scale_folded_into_the_layer_norm(unrolled: bool) -> None:
    model = projections_model(unrolled=unrolled)
    result, record = smoothed(model)
    assert [s.consumers for s in record.sites] == [("q_proj", "k_proj", "v_proj")]
    site = record.sites[0]
    assert site.inserted is None
    assert site.folded_into == (("ln_add", "ln_mul") if unrolled else ("ln",))
    before, after = initializers(model), initializers(result)
    scale = before["ln_gamma"] / after["ln_gamma"]  # gamma / s
    np.testing.assert_allclose(before["ln_beta"] / after["ln_beta"], scale, rtol=1e-5)
    for name in "qkv":  # one s for all three: every weight row j multiplied by the same s_j
        row_factor = after[f"w_{name}"][:, 0] / before[f"w_{name}"][:, 0]
        np.testing.assert_allclose(row_factor, scale, rtol=1e-4)
    # The shared s comes from the max over the three weights: s_j = sqrt(x_j / max_k |W_kj|).
    w_max = np.max([np.abs(before[f"w_{n}"]).max(axis=1) for n in "qkv"], axis=0)
    x_max = channel_maxima(model, ["ln_out"], data(2))["ln_out"]
    np.testing.assert_allclose(scale, np.sqrt(x_max / w_max), rtol=1e-4)
    assert site.outlier_ratio > 20 and site.ratio_after < site.outlier_ratio / 4
    assert max_relative_change(model, result) < 1e-5


def test_post_ln_residual_reader_gets_an_inserted_mul() -> None:
    """The residual Add must read the LayerNorm output unscaled: 1/s goes on a new Mul that
    only the projections read, and the LayerNorm keeps its gamma."""
    model = projections_model(residual=True)
    result, record = smoothed(model)
    site = record.sites[0]
    assert site.inserted is not None and site.folded_into == ()
    nodes = {n.name: n for n in result.graph.node}
    mul = nodes[site.inserted]
    assert mul.op_type == "Mul" and mul.input[0] == "ln_out"
    assert {nodes[n].input[0] for n in ("q_proj", "k_proj", "v_proj")} == {mul.output[0]}
    assert nodes["residual"].input[0] == "ln_out"
    np.testing.assert_array_equal(initializers(result)["ln_gamma"], initializers(model)["ln_gamma"])
    assert max_relative_change(model, result) < 1e-5


@pytest.mark.parametrize("unrolled", [False, True])
def test_bert_like_encoder_keeps_its_function(unrolled: bool) -> None:
    model = bert_like_model(unrolled=unrolled)
    result, record = smoothed(model)
    sites = {s.consumers: s for s in record.sites}
    # Every projection and FFN MatMul, Q/K/V sharing one site per layer.
    assert set(sites) == {
        *((f"l{i}_q_proj", f"l{i}_k_proj", f"l{i}_v_proj") for i in range(2)),
        *((f"l{i}_{name}",) for i in range(2) for name in ("out_proj", "ffn1", "ffn2")),
        ("head",),
    }
    # Post-LN: every LayerNorm output but the last is also a residual input, so 1/s is a Mul;
    # the attention context and the GELU output have no constant before them either.
    last = ("l1_ln2_add", "l1_ln2_mul") if unrolled else ("l1_ln2",)
    assert sites[("head",)].inserted is None and sites[("head",)].folded_into == last
    qkv = sites[("l0_q_proj", "l0_k_proj", "l0_v_proj")]
    assert "also read by l0_res1" in qkv.inserted_because
    assert "no per-channel constant" in sites[("l0_ffn2",)].inserted_because
    assert max_relative_change(model, result) < 1e-5


def test_automatic_mode_leaves_flat_activations_alone() -> None:
    model = projections_model(outliers=False)
    result, record = smoothed(model, automatic=True)
    assert record.sites == [] and "no outlier channels" in record.skipped[0]["reason"]
    assert initializers(result).keys() == initializers(model).keys()
    for name, value in initializers(model).items():
        np.testing.assert_array_equal(initializers(result)[name], value)


def test_shared_weight_is_copied_under_a_fresh_name() -> None:
    """A weight also read elsewhere (tied embeddings: a Gather of the same matrix) keeps its
    values there; the smoothed MatMul gets its own copy."""
    model = projections_model(heads=1)
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 5], np.int64), "rows"))
    other = helper.make_node("Gather", ["w_q", "rows"], ["other"], name="other")
    model.graph.node.append(other)
    model.graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, None))
    result, _ = smoothed(model)
    nodes = {n.name: n for n in result.graph.node}
    assert nodes["other"].input[0] == "w_q" and nodes["q_proj"].input[1] != "w_q"
    assert max_relative_change(model, result) < 1e-5


def test_outlier_ratio() -> None:
    assert outlier_ratio(np.array([1.0, 1.0, 1.0, 50.0])) == 50.0
    assert outlier_ratio(np.zeros(4)) == 1.0


def test_first_batches_give_a_one_shot_stream_back_whole() -> None:
    batches = data(5, batch=4)
    model = projections_model()
    taken, rest = first_batches(iter(batches), 6, model)
    assert len(taken) == 2
    assert [b["x"].sum() for b in rest] == [b["x"].sum() for b in batches]
    taken, rest = first_batches(batches, 6, model)
    assert rest is batches


# --- in the pipeline --------------------------------------------------------------------------


def _error(model: onnx.ModelProto, smooth_quant: bool | None, inputs=data) -> tuple[float, dict]:
    """Worst relative L2 error of the INT8 model's outputs on held-out ``inputs``."""
    calibration = CalibrationOptions(smooth_quant=smooth_quant, **QUIET)
    result = quantize(model, inputs(4), calibration=calibration)
    feeds = inputs(1, seed=11)[0]
    errors = [
        float(np.linalg.norm(q - e) / np.linalg.norm(e))
        for e, q in zip(run(model, feeds), run(result.model, feeds), strict=True)
    ]
    return max(errors), result.report


def test_smoothing_cuts_the_int8_error_of_outlier_channels() -> None:
    model = projections_model()
    plain, report = _error(model, False)
    smoothed_error, smoothed_report = _error(model, True)
    assert "smooth_quant" not in report
    assert smoothed_report["smooth_quant"]["smoothed"][0]["consumers"] == [
        "q_proj",
        "k_proj",
        "v_proj",
    ]
    assert smoothed_error < plain / 3, (plain, smoothed_error)
    assert smoothed_report["coverage"]["fraction"] == report["coverage"]["fraction"] == 1.0


def test_automatic_default_smooths_outliers_only() -> None:
    _, report = _error(projections_model(), None)
    assert report["smooth_quant"]["mode"].startswith("auto")
    assert len(report["smooth_quant"]["smoothed"]) == 1
    _, report = _error(projections_model(outliers=False), None)
    assert report["smooth_quant"]["smoothed"] == []


# --- the command and the API ----------------------------------------------------------------


@pytest.fixture(scope="module")
def outlier_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smooth")
    model_path = folder / "model.onnx"
    onnx.save(projections_model(), model_path)
    calib = folder / "calib.npz"
    np.savez(calib, x=np.concatenate([b["x"] for b in data(2)]))
    return model_path, calib


@pytest.mark.parametrize(
    ("flags", "smoothed", "alpha"),
    [
        ([], 1, 0.85),
        (["--smooth-quant"], 1, 0.85),
        (["--smooth-quant", "0.7"], 1, 0.7),
        (["--no-smooth-quant"], 0, None),
    ],
)
def test_cli_flags(outlier_files, tmp_path, capsys, flags, smoothed, alpha) -> None:
    from trtq.cli import main

    model_path, calib = outlier_files
    report = tmp_path / "report.json"
    argv = [str(model_path), "--calib", str(calib), "-o", str(tmp_path / "q.onnx")]
    assert main(["quantize", *argv, "--report", str(report), "--no-progress", *flags]) == 0
    found = json.loads(report.read_text()).get("smooth_quant")
    if smoothed:
        assert found["alpha"] == alpha and len(found["smoothed"]) == smoothed
        assert "smoothed: ln_out -> q_proj, k_proj, v_proj" in capsys.readouterr().out
    else:
        assert found is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"smooth_quant": 1.5}, "alpha must be in (0, 1]"),
        ({"smooth_quant": True, "stats": "s.json"}, "SmoothQuant changes the activations"),
    ],
)
def test_api_refuses_bad_smooth_quant(outlier_files, tmp_path, options, message) -> None:
    import trtq
    from trtq.errors import UserError

    model_path, calib = outlier_files
    if "stats" in options:
        options = {**options, "stats": tmp_path / options["stats"]}
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("]", r"\]")):
        trtq.quantize(model_path, calib, **options)


def test_automatic_smoothing_is_off_when_stats_are_written(outlier_files, tmp_path) -> None:
    """Stats written here are reused later on the unsmoothed graph: they must describe it."""
    import trtq

    model_path, calib = outlier_files
    result = trtq.quantize(model_path, calib, stats=tmp_path / "stats.json")
    assert "smooth_quant" not in result.report


def test_bert_like_encoder_placement_and_fidelity() -> None:
    """Transformer placement: projections and FFN MatMuls in INT8; attention's activation x
    activation MatMuls, LayerNorm, Softmax, GELU and the residual Adds in float (nothing
    reads a DequantizeLinear but a MatMul); smoothing cuts the error, coverage unchanged."""
    model = bert_like_model()
    plain, plain_report = _error(model, False)
    smoothed_error, report = _error(model, None)
    floats = {f["name"]: f["reason"] for f in report["float_nodes"]}
    assert set(floats) == {"l0_scores", "l0_context", "l1_scores", "l1_context"}
    assert all("activation x activation" in why for why in floats.values())
    assert report["coverage"] == plain_report["coverage"]
    assert report["coverage"]["quantized_nodes"] == 2 * 6 + 1  # q, k, v, out, ffn1, ffn2; head
    result = quantize(model, data(2), calibration=CalibrationOptions(progress=False))
    producers = {o: n for n in result.model.graph.node for o in n.output}
    for node in result.model.graph.node:
        dequantized = [
            i for i in node.input if getattr(producers.get(i), "op_type", "") == "DequantizeLinear"
        ]
        if dequantized:
            assert node.op_type == "MatMul", node.name
    assert smoothed_error < plain / 2, (plain, smoothed_error)


def test_automatic_mode_is_for_transformers_only() -> None:
    """Outlier channels after a plain per-channel Mul (no LayerNorm in the model): the default
    leaves the model alone, --smooth-quant smooths it."""
    rng = np.random.default_rng(3)
    gain = _gamma(rng, outliers=True)
    arrays = {"gain": gain, "w": rng.normal(0, 0.1, (WIDTH, WIDTH)).astype(np.float32)}
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["scaled"], name="gain"),
        helper.make_node("MatMul", ["scaled", "w"], ["y"], name="proj"),
    ]
    model = _model(nodes, arrays, ["y"])
    _, report = _error(model, None)
    assert "smooth_quant" not in report
    error, report = _error(model, True)
    assert report["smooth_quant"]["smoothed"][0]["folded_into"] == ["gain"]
    assert error < _error(model, False)[0] / 3


# --- depthwise convolutions -------------------------------------------------------------------

CHANNELS, SIDE = 16, 6
DW_OUTLIERS = [2, 9]


def conv_data(
    count: int = 2, batch: int = 4, seed: int = 5, dims: int = 2
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (batch, CHANNELS) + (SIDE,) * dims
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(count)]


def depthwise_model(
    producer: str,
    *,
    multiplier: int = 1,
    residual: bool = False,
    dims: int = 2,
    outliers: bool = True,
) -> onnx.ModelProto:
    """x -> producer -> ``act`` -> depthwise Conv ``dw`` (``multiplier`` outputs per channel,
    with a bias) -> y. ``producer``: ``hardswish`` (a per-channel gain, then HardSwish: no Conv
    to fold into), ``conv`` or ``conv_relu`` (a Conv ``conv1`` with a bias, then a Relu); with
    ``outliers`` the channels :data:`DW_OUTLIERS` of ``act`` are 30x the rest. With
    ``residual``, y = act + dw(act): ``act`` has a reader that must see it unscaled."""
    rng = np.random.default_rng(7)
    kernel, pads = (3,) * dims, [1] * (2 * dims)
    boost = np.ones(CHANNELS, np.float32)
    if outliers:
        boost[DW_OUTLIERS] = 30.0
    arrays = {
        "wd": rng.normal(0, 0.3, (CHANNELS * multiplier, 1, *kernel)).astype(np.float32),
        "bd": rng.normal(0, 0.1, CHANNELS * multiplier).astype(np.float32),
    }
    if producer == "hardswish":
        arrays["gain"] = (boost * rng.uniform(0.8, 1.2, CHANNELS)).reshape(-1, *(1,) * dims)
        nodes = [
            helper.make_node("Mul", ["x", "gain"], ["gained"], name="gain"),
            helper.make_node("HardSwish", ["gained"], ["act"], name="hardswish"),
        ]
    else:
        w1 = rng.normal(0, 0.3, (CHANNELS, CHANNELS, *kernel)).astype(np.float32)
        arrays["w1"] = w1 * boost.reshape(-1, *(1,) * (dims + 1))
        arrays["b1"] = rng.normal(0, 0.1, CHANNELS).astype(np.float32) * boost
        conv_out = "conv1_out" if producer == "conv_relu" else "act"
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], [conv_out], name="conv1", pads=pads)]
        if producer == "conv_relu":
            nodes.append(helper.make_node("Relu", ["conv1_out"], ["act"], name="relu"))
    dw_out = "dw_out" if residual else "y"
    nodes.append(
        helper.make_node(
            "Conv", ["act", "wd", "bd"], [dw_out], name="dw", group=CHANNELS, pads=pads
        )
    )
    if residual:
        nodes.append(helper.make_node("Add", ["act", "dw_out"], ["y"], name="residual"))
    arrays = {name: value.astype(np.float32) for name, value in arrays.items()}
    spatial = (SIDE,) * dims
    return checked_model(
        nodes,
        [float_value("x", "N", CHANNELS, *spatial)],
        [float_value("y", "N", CHANNELS * multiplier, *spatial)],
        arrays,
    )


def depthwise_smoothed(model: onnx.ModelProto, dims: int = 2):
    """Automatic mode: ``act`` (outliers) is smoothed, the flat graph input is left alone."""
    sites, _ = find_sites(model)
    maxima = channel_maxima(model, {s.tensor: s.axis for s in sites}, conv_data(dims=dims))
    result, record = smooth(model, maxima, 0.85, automatic=True)
    assert [s.tensor for s in record.sites] == ["act"]
    return result, record, record.sites[0]


def activation_maxima(model: onnx.ModelProto, name: str, dims: int) -> np.ndarray:
    """max |x_c| of ``name`` over :func:`conv_data`, from ONNX Runtime (not smooth's code)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    values = [run(exposed, batch)[-1] for batch in conv_data(dims=dims)]
    return np.abs(np.concatenate(values)).max(axis=(0, *range(2, 2 + dims)))


@pytest.mark.parametrize(
    ("producer", "multiplier", "residual", "dims"),
    [
        ("hardswish", 1, False, 2),
        ("conv_relu", 1, False, 2),
        ("conv", 1, True, 2),
        ("conv", 1, False, 2),
        ("conv_relu", 2, False, 2),
        ("hardswish", 2, False, 1),
        ("conv_relu", 1, False, 1),
    ],
)
def test_depthwise_input_flattened_into_its_filters(
    producer: str, multiplier: int, residual: bool, dims: int
) -> None:
    """s_c = max|x_c| / median: the filters of channel c (all ``multiplier`` of them) times
    s_c, and 1/s folded into conv1's output channels (through the Relu), or a Mul [C, 1, ...]
    read by the depthwise Conv only; the FP32 function unchanged."""
    model = depthwise_model(producer, multiplier=multiplier, residual=residual, dims=dims)
    result, record, site = depthwise_smoothed(model, dims)
    assert site.consumers == ("dw",)
    assert record.to_json()["smoothed"][0]["kind"] == "depthwise conv"
    x_max = activation_maxima(model, "act", dims)
    scale = x_max / np.median(x_max)
    assert site.outlier_ratio > 10 and site.ratio_after == pytest.approx(1.0)
    before, after = initializers(model), initializers(result)
    per_output = np.repeat(scale, multiplier).reshape(-1, *(1,) * (dims + 1))
    np.testing.assert_allclose(after["wd"], before["wd"] * per_output, rtol=1e-4)
    np.testing.assert_array_equal(after["bd"], before["bd"])
    nodes = {n.name: n for n in result.graph.node}
    if producer == "hardswish" or residual:
        assert site.folded_into == () and site.inserted is not None
        assert record.to_json()["smoothed"][0]["inserted_mul"] == site.inserted
        mul = nodes[site.inserted]
        assert mul.op_type == "Mul" and mul.input[0] == "act"
        assert nodes["dw"].input[0] == mul.output[0]
        factor = after[mul.input[1]]
        assert factor.shape == (CHANNELS, *(1,) * dims)
        np.testing.assert_allclose(factor.reshape(-1), 1.0 / scale, rtol=1e-4)
        if residual:
            assert nodes["residual"].input[0] == "act"
            assert "also read by residual" in site.inserted_because
        for name in set(before) - {"wd"}:  # the producer keeps its constants
            np.testing.assert_array_equal(after[name], before[name])
    else:
        assert site.folded_into == ("conv1",) and site.inserted is None
        assert [n.op_type for n in result.graph.node] == [n.op_type for n in model.graph.node]
        shape = (-1, *(1,) * (dims + 1))
        np.testing.assert_allclose(after["w1"], before["w1"] / scale.reshape(shape), rtol=1e-4)
        np.testing.assert_allclose(after["b1"], before["b1"] / scale, rtol=1e-4)
    assert max_relative_change(model, result, conv_data(1, seed=9, dims=dims)[0]) < 1e-5


def test_relu_input_read_elsewhere_is_not_folded_through() -> None:
    """conv1's output also feeds a second Relu: dividing conv1 would change that reader."""
    model = depthwise_model("conv_relu")
    model.graph.node.append(helper.make_node("Relu", ["conv1_out"], ["other"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, None))
    result, _, site = depthwise_smoothed(model)
    assert site.inserted is not None and "input of Relu relu is read elsewhere" in (
        site.inserted_because or ""
    )
    np.testing.assert_array_equal(initializers(result)["w1"], initializers(model)["w1"])
    assert max_relative_change(model, result, conv_data(1, seed=9)[0]) < 1e-5


def test_grouped_conv_is_not_depthwise() -> None:
    """group 8 over 16 channels: each filter reads 2 channels, and is not smoothed."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (CHANNELS, 2, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="grouped", group=CHANNELS // 2)
    model = checked_model(
        [node],
        [float_value("x", "N", CHANNELS, SIDE, SIDE)],
        [float_value("y", "N", CHANNELS, SIDE - 2, SIDE - 2)],
        {"w": w},
    )
    assert find_sites(model) == ([], [])


def cnn_model(outliers: bool) -> onnx.ModelProto:
    """A MobileNet-like block and a classifier head: conv1 -> HardSwish -> ``act`` -> depthwise
    -> Relu -> pointwise -> ``y``, and y -> GlobalAveragePool -> Gemm -> ``logits``. With
    ``outliers`` channels :data:`DW_OUTLIERS` of ``act`` are 30x the rest (their depthwise
    filters 30x smaller, as a folded BatchNorm leaves them, so only ``act`` has outliers)."""
    rng = np.random.default_rng(4)
    boost = np.ones(CHANNELS, np.float32)
    if outliers:
        boost[DW_OUTLIERS] = 30.0
    arrays = {
        "w1": rng.normal(0, 0.3, (CHANNELS, CHANNELS, 3, 3)) * boost.reshape(-1, 1, 1, 1),
        "b1": rng.normal(0, 0.1, CHANNELS) * boost,
        "wd": rng.normal(0, 0.3, (CHANNELS, 1, 3, 3)) / boost.reshape(-1, 1, 1, 1),
        "wp": rng.normal(0, 0.3, (CHANNELS, CHANNELS, 1, 1)),
        "shape": np.array([0, -1], np.int64),
        "wg": rng.normal(0, 0.3, (10, CHANNELS)),
    }
    arrays = {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in arrays.items()}
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=pads),
        helper.make_node("HardSwish", ["c1"], ["act"], name="hardswish"),
        helper.make_node("Conv", ["act", "wd"], ["d"], name="dw", group=CHANNELS, pads=pads),
        helper.make_node("Relu", ["d"], ["d_relu"], name="dw_relu"),
        helper.make_node("Conv", ["d_relu", "wp"], ["y"], name="pointwise"),
        helper.make_node("GlobalAveragePool", ["y"], ["pooled"], name="pool"),
        helper.make_node("Reshape", ["pooled", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg"], ["logits"], name="head", transB=1),
    ]
    return checked_model(
        nodes,
        [float_value("x", "N", CHANNELS, SIDE, SIDE)],
        [float_value("y", "N", CHANNELS, SIDE, SIDE), float_value("logits", "N", 10)],
        arrays,
    )


def test_automatic_mode_smooths_depthwise_outliers_in_a_cnn() -> None:
    """No LayerNorm anywhere: the depthwise input is smoothed all the same (a Mul after the
    HardSwish), the Gemm head is not, and the INT8 error falls at the same coverage;
    ``smooth_quant=False`` leaves the model alone."""
    model = cnn_model(outliers=True)
    plain, plain_report = _error(model, False, conv_data)
    error, report = _error(model, None, conv_data)
    assert "smooth_quant" not in plain_report
    found = report["smooth_quant"]
    depthwise = [s for s in found["smoothed"] if s["kind"] == "depthwise conv"]
    assert [(s["tensor"], s["consumers"]) for s in depthwise] == [("act", ["dw"])]
    assert depthwise[0]["inserted_mul"] is not None
    skipped = {s["tensor"]: s["reason"] for s in found["skipped"]}
    assert skipped["flat"] == "not a transformer (no LayerNorm feeds a MatMul)"
    assert report["coverage"] == plain_report["coverage"]
    assert error < plain / 2, (plain, error)


def test_automatic_mode_leaves_a_flat_depthwise_input_alone() -> None:
    model = cnn_model(outliers=False)
    _, report = _error(model, None, conv_data)
    found = report["smooth_quant"]
    assert "act" not in [s["tensor"] for s in found["smoothed"]]
    reasons = {s["tensor"]: s["reason"] for s in found["skipped"]}
    assert reasons["act"].startswith("no outlier channels") and "<= 2" in reasons["act"]


def test_smooth_quant_off_leaves_depthwise_filters_alone() -> None:
    model = cnn_model(outliers=True)
    calibration = CalibrationOptions(smooth_quant=False, **QUIET)
    result = quantize(model, conv_data(2), calibration=calibration)
    assert "smooth_quant" not in result.report
    assert not [n for n in result.model.graph.node if "SmoothQuant" in n.name]
    dw = next(n for n in result.model.graph.node if n.name == "dw")
    producers = {o: n for n in result.model.graph.node for o in n.output}
    weight_dq = producers[dw.input[1]]
    quantized = initializers(result.model)[weight_dq.input[0]].astype(np.float32)
    dequantized = quantized * initializers(result.model)[weight_dq.input[1]].reshape(-1, 1, 1, 1)
    original = initializers(model)["wd"]
    step = np.abs(original).max(axis=(1, 2, 3), keepdims=True) / 127
    assert np.all(np.abs(dequantized - original) <= step)


# --- ordinary convolutions, and 1/s moved through pooling --------------------------------------

CONV_OUT = 24
#: conv2's weights of this input channel are 1e-8: sqrt(x_max / w_max) ~ 2e4 is clipped to 1e3.
DEAD_INPUT = 5


def conv_model(
    producer: str, chain: tuple[str, ...] = (), *, consumer: str = "conv", se: bool = False
) -> onnx.ModelProto:
    """x -> producer -> ``chain`` (channel-wise ops, in order) -> ``act`` -> Conv ``conv2``
    (3x3, bias) -> y. ``producer``: ``hardswish`` (x times a per-channel gain, then HardSwish,
    output ``hs``) or ``conv`` (a Conv ``conv1`` with a bias, output ``c1``), whose output is
    ``act`` when there is no chain; its channels :data:`DW_OUTLIERS` are 30x the rest.
    ``consumer``: ``conv`` (group 1, :data:`CONV_OUT` outputs; the weights of the outlier
    input channels 30x smaller, as a folded BatchNorm leaves them, those of
    :data:`DEAD_INPUT` 1e-8) or ``depthwise``. Pools are 3x3, padded to keep the size; chain
    ops are named (and write) their op type in lower case. With ``se`` (the chain a global
    pool) the producer's output is also multiplied by HardSigmoid(y), squeeze-and-excitation
    style, and the graph output is that product, ``out``."""
    rng = np.random.default_rng(11)
    boost = np.ones(CHANNELS)
    boost[DW_OUTLIERS] = 30.0
    pads = [1, 1, 1, 1]
    if producer == "hardswish":
        arrays = {"gain": (boost * rng.uniform(0.8, 1.2, CHANNELS)).reshape(-1, 1, 1)}
        nodes = [
            helper.make_node("Mul", ["x", "gain"], ["gained"], name="gain"),
            helper.make_node("HardSwish", ["gained"], ["hs"], name="hardswish"),
        ]
    else:
        w1 = rng.normal(0, 0.3, (CHANNELS, CHANNELS, 3, 3))
        arrays = {"w1": w1 * boost.reshape(-1, 1, 1, 1), "b1": rng.normal(0, 0.1, CHANNELS) * boost}
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=pads)]
    produced = tensor = nodes[-1].output[0]
    for i, op in enumerate(chain):
        out = "act" if i == len(chain) - 1 else op.lower()
        window = {} if op.startswith("Global") or op == "Relu" else {"kernel_shape": [3, 3]}
        pool = {"pads": pads} if window else {}
        nodes.append(helper.make_node(op, [tensor], [out], name=op.lower(), **window, **pool))
        tensor = out
    if not chain:
        nodes[-1].output[0] = "act"
    outputs = CONV_OUT if consumer == "conv" and not se else CHANNELS
    if consumer == "conv":
        w2 = rng.normal(0, 0.3, (outputs, CHANNELS, 3, 3)) / boost.reshape(1, -1, 1, 1)
        w2[:, DEAD_INPUT] *= 1e-8
        group = {}
    else:
        w2 = rng.normal(0, 0.3, (CHANNELS, 1, 3, 3)) / boost.reshape(-1, 1, 1, 1)
        group = {"group": CHANNELS}
    arrays |= {"w2": w2, "b2": rng.normal(0, 0.1, outputs)}
    nodes.append(
        helper.make_node("Conv", ["act", "w2", "b2"], ["y"], name="conv2", pads=pads, **group)
    )
    side = 1 if any(op.startswith("Global") for op in chain) else SIDE
    result = float_value("y", "N", outputs, side, side)
    if se:
        nodes += [
            helper.make_node("HardSigmoid", ["y"], ["gate"], name="gate"),
            helper.make_node("Mul", [produced, "gate"], ["out"], name="se_mul"),
        ]
        result = float_value("out", "N", CHANNELS, SIDE, SIDE)
    arrays = {name: value.astype(np.float32) for name, value in arrays.items()}
    return checked_model(nodes, [float_value("x", "N", CHANNELS, SIDE, SIDE)], [result], arrays)


def conv_scale(model: onnx.ModelProto, dims: int = 2) -> np.ndarray:
    """s_c = sqrt(max|x_c| / max|W[:, c]|) for ``act`` -> conv2 (alpha 0.5; the weight's max
    over output channels and kernel), within [1e-3, 1e3]; x from ONNX Runtime."""
    x_max = activation_maxima(model, "act", dims)
    w_max = np.abs(initializers(model)["w2"]).max(axis=(0, *range(2, 2 + dims)))
    return np.clip(np.sqrt(x_max / w_max), 1e-3, 1e3)


@pytest.mark.parametrize("producer", ["hardswish", "conv"])
def test_conv_input_channels_take_s(producer: str) -> None:
    """A group-1 Conv: its weights of input channel c times s_c, with alpha 0.5 whatever
    alpha smooth() is given (0.85 here), the near-dead channel's s clipped to 1e3; its bias
    unchanged; 1/s a Mul [C, 1, 1] on ``act`` after the HardSwish, or folded into conv1's
    output channels; the FP32 function unchanged."""
    model = conv_model(producer)
    result, record, site = depthwise_smoothed(model)
    assert site.consumers == ("conv2",)
    assert record.to_json()["smoothed"][0]["kind"] == "conv"
    assert site.outlier_ratio > 10 and site.ratio_after < 2
    scale = conv_scale(model)
    assert scale[DEAD_INPUT] == 1e3
    before, after = initializers(model), initializers(result)
    np.testing.assert_allclose(after["w2"], before["w2"] * scale.reshape(1, -1, 1, 1), rtol=1e-4)
    np.testing.assert_array_equal(after["b2"], before["b2"])
    nodes = {n.name: n for n in result.graph.node}
    if producer == "hardswish":
        assert site.folded_into == () and "HardSwish hardswish is not a Conv" in (
            site.inserted_because or ""
        )
        mul = nodes[site.inserted]
        assert mul.op_type == "Mul" and mul.input[0] == "act"
        assert nodes["conv2"].input[0] == mul.output[0]
        np.testing.assert_allclose(after[mul.input[1]], 1 / scale.reshape(-1, 1, 1), rtol=1e-4)
        np.testing.assert_array_equal(after["gain"], before["gain"])
    else:
        assert site.folded_into == ("conv1",) and site.inserted is None
        shape = (-1, 1, 1, 1)
        np.testing.assert_allclose(after["w1"], before["w1"] / scale.reshape(shape), rtol=1e-4)
        np.testing.assert_allclose(after["b1"], before["b1"] / scale, rtol=1e-4)
    assert max_relative_change(model, result, conv_data(1, seed=9)[0]) < 1e-5


def test_automatic_mode_smooths_a_conv_input_in_a_cnn() -> None:
    """No LayerNorm, no depthwise conv: the group-1 Conv's input is smoothed by default, and
    its INT8 error falls at the same coverage."""
    model = conv_model("hardswish")
    plain, plain_report = _error(model, False, conv_data)
    error, report = _error(model, None, conv_data)
    found = [(s["tensor"], s["kind"], s["consumers"]) for s in report["smooth_quant"]["smoothed"]]
    assert found == [("act", "conv", ["conv2"])]
    assert report["coverage"] == plain_report["coverage"]
    assert report["coverage"]["quantized_nodes"] == 1
    assert error < plain / 5, (plain, error)


@pytest.mark.parametrize(
    ("chain", "consumer"),
    [
        (("Relu", "MaxPool"), "conv"),
        (("Relu", "AveragePool"), "depthwise"),
        (("GlobalMaxPool",), "conv"),
    ],
)
def test_one_over_s_moves_through_pooling_into_the_producing_conv(
    chain: tuple[str, ...], consumer: str
) -> None:
    """conv1 -> chain -> conv2: every op between them commutes with a positive per-channel
    factor, so 1/s is folded into conv1's output channels (weight and bias) and the graph
    keeps its nodes and edges; the FP32 function unchanged."""
    model = conv_model("conv", chain, consumer=consumer)
    result, _, site = depthwise_smoothed(model)
    assert site.folded_into == ("conv1",) and site.inserted is None
    assert site.inserted_because is None

    def edges(m: onnx.ModelProto) -> list:
        return [(n.name, n.op_type, list(n.input), list(n.output)) for n in m.graph.node]

    assert edges(result) == edges(model)
    before, after = initializers(model), initializers(result)
    factor = after["w2"] / before["w2"]
    scale = factor[0, :, 0, 0] if consumer == "conv" else factor[:, 0, 0, 0]
    assert scale.max() / scale.min() > 10
    shape = (1, -1, 1, 1) if consumer == "conv" else (-1, 1, 1, 1)
    np.testing.assert_allclose(after["w2"], before["w2"] * scale.reshape(shape), rtol=1e-4)
    np.testing.assert_allclose(after["w1"], before["w1"] / scale.reshape(-1, 1, 1, 1), rtol=1e-4)
    np.testing.assert_allclose(after["b1"], before["b1"] / scale, rtol=1e-4)
    assert max_relative_change(model, result, conv_data(1, seed=9)[0]) < 1e-5


@pytest.mark.parametrize("se", [False, True])
def test_mul_goes_before_the_pool_on_its_branch_only(se: bool) -> None:
    """HardSwish -> GlobalAveragePool -> conv2: no Conv to fold into, so the Mul by 1/s goes
    before the pool (which then reads it) rather than on the pool's output; with a
    squeeze-and-excitation Mul also reading the HardSwish output, that reader keeps the
    unscaled values. The FP32 function unchanged."""
    model = conv_model("hardswish", ("GlobalAveragePool",), se=se)
    result, _, site = depthwise_smoothed(model)
    nodes = {n.name: n for n in result.graph.node}
    mul = nodes[site.inserted]
    assert mul.op_type == "Mul" and mul.input[0] == "hs"
    assert nodes["globalaveragepool"].input[0] == mul.output[0]
    assert nodes["conv2"].input[0] == "act"
    reason = site.inserted_because or ""
    if se:
        assert nodes["se_mul"].input[0] == "hs"
        assert "input of GlobalAveragePool globalaveragepool is read elsewhere" in reason
    else:
        assert "HardSwish hardswish is not a Conv" in reason
    before, after = initializers(model), initializers(result)
    scale = conv_scale(model)
    np.testing.assert_allclose(after["w2"], before["w2"] * scale.reshape(1, -1, 1, 1), rtol=1e-4)
    np.testing.assert_allclose(after[mul.input[1]], 1 / scale.reshape(-1, 1, 1), rtol=1e-4)
    np.testing.assert_array_equal(after["gain"], before["gain"])
    onnx.checker.check_model(result, full_check=True)  # topologically sorted, shapes agree
    assert max_relative_change(model, result, conv_data(1, seed=9)[0]) < 1e-5


@pytest.mark.parametrize(
    ("producer", "chain"), [("hardswish", ("GlobalAveragePool",)), ("conv", ("Relu", "MaxPool"))]
)
def test_conv_input_that_is_a_graph_output_gets_its_own_mul(
    producer: str, chain: tuple[str, ...]
) -> None:
    """``act`` is also a graph output, which must stay unscaled: the Mul goes on ``act`` for
    conv2 alone, neither before the chain nor folded into conv1."""
    model = conv_model(producer, chain)
    side = 1 if chain[0].startswith("Global") else SIDE
    model.graph.output.append(float_value("act", "N", CHANNELS, side, side))
    result, _, site = depthwise_smoothed(model)
    nodes = {n.name: n for n in result.graph.node}
    mul = nodes[site.inserted]
    assert mul.input[0] == "act" and nodes["conv2"].input[0] == mul.output[0]
    assert site.folded_into == ()
    if producer == "conv":
        assert "act is also read by the graph output" in (site.inserted_because or "")
        np.testing.assert_array_equal(initializers(result)["w1"], initializers(model)["w1"])
    assert max_relative_change(model, result, conv_data(1, seed=9)[0]) < 1e-5


@pytest.mark.parametrize("fill", [-np.inf, -3.4e38])
@pytest.mark.parametrize("automatic", [False, True])
def test_mask_filled_conv_input_is_not_smoothed(fill: float, automatic: bool) -> None:
    """Where(keep, x, fill) -> Conv: a mask fill is no channel range to flatten (every s
    would be the 1e3 limit): skipped with the reason, the model unchanged."""
    arrays = {
        "fill": np.array(fill, np.float32),
        "w": np.random.default_rng(3).normal(0, 0.3, (CONV_OUT, CHANNELS, 3, 3)),
    }
    nodes = [
        helper.make_node("Where", ["keep", "x", "fill"], ["masked"], name="mask"),
        helper.make_node("Conv", ["masked", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    shape = ("N", CHANNELS, SIDE, SIDE)
    model = checked_model(
        nodes,
        [float_value("x", *shape), helper.make_tensor_value_info("keep", TensorProto.BOOL, shape)],
        [float_value("y", "N", CONV_OUT, SIDE, SIDE)],
        {k: v.astype(np.float32) for k, v in arrays.items()},
    )
    rng = np.random.default_rng(4)
    batches = [{**b, "keep": rng.random(b["x"].shape) > 0.3} for b in conv_data()]
    sites, _ = find_sites(model)
    assert [s.tensor for s in sites] == ["masked"]
    maxima = channel_maxima(model, {s.tensor: s.axis for s in sites}, batches)
    result, record = smooth(model, maxima, automatic=automatic)
    assert record.sites == []
    [skipped] = record.skipped
    assert skipped["tensor"] == "masked" and skipped["reason"].startswith("mask fills")
    assert result.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize(
    ("producer", "chain", "consumer", "se"),
    [
        ("hardswish", (), "conv", False),
        ("conv", ("Relu", "MaxPool"), "conv", False),
        ("conv", ("Relu", "AveragePool"), "depthwise", False),
        ("hardswish", ("GlobalAveragePool",), "conv", True),
    ],
)
def test_smoothed_q_dq_models_keep_trtqs_invariants(
    producer: str, chain: tuple[str, ...], consumer: str, se: bool
) -> None:
    """What quantize writes after smoothing a Conv input (a Mul on it, 1/s folded through
    pooling, a Mul before a pool) breaks none of TensorRT's invariants, and conv2 runs in
    INT8 there."""
    model = conv_model(producer, chain, consumer=consumer, se=se)
    result = quantize(model, conv_data(4), calibration=CalibrationOptions(**QUIET))
    assert [s["tensor"] for s in result.report["smooth_quant"]["smoothed"]] == ["act"]
    errors = [f for f in invariants.check(result.model) if f.severity == invariants.ERROR]
    assert errors == []
    assert "conv2" in quantized_compute_nodes(result.model)


@pytest.mark.parametrize("rank_known", [True, False])
@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [((3, 5, 4, 4), 1), ((3, 5, 7), 1), ((3, 5), 1), ((2, 6, 5), -1), ((4, 5), -1)],
)
def test_channel_maxima_match_numpy(opset: int, shape: tuple, axis: int, rank_known) -> None:
    """The in-graph reduction (axes: an attribute before opset 18, an input from 18; max and
    -min over the other axes where the rank is known, else |x| flattened) gives numpy's max
    |x| per channel over every batch."""
    act = (
        float_value("act", *shape)
        if rank_known
        else helper.make_tensor_value_info("act", TensorProto.FLOAT, None)
    )
    negate = helper.make_node("Neg", ["x"], ["act"], name="neg")
    graph = helper.make_graph([negate], "g", [float_value("x", *shape)], [act])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    rng = np.random.default_rng(3)
    batches = [{"x": rng.normal(0, 1, shape).astype(np.float32) * 4} for _ in range(3)]
    found = channel_maxima(model, {"act": axis}, batches)["act"]
    values = np.abs(np.concatenate([b["x"] for b in batches]))
    channel = axis % len(shape)
    expected = values.max(axis=tuple(i for i in range(len(shape)) if i != channel))
    np.testing.assert_array_equal(found, expected.astype(np.float64))


def test_statistics_samples_stay_within_the_budget_and_the_bounds() -> None:
    assert smooth_module.samples_for(1) == smooth_module.DEFAULT_SAMPLES
    assert smooth_module.samples_for(smooth_module.STATS_MACS // 20) == 20
    assert smooth_module.samples_for(smooth_module.STATS_MACS * 10) == smooth_module.MIN_SAMPLES
