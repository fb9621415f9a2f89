"""Run a reference and a candidate model on the same data and measure how far apart they are.

This is how a quantized or FP16 model is judged before it is built into an engine:
both models see the same batches, one at a time, and only running sums and counts
are kept (see :mod:`trtq.report.metrics`), so memory does not grow with the data.

ONNX Runtime runs both models with graph optimization level ``ORT_ENABLE_BASIC``.
At that level it keeps QuantizeLinear/DequantizeLinear nodes as they are and
computes in float between them (fake quantization), which is what TensorRT's INT8
kernels reproduce; at the default level it would fuse Q/DQ into its own integer
kernels (QLinearConv...), whose rounding and accumulation are ONNX Runtime's, not
TensorRT's.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from trtq.calib.collect import Batch
from trtq.calib.data import BatchSource
from trtq.calib.data.feeds import is_whole_feed, samples_in
from trtq.errors import DataError, UserError
from trtq.graph.load import TensorSpec, load_model, model_inputs
from trtq.report.metrics import Agreement, LabelAccuracy, OutputAgreement, json_number
from trtq.sessions import open_session

log = logging.getLogger(__name__)

#: A model as a file path or an in-memory proto.
ModelSource = str | Path | onnx.ModelProto
#: The key under which labels are looked for in an .npz file.
DEFAULT_LABELS_KEY = "labels"


@dataclass(frozen=True)
class AccuracyResult:
    """Top-1 accuracy of both models against labels, on one output."""

    output: str
    samples: int
    reference: float
    candidate: float

    @property
    def drop_points(self) -> float:
        """Accuracy lost by the candidate, in percentage points (negative: it gained)."""
        return (self.reference - self.candidate) * 100

    def to_json(self) -> dict:
        return {
            "output": self.output,
            "samples": self.samples,
            "reference": self.reference,
            "candidate": self.candidate,
            "drop_points": self.drop_points,
        }


@dataclass(frozen=True)
class ComparisonReport:
    """What :func:`compare_models` measured: agreement per output, accuracy if labelled."""

    samples: int
    batches: int
    outputs: dict[str, Agreement]
    accuracy: AccuracyResult | None

    def to_json(self) -> dict:
        return {
            "samples": self.samples,
            "batches": self.batches,
            "outputs": {name: agreement.to_json() for name, agreement in self.outputs.items()},
            "accuracy": self.accuracy.to_json() if self.accuracy else None,
        }


@dataclass(frozen=True)
class GateResult:
    """One quality gate: its threshold, the measured value, and a line that explains it."""

    name: str
    limit: float
    value: float
    passed: bool
    detail: str

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "limit": self.limit,
            "value": json_number(self.value),
            "passed": self.passed,
            "detail": self.detail,
        }


def compare_models(
    reference: ModelSource,
    candidate: ModelSource,
    batches: Iterable[Batch],
    labels: np.ndarray | None = None,
    *,
    label_output: str | None = None,
    providers: Sequence[str] | None = None,
) -> ComparisonReport:
    """Run both models on every batch and measure the candidate against the reference.

    The models must have the same input names and types and the same output names;
    outputs are matched by name. ``labels`` (one integer per sample, in data order)
    add the top-1 accuracy of both models on ``label_output`` (default: the first
    output). ``providers`` are ONNX Runtime's, short names allowed (default CPU).
    """
    ref_session = open_session(reference, providers)
    cand_session = open_session(candidate, providers)
    inputs, outputs = _matching_names(ref_session, cand_session)
    declared = _declared_inputs(reference)
    if labels is not None:
        label_output = _check_label_output(outputs, label_output)
        known = batches.num_samples if isinstance(batches, BatchSource) else None
        _check_label_count(len(labels), known)
    agreements = {name: OutputAgreement() for name in outputs}
    ref_accuracy, cand_accuracy = LabelAccuracy(), LabelAccuracy()
    samples = num_batches = 0
    for batch in batches:
        feeds = {name: batch[name] for name in inputs}
        ref_values = dict(zip(outputs, ref_session.run(outputs, feeds), strict=True))
        cand_values = dict(zip(outputs, cand_session.run(outputs, feeds), strict=True))
        whole = is_whole_feed(feeds, declared)  # one call, one sample: outputs have no batch axis
        for name, agreement in agreements.items():
            _check_same_shape(name, ref_values[name], cand_values[name])
            agreement.update(ref_values[name], cand_values[name], one_sample=whole)
        count = samples_in(feeds, declared)
        if labels is not None:
            batch_labels = labels[samples : samples + count]
            _check_label_count(len(labels), samples + count, at_least=True)
            _check_logits(label_output, ref_values[label_output], count)
            ref_accuracy.update(ref_values[label_output], batch_labels)
            cand_accuracy.update(cand_values[label_output], batch_labels)
        samples += count
        num_batches += 1
    if not num_batches:
        raise DataError("the data yielded no batches", "check the data source and --limit")
    accuracy = None
    if labels is not None:
        _check_label_count(len(labels), samples)
        accuracy = AccuracyResult(
            label_output, samples, ref_accuracy.accuracy, cand_accuracy.accuracy
        )
    log.info("compared %d output(s) on %d samples (%d batches)", len(outputs), samples, num_batches)
    return ComparisonReport(
        samples, num_batches, {name: a.result() for name, a in agreements.items()}, accuracy
    )


def _declared_inputs(model: ModelSource) -> list[TensorSpec]:
    """The model's inputs as declared (whether feeds have a batch axis depends on them)."""
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model, load_external_data=False)  # the graph alone: no weights
    return model_inputs(model)


