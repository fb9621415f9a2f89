"""The embedded MNIST sample: real data, disjoint splits, the accuracy its README states."""

from __future__ import annotations

import json

import numpy as np
from conftest import CALIB_DATA
from helpers import run

from trtq.graph.load import load_model
from trtq.report.metrics import top1_accuracy


def test_fp32_accuracy_is_at_least_97_percent(mnist_model, mnist_test):
    logits = run(load_model(mnist_model), {"input": mnist_test["input"].astype(np.float32)})[0]
    accuracy = top1_accuracy(logits, mnist_test["labels"])
    assert accuracy >= 0.97
    recorded = json.loads((CALIB_DATA / "mnist_cnn.json").read_text())["test_accuracy"]
    assert abs(accuracy - recorded) < 1e-9


def test_calibration_and_test_sets_are_disjoint_and_balanced(mnist_test):
    with np.load(CALIB_DATA / "mnist_calib.npz", allow_pickle=False) as calib:
        calib_images, calib_labels = calib["input"], calib["labels"]
    assert calib_images.dtype == np.uint8 and calib_images.shape == (500, 1, 28, 28)
    assert mnist_test["input"].shape == (1000, 1, 28, 28)
    calib_set = {image.tobytes() for image in calib_images}
    assert not calib_set & {image.tobytes() for image in mnist_test["input"]}
    assert np.bincount(calib_labels).tolist() == [50] * 10
    assert np.bincount(mnist_test["labels"]).tolist() == [100] * 10
