"""`make demo`: trtq on the embedded MNIST sample, end to end as far as trtq goes today.

Prints the FP32 model's accuracy on the 1000 held-out digits. Later stages
(quantize, compare, build) add their lines here as they land.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from trtq.calib.data import open_batches
from trtq.graph import load_model, model_inputs
from trtq.report.metrics import top1_accuracy

SAMPLE = Path(__file__).resolve().parent.parent / "calib_data"


def accuracy(model_path: Path, data_path: Path) -> float:
    """Top-1 accuracy of an ONNX model on a labelled .npz, run with ONNX Runtime on the CPU."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    inputs = model_inputs(load_model(model_path))
    logits = [
        session.run(None, batch)[0] for batch in open_batches(data_path, inputs, batch_size=250)
    ]
    with np.load(data_path, allow_pickle=False) as data:
        labels = data["labels"]
    return top1_accuracy(np.concatenate(logits), labels)


def main() -> int:
    model, test = SAMPLE / "mnist_cnn.onnx", SAMPLE / "mnist_test.npz"
    fp32 = accuracy(model, test)
    print(f"FP32 accuracy on {test.name} (1000 held-out digits): {fp32:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
