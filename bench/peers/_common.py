"""What every peer runner shares: reading the calibration feeds and writing its stats.

The runners execute in the peers' own virtual environments (bench/envs/<peer>/), where trtq is
not installed, so this module needs numpy alone. Calibration data is a folder of ``.npz``
files, one model call each (arrays keyed by input name, already in the input's dtype), written
by bench/fidelity.py; every tool reads the same files in the same order.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np


def load_feeds(folder: str) -> list[dict[str, np.ndarray]]:
    """Every feed in the folder, in name order (small: the bench calibrates on 64 samples)."""
    feeds = []
    for path in sorted(Path(folder).glob("*.npz")):
        with np.load(path, allow_pickle=False) as stored:
            feeds.append({name: stored[name] for name in stored.files})
    if not feeds:
        raise SystemExit(f"no .npz feeds in {folder}")
    return feeds


def parse_args(description: str, methods: tuple[str, ...] | None = None) -> argparse.Namespace:
    """The runners' shared command line; ``methods`` (the first is the default) restricts
    ``--method`` to the settings a runner knows, so a typo fails instead of running another."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model")
    parser.add_argument("calib", help="folder of .npz feeds")
    parser.add_argument("output", help="the quantized ONNX model to write")
    parser.add_argument("stats", help="JSON file for wall time, peak RSS and notes")
    parser.add_argument("--method", default=methods[0] if methods else "default", choices=methods)
    parser.add_argument("--transformer", action="store_true", help="the model is a transformer")
    parser.add_argument("--preprocess", action="store_true", help="the tool's own pre-processing")
    return parser.parse_args()


def write_stats(path: str, start: float, **notes) -> None:
    """Wall time since ``start`` and this process's peak RSS, plus the runner's notes."""
    stats = {
        "wall_s": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **notes,
    }
    Path(path).write_text(json.dumps(stats, indent=2))
