"""Run a rewritten model on the CPU and measure how far it moved from the FP32 original.

ONNX Runtime's CPU provider executes Q/DQ graphs and most FP16 ops, but not
every op in FP16 or BF16. When it cannot load a model, small graphs are run
with ``onnx.reference.ReferenceEvaluator`` (pure numpy, slow but complete);
larger ones are reported as unverified rather than guessed at. The report says
which backend produced the figures.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx

from trtq.calib.collect import batch_size, first_samples
from trtq.report.metrics import per_sample_cosine
from trtq.sessions import open_session

log = logging.getLogger(__name__)

#: Work the numpy reference evaluator may be given (multiply-accumulates, all samples).
REFERENCE_EVALUATOR_MAX_MACS = 200_000_000


def run_outputs(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], macs_per_sample: int
) -> tuple[list[np.ndarray] | None, dict[str, np.ndarray], str]:
    """(outputs, the feeds they came from, backend: 'onnxruntime', 'onnx.reference' or 'none: why').

    The reference evaluator runs only as many samples as its work budget allows.
    """
    feeds = dict(feeds)
    try:
        return open_session(model).run(None, feeds), feeds, "onnxruntime"
    except Exception as exc:  # ORT's NOT_IMPLEMENTED and friends have no common base class
        reason = str(exc).strip().splitlines()[0][:200]
        log.info("ONNX Runtime cannot run the rewritten model (%s)", reason)
    samples = batch_size(feeds)
    affordable = min(samples, REFERENCE_EVALUATOR_MAX_MACS // max(macs_per_sample, 1))
    if affordable < 1:
        why = "ONNX Runtime cannot run it and it is too large for onnx.reference"
        return None, feeds, f"none: {why} ({reason})"
    from onnx.reference import ReferenceEvaluator

    subset = first_samples(feeds, affordable, model)
    return list(ReferenceEvaluator(model).run(None, subset)), subset, "onnx.reference"


def numeric_check(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | None,
    macs_per_sample: int,
) -> dict:
    """Per-output mean/min cosine of ``candidate`` against ``reference`` on one batch."""
    if feeds is None:
        return {"backend": "none: no data to run", "outputs": {}}
    # Data may carry more than the model takes now (a frozen input, labels): feed what it takes.
    wanted = {v.name for v in candidate.graph.input}
    feeds = {name: array for name, array in feeds.items() if name in wanted}
    actual, feeds, backend = run_outputs(candidate, feeds, macs_per_sample)
    if actual is None:
        return {"backend": backend, "outputs": {}}
    expected = open_session(reference).run(None, feeds)
    names = [o.name for o in reference.graph.output]
    outputs = {}
    for name, ref, got in zip(names, expected, actual, strict=True):
        if not np.issubdtype(np.asarray(ref).dtype, np.floating):
            continue
        cosine = per_sample_cosine(np.asarray(ref, np.float64), np.asarray(got, np.float64))
        outputs[name] = {"cosine_mean": float(np.mean(cosine)), "cosine_min": float(np.min(cosine))}
    return {"backend": backend, "samples": batch_size(feeds), "outputs": outputs}