def evaluate_gates(
    report: ComparisonReport,
    *,
    min_cosine: float | None = None,
    max_rel_l2: float | None = None,
    max_drop: float | None = None,
) -> list[GateResult]:
    """Check the report against the thresholds that were given (None: gate not asked for).

    ``min_cosine`` bounds every output's *mean* cosine from below, ``max_rel_l2`` every
    output's relative L2 error from above; ``max_drop`` bounds the accuracy drop in points
    from above and needs a report with accuracy. A NaN metric (NaN or Inf in an output)
    fails its gate.
    """
    gates = []
    if min_cosine is not None:
        gates.append(cosine_gate(report.outputs, min_cosine))
    if max_rel_l2 is not None:
        gates.append(rel_l2_gate(report.outputs, max_rel_l2))
    if max_drop is not None:
        if report.accuracy is None:
            raise ValueError("max_drop needs a report with accuracy: compare with labels")
        gates.append(_drop_gate(report.accuracy, max_drop))
    return gates


def format_report(
    report: ComparisonReport, gates: Sequence[GateResult], context: Mapping[str, str]
) -> str:
    """The text report: ``context`` lines (model paths, data), a table of outputs, accuracy
    and gates."""
    lines = [f"{key:<10} {value}" for key, value in context.items()]
    lines += ["", *_output_table(report.outputs), ""]
    if report.accuracy:
        acc = report.accuracy
        lines.append(
            f"{'accuracy':<10} reference {acc.reference:.2%}, candidate {acc.candidate:.2%}, "
            f"drop {acc.drop_points:.2f} pts ({acc.output}, {acc.samples} labels)"
        )
    for gate in gates:
        lines.append(f"{'gate':<10} {'passed' if gate.passed else 'FAILED':<6}  {gate.detail}")
    return "\n".join(lines).rstrip()


