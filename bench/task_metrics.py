"""Task metrics of a quantized model against its FP32 original, one per kind of model.

Each function takes the FP32 and the candidate outputs on the same held-out inputs (lists of
arrays, one per model call) and says how much of the *task* survived: a cosine near 1 can still
hide a detector whose boxes moved or a recognizer that reads one character differently. The
FP32 model is the reference (no labels needed): what matters for deployment is that INT8 does
what FP32 did. Pure numpy.
"""

from __future__ import annotations

import numpy as np

SCORE_THRESHOLD = 0.3  # detector anchors / text pixels that FP32 counts as found
SPEECH_THRESHOLD = 0.5


def ctc_greedy(probabilities: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of [N, T, C] class scores: best class per step, repeats collapsed,
    blanks (class 0) dropped; one index sequence per line (the characters, as indices)."""
    best = probabilities.argmax(axis=-1)
    lines = []
    for steps in best:
        keep = np.ones(len(steps), dtype=bool)
        keep[1:] = steps[1:] != steps[:-1]
        lines.append(tuple(int(c) for c in steps[keep] if c != 0))
    return lines


def strings_unchanged(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """OCR recognizer: the share of text lines read exactly as FP32 reads them."""
    ref = [line for batch in reference for line in ctc_greedy(batch)]
    cand = [line for batch in candidate for line in ctc_greedy(batch)]
    same = sum(a == b for a, b in zip(ref, cand, strict=True))
    return {"strings_unchanged": same / len(ref), "lines": len(ref)}


def mask_iou(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """Text detector: IoU of the text masks (probability > 0.3), pooled over all images."""
    inter = union = 0
    for ref, cand in zip(reference, candidate, strict=True):
        a, b = ref > SCORE_THRESHOLD, cand > SCORE_THRESHOLD
        inter += int(np.logical_and(a, b).sum())
        union += int(np.logical_or(a, b).sum())
    return {"mask_iou": inter / union if union else 1.0}


def dfl_distances(regression: np.ndarray) -> np.ndarray:
    """[..., 4 * bins] distribution logits -> [..., 4] expected distances (in bins), as the
    GFL/DFL heads of PicoDet and YOLOv8 decode their box sides."""
    logits = regression.reshape(*regression.shape[:-1], 4, -1).astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ np.arange(weights.shape[-1])


def side_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes given as (left, top, right, bottom) distances from the same anchor point."""
    inter = (np.minimum(a[..., 0], b[..., 0]) + np.minimum(a[..., 2], b[..., 2])) * (
        np.minimum(a[..., 1], b[..., 1]) + np.minimum(a[..., 3], b[..., 3])
    )
    area_a = (a[..., 0] + a[..., 2]) * (a[..., 1] + a[..., 3])
    area_b = (b[..., 0] + b[..., 2]) * (b[..., 1] + b[..., 3])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 1.0)


def detector_agreement(
    reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]], levels: int
) -> dict:
    """One-stage detector with per-level score maps [1, A, classes] (outputs 0..levels-1) and
    DFL box maps [1, A, 4 * bins] (outputs levels..2*levels-1).

    On the anchors where FP32 finds something (best class score > 0.3): the mean IoU of the
    candidate's box with FP32's at the same anchor, how often the best class is the same, and
    the largest drift of any class score (over every anchor, found or not).
    """
    ious, same_class, drift = [], [], 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        for level in range(levels):
            ref_scores, cand_scores = ref[level], cand[level]
            drift = max(drift, float(np.abs(ref_scores - cand_scores).max()))
            found = ref_scores.max(axis=-1) > SCORE_THRESHOLD
            if not found.any():
                continue
            ref_box = dfl_distances(ref[levels + level])[found]
            cand_box = dfl_distances(cand[levels + level])[found]
            ious.append(side_iou(ref_box, cand_box))
            same_class.append(
                ref_scores.argmax(axis=-1)[found] == cand_scores.argmax(axis=-1)[found]
            )
    found_count = sum(len(x) for x in ious)
    return {
        "box_iou": float(np.concatenate(ious).mean()) if ious else None,
        "class_agreement": float(np.concatenate(same_class).mean()) if same_class else None,
        "score_drift_max": drift,
        "anchors_found": found_count,
    }


def speech_agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """VAD: the share of frames whose speech/non-speech decision (p > 0.5) is unchanged, and
    the largest drift of the speech probability."""
    ref = np.concatenate([r.ravel() for r in reference])
    cand = np.concatenate([c.ravel() for c in candidate])
    return {
        "frames_agree": float(((ref > SPEECH_THRESHOLD) == (cand > SPEECH_THRESHOLD)).mean()),
        "prob_drift_max": float(np.abs(ref - cand).max()),
        "speech_frames_fp32": float((ref > SPEECH_THRESHOLD).mean()),
    }


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, tied values sharing their mean rank (as Spearman's coefficient needs)."""
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat(first + (counts - 1) / 2, counts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's on the ranks."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def sentence_similarity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """Sentence encoder: what embeddings are for is ranking pairs by similarity. Spearman's
    correlation between FP32's and the candidate's cosine similarities over every pair of
    held-out sentences (1 = the same ranking)."""

    def pair_cosines(batches: list[np.ndarray]) -> np.ndarray:
        embeddings = np.concatenate(batches).astype(np.float64)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        upper = np.triu_indices(len(embeddings), k=1)
        return (embeddings @ embeddings.T)[upper]

    ref, cand = pair_cosines(reference), pair_cosines(candidate)
    return {
        "spearman": spearman(ref, cand),
        "similarity_drift_max": float(np.abs(ref - cand).max()),
        "pairs": len(ref),
    }
