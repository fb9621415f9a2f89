"""The checks every public API function makes of its arguments (:mod:`trtq.api`).

The API is where a path, a proto, a threshold or a list of op names enters trtq from a
caller's Python code, so each is validated here, once, with a one-line
:class:`~trtq.errors.UserError` naming the argument and the fix; the functions below also
turn the checked values into the option objects the pipeline takes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from trtq.calib.data import ImagePreprocess
from trtq.calib.data.in_memory import DataLike, as_batches
from trtq.errors import UserError
from trtq.graph import smooth
from trtq.graph.load import load_model, model_inputs
from trtq.report.compare import resolve_labels
from trtq.tune.fallback import Budget, Target
from trtq.tune.holdout import EvaluationOptions

#: A model: the path of an .onnx file, or the model itself.
ModelLike = str | Path | onnx.ModelProto


def check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2 or bins & (bins - 1):
        raise UserError(f"bins must be a power of two >= 2, got {bins!r}", "e.g. 2048")


def check_regex(what: str, pattern: str | None) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UserError(
            f"{what}: {pattern!r} is not a regular expression ({exc})", "fix it"
        ) from exc


def fidelity_target(
    min_cosine: float | None, max_rel_l2: float | None, max_drop: float | None
) -> Target | None:
    """``quantize``'s fidelity target, or None when none is asked for."""
    if min_cosine is None and max_rel_l2 is None and max_drop is None:
        return None
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        raise UserError(f"target_cosine must be in [-1, 1], got {min_cosine}", "e.g. 0.995")
    if max_rel_l2 is not None and not max_rel_l2 >= 0:
        raise UserError(f"target_rel_l2 must be >= 0, got {max_rel_l2}", "e.g. 0.1")
    if max_drop is not None and not 0 <= max_drop <= 100:
        raise UserError(f"target_drop must be 0 to 100 points, got {max_drop}", "e.g. 0.5")
    return Target(min_cosine, max_rel_l2, max_drop)


def fallback_budget(
    model: onnx.ModelProto,
    target: Target | None,
    evaluation: EvaluationOptions,
    workers: int,
    providers: Sequence[str] | None,
    progress: bool,
    ray: str | bool | None = None,
) -> Budget | None:
    """The fallback ``quantize`` runs for a target, or None; evaluation data needs a target."""
    check_count("workers", workers)
    if target is None:
        if evaluation.data is not None:
            raise UserError(
                "evaluation data is for a fidelity target, and none was given",
                "add --target-cosine, --target-rel-l2 or --target-drop, or drop --eval",
            )
        return None
    return Budget(target, evaluation, workers, providers, progress, ray)


def evaluation_options(
    model: onnx.ModelProto,
    data: DataLike | None,
    samples: int,
    labels: np.ndarray | str | Path | None,
    label_output: str | None,
    target_drop: float | None,
    batch_size: int | None,
    preprocess: ImagePreprocess | None,
) -> EvaluationOptions:
    """Where the samples that judge a node come from: ``data``, or held out of calibration."""
    check_count("eval_samples", samples)
    if labels is not None and target_drop is None:
        raise UserError("labels are for an accuracy target", "add --target-drop PTS, or drop them")
    if data is None:
        if labels is not None:
            raise UserError("labels go with evaluation data", "pass --eval DATA too")
        return EvaluationOptions(samples=samples)
    inputs = model_inputs(model)
    read = isinstance(data, str | Path)
    batches = as_batches(
        data,
        inputs,
        batch_size=batch_size if read else None,
        limit=samples if read else None,
        preprocess=preprocess if read else None,
    )
    found = None
    if target_drop is not None:
        found, _ = resolve_labels(labels, data, [spec.name for spec in inputs], samples)
        if found is None:
            raise UserError(
                "--target-drop needs labels",
                "pass --labels PATH[:KEY], or --eval data in an .npz with a 'labels' array",
            )
    return EvaluationOptions(batches, samples, found, label_output)


def load_model_arg(
    model: ModelLike, what: str, *, load_external_data: bool = True
) -> tuple[onnx.ModelProto, str | None]:
    """(the model, its path or None) from a path or a ModelProto."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    if isinstance(model, str | Path):
        return load_model(model, load_external_data=load_external_data), str(model)
    raise UserError(
        f"{what} must be the path of an .onnx file or an onnx.ModelProto, "
        f"not {type(model).__name__}",
        "pass the file's path",
    )


def reused(value: Any, kind: type, what: str) -> tuple[Any, Path | None]:
    """(ranges to use, path to write them to): an object, or a path read if it exists."""
    if value is None:
        return None, None
    if isinstance(value, kind):
        return value, None
    if isinstance(value, str | Path):
        path = Path(value)
        return (kind.read(path), None) if path.exists() else (None, path)
    raise UserError(
        f"{what} must be a path or a {kind.__name__}, not {type(value).__name__}",
        f"pass the {what} file's path",
    )


def check_choice(what: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}", f"use one of: {', '.join(choices)}")


def smooth_quant_option(value: bool | float | None, reusing: bool) -> tuple[bool | None, float]:
    """(on/off/None for automatic, alpha) from ``quantize(smooth_quant=...)``.

    Automatic smoothing is off when ranges are read from or written to --stats/--cache:
    they must describe the activations of the graph that reads them, which is unsmoothed.
    """
    alpha = smooth.DEFAULT_ALPHA
    if value is None or value is False:
        return (False if reusing else value), alpha
    if value is not True:
        if not isinstance(value, int | float) or not 0.0 < float(value) <= 1.0:
            raise UserError(
                f"smooth_quant alpha must be in (0, 1], got {value!r}",
                "e.g. 0.5 (how much of the outliers' range moves into the weights)",
            )
        alpha = float(value)
    if reusing:
        raise UserError(
            "SmoothQuant changes the activations that --stats/--cache ranges describe",
            "drop --smooth-quant, or drop --stats/--cache",
        )
    return True, alpha


def check_thresholds(min_cosine: float | None, max_rel_l2: float | None) -> None:
    if min_cosine is not None and not -1 <= min_cosine <= 1:
        raise UserError(f"min_cosine must be in [-1, 1], got {min_cosine}", "e.g. 0.99")
    if max_rel_l2 is not None and not max_rel_l2 >= 0:
        raise UserError(f"max_rel_l2 must be >= 0, got {max_rel_l2}", "e.g. 0.1")


def check_count(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}", "e.g. 64")


def op_names(value: str | Iterable[str]) -> frozenset[str]:
    """Op names as a set; a string is comma-separated ("Conv,Gemm"), not a set of letters."""
    items = value.split(",") if isinstance(value, str) else value
    return frozenset(name.strip() for name in items if name.strip())