def load_labels(path: str | Path, key: str = DEFAULT_LABELS_KEY) -> np.ndarray:
    """Integer labels, one per sample, from a .npy file or the ``key`` array of an .npz."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}", "pass an .npz or .npy file")
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as stored:
                if key not in stored.files:
                    raise DataError(
                        f"{path} has no array '{key}' (arrays found: {', '.join(stored.files)})",
                        "name the array with --labels PATH:KEY",
                    )
                array = stored[key]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"cannot read labels from {path} ({exc})", "save them with numpy.save or numpy.savez"
        ) from exc
    return _as_labels(array, str(path))


def labels_in_data(data: str | Path) -> np.ndarray | None:
    """The labels stored next to the inputs in an .npz data file, or None if it has none.

    The sample data (``calib_data/*.npz``) and many exported test sets keep their
    labels in the same file, under ``labels``; using them saves a flag. The file is
    expected to be readable (open it as data first, which reports a bad file).
    """
    path = Path(data)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as stored:
        if DEFAULT_LABELS_KEY not in stored.files:
            return None
        return _as_labels(stored[DEFAULT_LABELS_KEY], str(path))


def resolve_labels(
    labels: np.ndarray | str | Path | None,
    data: object,
    input_names: Iterable[str],
    limit: int | None = None,
) -> tuple[np.ndarray | None, str | None]:
    """The labels to score against (the first ``limit`` of them), and where they came from.

    ``labels`` is an array, a ``PATH[:KEY]`` (a .npy file, or an .npz array, KEY default
    ``labels``), or None: then the ``labels`` array of an .npz ``data`` file is used if it
    has one, unless ``labels`` is the name of a model input (then it is data, not answers).
    """
    if isinstance(labels, str | Path):
        path, key = split_labels_arg(str(labels))
        array, source = load_labels(path, key), str(labels)
    elif labels is not None:
        array, source = _as_labels(np.asarray(labels), "the labels given"), "the labels given"
    elif DEFAULT_LABELS_KEY in set(input_names) or not isinstance(data, str | Path):
        return None, None
    else:
        array = labels_in_data(data)
        if array is None:
            return None, None
        source = f"{data}:{DEFAULT_LABELS_KEY}"
        log.info("using the labels in %s (pass --labels to use others)", source)
    return (array[:limit] if limit else array), source


def split_labels_arg(text: str) -> tuple[str, str]:
    """``PATH[:KEY]`` -> (path, key); only an .npz path takes a key, so other colons stay."""
    path, sep, key = text.rpartition(":")
    if sep and path.lower().endswith(".npz") and key:
        return path, key
    return text, DEFAULT_LABELS_KEY


def _as_labels(array: np.ndarray, where: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"labels in {where} are {array.dtype}, not integers",
            "save class indices (e.g. labels.astype(np.int64))",
        )
    if array.ndim > 1 and array.size != len(array):
        raise DataError(
            f"labels in {where} have shape {array.shape}, not one label per sample",
            "save a 1-D array of class indices",
        )
    return array.reshape(-1)


def _matching_names(
    reference: ort.InferenceSession, candidate: ort.InferenceSession
) -> tuple[list[str], list[str]]:
    """Input and output names shared by both models, in the reference's order."""
    for kind, ref_args, cand_args in (
        ("inputs", reference.get_inputs(), candidate.get_inputs()),
        ("outputs", reference.get_outputs(), candidate.get_outputs()),
    ):
        ref_names = [a.name for a in ref_args]
        cand_names = [a.name for a in cand_args]
        if set(ref_names) != set(cand_names):
            raise UserError(
                f"the models have different {kind}: {_difference(ref_names, cand_names)}",
                f"compare models with the same {kind} ({kind} are matched by name)",
            )
    cand_types = {a.name: a.type for a in candidate.get_inputs()}
    for arg in reference.get_inputs():
        if cand_types[arg.name] != arg.type:
            raise UserError(
                f"input '{arg.name}' is {arg.type} in the reference but "
                f"{cand_types[arg.name]} in the candidate",
                "compare models that take the same input types",
            )
    return [a.name for a in reference.get_inputs()], [a.name for a in reference.get_outputs()]


def _difference(reference: list[str], candidate: list[str]) -> str:
    only_ref = [n for n in reference if n not in candidate]
    only_cand = [n for n in candidate if n not in reference]
    parts = [
        f"only in the {role}: {', '.join(repr(n) for n in names)}"
        for role, names in (("reference", only_ref), ("candidate", only_cand))
        if names
    ]
    return "; ".join(parts)


def _check_label_output(outputs: list[str], label_output: str | None) -> str:
    if label_output is None:
        return outputs[0]
    if label_output not in outputs:
        raise UserError(
            f"no output named '{label_output}'",
            f"choose one of: {', '.join(outputs)}",
        )
    return label_output


def _check_label_count(labels: int, samples: int | None, *, at_least: bool = False) -> None:
    """Labels must pair one-to-one with samples; checked as early as the count is known."""
    if samples is None or labels == samples or (at_least and labels > samples):
        return
    raise DataError(
        f"{labels} labels for {'at least ' if at_least else ''}{samples} samples",
        "give one label per sample, in data order (with --limit N, the first N are used)",
    )


def _check_same_shape(name: str, reference: np.ndarray, candidate: np.ndarray) -> None:
    if reference.shape != candidate.shape:
        raise UserError(
            f"output '{name}' has shape {reference.shape} in the reference but "
            f"{candidate.shape} in the candidate",
            "compare models with the same output shapes",
        )


def _check_logits(name: str, values: np.ndarray, samples: int) -> None:
    """Accuracy needs a row of class scores per sample from the labelled output."""
    if values.ndim < 2 or len(values) != samples or values[0].size < 2:
        raise UserError(
            f"output '{name}' has shape {values.shape}: not one row of class scores per sample",
            "choose the classifier output with --label-output",
        )


def cosine_gate(outputs: Mapping[str, Agreement], limit: float) -> GateResult:
    """The output with the lowest mean cosine against ``limit`` (NaN counts as lowest)."""
    name, agreement = min(
        outputs.items(),
        key=lambda item: (not np.isnan(item[1].cosine_mean), item[1].cosine_mean),
    )
    value = agreement.cosine_mean
    passed = value >= limit
    relation = ">=" if passed else "<"
    return GateResult(
        "min-cosine",
        limit,
        value,
        passed,
        f"min-cosine: output '{name}' mean cosine {value:.6f} {relation} {limit:g}",
    )


def rel_l2_gate(outputs: Mapping[str, Agreement], limit: float) -> GateResult:
    """The output with the highest relative L2 error against ``limit`` (NaN counts as highest).

    Relative L2 sees what cosine cannot: outputs uniformly 32x too small have cosine 1.0
    but a relative L2 error of 0.97.
    """
    name, agreement = max(
        outputs.items(),
        key=lambda item: (np.isnan(item[1].rel_l2), item[1].rel_l2),
    )
    value = agreement.rel_l2
    passed = value <= limit
    relation = "<=" if passed else ">"
    return GateResult(
        "max-rel-l2",
        limit,
        value,
        passed,
        f"max-rel-l2: output '{name}' relative L2 error {value:.4g} {relation} {limit:g}",
    )


def _drop_gate(accuracy: AccuracyResult, limit: float) -> GateResult:
    value = accuracy.drop_points
    passed = value <= limit
    relation = "<=" if passed else ">"
    return GateResult(
        "max-drop",
        limit,
        value,
        passed,
        f"max-drop: accuracy drop {value:.2f} pts {relation} {limit:g} "
        f"(reference {accuracy.reference:.2%}, candidate {accuracy.candidate:.2%})",
    )


def _output_table(outputs: Mapping[str, Agreement]) -> list[str]:
    header = ("output", "cosine mean", "cosine min", "rel L2", "max abs", "mean abs", "top-1 agree")
    rows = [header] + [
        (
            name,
            f"{a.cosine_mean:.6f}",
            f"{a.cosine_min:.6f}",
            f"{a.rel_l2:.3g}",
            f"{a.max_abs:.3g}",
            f"{a.mean_abs:.3g}",
            "n/a" if a.top1 is None else f"{a.top1:.2%}",
        )
        for name, a in outputs.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


@dataclass(frozen=True)
class Comparison:
    """What ``trtq.compare`` measured: per output agreement, accuracy if labelled, gates."""

    reference: str
    candidate: str
    data: str
    labels: str | None
    report: ComparisonReport
    gates: list[GateResult]

    @property
    def passed(self) -> bool:
        """Every gate that was asked for passed (True when none was)."""
        return all(gate.passed for gate in self.gates)

    def to_json(self) -> dict:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "data": self.data,
            **({"labels": self.labels} if self.labels else {}),
            **self.report.to_json(),
            "gates": [gate.to_json() for gate in self.gates],
            "passed": self.passed,
        }
