"""Fidelity metrics between model outputs, and against labels."""

from __future__ import annotations

import numpy as np


def top1(logits: np.ndarray) -> np.ndarray:
    """Predicted class per sample: argmax over the last axis."""
    return np.asarray(logits).reshape(len(logits), -1).argmax(axis=1)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose top-1 class equals the label."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} predictions but {len(labels)} labels")
    return float(np.mean(top1(logits) == labels))
