"""TensorRT calibration caches and trtq's JSON statistics files.

**TensorRT cache** (text, read by TensorRT's calibrators, trtexec ``--calib``
and polygraphy): a header ``TRT-<version>-<algorithm>`` and one line
``<tensor>: <hex>`` per tensor, where ``hex`` is the big-endian bit pattern of
the float32 *scale* (amax / 127). The version is TensorRT's version integer
(8.6.1 -> 8601; from 10.0 on major*10000 + minor*100 + patch, 10.13.3 -> 101303);
TensorRT silently ignores a cache whose header does not match its own version.

**Stats file** (JSON, trtq's own): every histogram, mergeable across shards,
plus the chosen ranges; ``trtq quantize`` can start from it instead of
calibrating again.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from trtq.calib.histogram import Histogram
from trtq.calib.ranges import TensorRange
from trtq.errors import DataError
from trtq.fileio import write_text

ALGORITHMS = {"entropy": "EntropyCalibration2", "max": "MinMaxCalibration"}
DEFAULT_TRT_VERSION = "10.13.3"
_HEADER = re.compile(r"TRT-(\d+)-(\w+)")
_LINE = re.compile(r"(.+): ([0-9a-fA-F]{8})")
STATS_FORMAT = "trtq-calibration-stats"
STATS_VERSION = 1


def trt_version_int(version: str) -> int:
    """TensorRT's version integer for a "major.minor.patch" string."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*", version.strip())
    if not match:
        raise DataError(f"bad TensorRT version {version!r}", "write it like 10.13.3")
    major, minor, patch = int(match[1]), int(match[2]), int(match[3] or 0)
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def scale_to_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    return struct.unpack(">f", bytes.fromhex(text))[0]


@dataclass
class TrtCache:
    """A TensorRT calibration cache: per-tensor float32 scales."""

    scales: dict[str, float]
    algorithm: str = "EntropyCalibration2"
    version: int = field(default_factory=lambda: trt_version_int(DEFAULT_TRT_VERSION))

    @classmethod
    def from_amax(
        cls,
        amax: Mapping[str, float],
        *,
        method: str = "entropy",
        trt_version: str = DEFAULT_TRT_VERSION,
    ) -> TrtCache:
        """Scales amax/127; the header names the calibrator TensorRT would have used."""
        scales = {name: value / 127.0 for name, value in amax.items()}
        for name, scale in scales.items():
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"invalid scale {scale} for {name}")
        algorithm = ALGORITHMS.get(method, ALGORITHMS["entropy"])
        return cls(scales, algorithm, trt_version_int(trt_version))

    def to_text(self) -> str:
        lines = [f"TRT-{self.version}-{self.algorithm}"]
        lines += [f"{name}: {scale_to_hex(scale)}" for name, scale in self.scales.items()]
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> None:
        write_text(path, self.to_text())

    @classmethod
    def parse(cls, text: str, source: str = "<cache>") -> TrtCache:
        lines = text.splitlines()
        header = _HEADER.fullmatch(lines[0].strip()) if lines else None
        if header is None:
            hint = (
                "this looks like ONNX Runtime's calibration.cache (decimal ranges), not TensorRT's"
                if lines and re.search(r"\d\.\d", lines[0])
                else "expected a first line like TRT-101303-EntropyCalibration2"
            )
            raise DataError(f"{source} is not a TensorRT calibration cache", hint)
        scales = {}
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            match = _LINE.fullmatch(line.strip())
            if match is None:
                raise DataError(
                    f"{source} line {number} is corrupt: {line.strip()[:60]!r}",
                    "expected '<tensor>: <8 hex digits>'; regenerate the cache",
                )
            scales[match[1]] = hex_to_scale(match[2])
        return cls(scales, header[2], int(header[1]))

    @classmethod
    def read(cls, path: str | Path) -> TrtCache:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise DataError(f"calibration cache not found: {path}", "check the path") from exc
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path} is not a text calibration cache", "pass a .cache file"
            ) from exc
        return cls.parse(text, str(path))


@dataclass
class CalibrationStats:
    """Histograms of one calibration run (or merged shards), and the ranges chosen from them."""

    histograms: dict[str, Histogram]
    num_samples: int
    num_batches: int
    model_sha256: str
    ranges: dict[str, TensorRange] = field(default_factory=dict)
    shard: str | None = None

    def to_json(self) -> dict:
        return {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "model_sha256": self.model_sha256,
            "num_samples": self.num_samples,
            "num_batches": self.num_batches,
            "shard": self.shard,
            "ranges": {name: r.to_json() for name, r in self.ranges.items()},
            "histograms": {name: h.to_json() for name, h in self.histograms.items()},
        }

    def write(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> CalibrationStats:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"stats file not found: {path}", "check the path") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is not a trtq stats file (not JSON)", "regenerate it") from exc
        if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
            raise DataError(f"{path} is not a trtq stats file", "write it with trtq calibrate -o")
        if data.get("version") != STATS_VERSION:
            raise DataError(
                f"{path} has stats format {data.get('version')}; this trtq reads {STATS_VERSION}",
                "regenerate it with this trtq",
            )
        try:
            histograms = {n: Histogram.from_json(h) for n, h in data["histograms"].items()}
            return cls(
                histograms=histograms,
                num_samples=int(data["num_samples"]),
                num_batches=int(data["num_batches"]),
                model_sha256=str(data["model_sha256"]),
                ranges={n: _range_from_json(r) for n, r in (data.get("ranges") or {}).items()},
                shard=data.get("shard"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{path} is a corrupt trtq stats file ({exc})", "regenerate it"
            ) from exc


def _range_from_json(data: dict) -> TensorRange:
    return TensorRange(
        name=str(data["name"]),
        amax=float(data["amax"]),
        method=str(data["method"]),
        quantizable=bool(data["quantizable"]),
        reason=data.get("reason"),
    )


def merge_stats(parts: list[CalibrationStats], sources: list[str]) -> CalibrationStats:
    """Combine shard statistics; they must come from the same model and cover the same tensors."""
    first = parts[0]
    for part, source in zip(parts[1:], sources[1:], strict=True):
        if part.model_sha256 != first.model_sha256:
            raise DataError(
                f"{source} was calibrated on another model than {sources[0]}",
                "merge shards of one model only",
            )
        if part.histograms.keys() != first.histograms.keys():
            raise DataError(
                f"{source} covers other tensors than {sources[0]}",
                "calibrate every shard with the same options",
            )
    histograms = dict(first.histograms)
    for part in parts[1:]:
        histograms = {name: h.merge(part.histograms[name]) for name, h in histograms.items()}
    return CalibrationStats(
        histograms=histograms,
        num_samples=sum(p.num_samples for p in parts),
        num_batches=sum(p.num_batches for p in parts),
        model_sha256=first.model_sha256,
    )
