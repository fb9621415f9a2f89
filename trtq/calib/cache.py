"""TensorRT calibration caches and trtq's JSON statistics files.

**TensorRT cache** (text, read by TensorRT's calibrators, trtexec ``--calib``
and polygraphy): a header ``TRT-<version>-<algorithm>`` and one line
``<tensor>: <hex>`` per tensor, where ``hex`` is the big-endian bit pattern of
the float32 *scale* (amax / 127); TensorRT itself drops leading zeros (a zero
scale is written ``0``). The version is TensorRT's version integer (8.6.1 -> 8601;
from 10.0 on major*10000 + minor*100 + patch, 10.13.3 -> 101303); TensorRT
silently ignores a cache whose header does not match its own version.

The algorithm names the method that chose the ranges, honestly: TensorRT's
``EntropyCalibration2`` and ``MinMaxCalibration`` when every range is trtq's
``entropy`` or ``max``; ``TrtqMseCalibration`` and ``TrtqPercentileCalibration``
for the methods TensorRT has no calibrator for, and ``TrtqMixedCalibration`` when
the ranges come from several methods. (``entropy`` as trtq runs it takes ``mse``'s
range where the KL search locks onto a spike; such a cache is still labelled
``EntropyCalibration2``, and the log names the tensors.) trtq's graph mode reads them all;
``trtq build --calib-mode trt`` refuses trtq's own rather than pass its ranges off
as TensorRT's (see :data:`TRTQ_ONLY_ALGORITHMS`).

**Stats file** (JSON, trtq's own): every histogram, mergeable across shards,
the chosen ranges, and what the calibration was made for (model fingerprint,
placement options, method: :class:`~trtq.calib.scope.CalibrationScope`);
``trtq quantize --stats`` starts from it instead of calibrating again.

Every scale, amax and histogram read here goes through :mod:`trtq.calib.validate`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtq.calib import validate
from trtq.calib.histogram import Histogram
from trtq.calib.ranges import TensorRange
from trtq.calib.scope import CalibrationScope, scope_difference
from trtq.errors import DataError
from trtq.fileio import write_text

log = logging.getLogger(__name__)

#: Range method -> the algorithm a cache's header names.
ALGORITHMS = {
    "entropy": "EntropyCalibration2",
    "max": "MinMaxCalibration",
    "mse": "TrtqMseCalibration",
    "percentile": "TrtqPercentileCalibration",
    "mixed": "TrtqMixedCalibration",  # ranges of several methods in one cache
}
#: Headers of ranges no TensorRT calibrator computes -> the trtq method that did.
TRTQ_ONLY_ALGORITHMS = {ALGORITHMS[m]: m for m in ("mse", "percentile", "mixed")}
DEFAULT_TRT_VERSION = "10.13.3"
_HEADER = re.compile(r"TRT-(\d+)-(\w+)")
_LINE = re.compile(r"(.+): ([0-9a-fA-F]{1,8})")
STATS_FORMAT = "trtq-calibration-stats"
#: 2: records what the stats were made for ("made_for").
STATS_VERSION = 2


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
    return struct.unpack(">f", bytes.fromhex(text.rjust(8, "0")))[0]


@dataclass
class TrtCache:
    """A TensorRT calibration cache: per-tensor float32 scales."""

    scales: dict[str, float]
    algorithm: str = "EntropyCalibration2"
    version: int = field(default_factory=lambda: trt_version_int(DEFAULT_TRT_VERSION))
    #: Where it was read from, for messages (not part of the cache).
    origin: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_amax(
        cls,
        amax: Mapping[str, float],
        *,
        method: str = "entropy",
        trt_version: str = DEFAULT_TRT_VERSION,
    ) -> TrtCache:
        """Scales amax/127; the header names ``method`` (see :data:`ALGORITHMS`)."""
        if method not in ALGORITHMS:
            raise DataError(
                f"unknown range method {method!r}", f"use one of {', '.join(ALGORITHMS)}"
            )
        scales = {
            name: validate.check_amax("the ranges", name, value) / 127.0
            for name, value in amax.items()
        }
        return cls(scales, ALGORITHMS[method], trt_version_int(trt_version))

    def to_text(self) -> str:
        lines = [f"TRT-{self.version}-{self.algorithm}"]
        lines += [f"{name}: {scale_to_hex(scale)}" for name, scale in self.scales.items()]
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> None:
        write_text(path, self.to_text())

    @classmethod
    def parse(cls, text: str, source: str = "<cache>", *, check_ranges: bool = True) -> TrtCache:
        """Read a cache's text; every scale is validated unless ``check_ranges`` is False.

        Only TensorRT's own output, saved for TensorRT as it wrote it (it writes 0 for a
        tensor that was all zeros), skips the check; trtq reading it later does not.
        """
        lines = text.splitlines()
        header = _HEADER.fullmatch(lines[0].strip()) if lines else None
        if header is None:
            hint = (
                "this looks like ONNX Runtime's calibration.cache (decimal ranges), not TensorRT's"
                if lines and re.search(r"\d\.\d", lines[0])
                else "expected a first line like TRT-101303-EntropyCalibration2"
            )
            raise DataError(f"{source} is not a TensorRT calibration cache", hint)
        entries = []
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            match = _LINE.fullmatch(line.strip())
            if match is None:
                raise DataError(
                    f"{source} line {number} is corrupt: {line.strip()[:60]!r}",
                    "expected '<tensor>: <8 hex digits>'; regenerate the cache",
                )
            entries.append((number, match[1], hex_to_scale(match[2])))
        if check_ranges:
            scales = validate.cache_scales(source, entries)
        else:
            scales = {name: scale for _, name, scale in entries}
        return cls(scales, header[2], int(header[1]), origin=source)

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
    #: :func:`trtq.calib.scope.model_fingerprint` of the model as given.
    model_sha256: str
    ranges: dict[str, TensorRange] = field(default_factory=dict)
    shard: str | None = None
    #: What the statistics were made for (None: tensors named by a caller of the low-level API).
    scope: CalibrationScope | None = None
    #: Where they were read from, for messages (not part of the statistics).
    origin: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        return {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "model_sha256": self.model_sha256,
            "num_samples": self.num_samples,
            "num_batches": self.num_batches,
            "shard": self.shard,
            "made_for": None if self.scope is None else self.scope.to_json(),
            "ranges": {name: r.to_json() for name, r in self.ranges.items()},
            "histograms": {name: h.to_json() for name, h in self.histograms.items()},
        }

    def write(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> CalibrationStats:
        """A stats file, refused with one line unless every histogram and range is usable."""
        path = Path(path)
        source = str(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
        except FileNotFoundError as exc:
            raise DataError(f"stats file not found: {path}", "check the path") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is not a trtq stats file (not JSON)", "regenerate it") from exc
        except _DuplicateKey as exc:
            raise DataError(
                f"{path} lists {exc} twice", "keep one entry per name; regenerate it"
            ) from exc
        except RecursionError as exc:
            raise DataError(
                f"{path} nests too deeply to be a trtq stats file", "regenerate it"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
            raise DataError(f"{path} is not a trtq stats file", "write it with trtq calibrate -o")
        if data.get("version") != STATS_VERSION:
            raise DataError(
                f"{path} has stats format {data.get('version')}; this trtq reads {STATS_VERSION}",
                "regenerate it with this trtq",
            )
        try:
            made_for = data["made_for"]
            stats = cls(
                histograms=validate.histograms_from_json(source, data["histograms"]),
                num_samples=data["num_samples"],
                num_batches=data["num_batches"],
                model_sha256=str(data["model_sha256"]),
                ranges={
                    str(name): _range_from_json(found)
                    for name, found in _object(data.get("ranges") or {}).items()
                },
                shard=_shard_from_json(data.get("shard")),
                scope=None if made_for is None else CalibrationScope.from_json(made_for, source),
                origin=source,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{path} is a corrupt trtq stats file ({exc})", "regenerate it"
            ) from exc
        validate.check_stats(stats, source)
        stats.num_samples, stats.num_batches = int(stats.num_samples), int(stats.num_batches)
        return stats


class _DuplicateKey(ValueError):
    """A JSON object names a key twice (json.loads would silently keep the last)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(repr(key))
        found[key] = value
    return found


def _object(value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _range_from_json(data: Any) -> TensorRange:
    data = _object(data)
    reason = data.get("reason")
    quantizable = data["quantizable"]
    if not isinstance(quantizable, bool) or not isinstance(reason, str | None):
        raise TypeError("a range's quantizable must be true/false and its reason text")
    return TensorRange(
        name=str(data["name"]),
        amax=data["amax"],  # checked, with the tensor's name, by validate.check_stats
        method=str(data["method"]),
        quantizable=quantizable,
        reason=reason,
    )


def _shard_from_json(value: Any) -> str | None:
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)/(\d+)", str(value))
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f"bad shard {value!r}")
    return f"{int(match[1])}/{int(match[2])}"


def merge_stats(parts: Sequence[CalibrationStats], sources: Sequence[str]) -> CalibrationStats:
    """The statistics of one pass over all the parts' data (shards of one calibration).

    Each part is validated; they must come from the same model and options, cover the
    same tensors with the same bins. The same shard twice (by its id, or by identical
    content for unsharded parts) is refused, since its samples would count twice, and so
    are shards of different ``--shard K/N`` splits; an incomplete split is merged with a
    warning.
    """
    if not parts or len(parts) != len(sources):
        raise DataError("nothing to merge", "pass the stats files of every shard")
    for part, source in zip(parts, sources, strict=True):
        validate.check_stats(part, source)
    first, first_source = parts[0], sources[0]
    by_id: dict[str, str] = {}
    by_content: dict[str, str] = {}
    for part, source in zip(parts, sources, strict=True):
        if part.model_sha256 != first.model_sha256:
            raise DataError(
                f"{source} was calibrated on another model than {first_source}",
                "merge shards of one model only",
            )
        difference = scope_difference(first.scope, part.scope)
        if difference:
            raise DataError(
                f"{source} was calibrated with other options than {first_source} ({difference})",
                "calibrate every shard with the same options",
            )
        if part.histograms.keys() != first.histograms.keys():
            raise DataError(
                f"{source} covers other tensors than {first_source}",
                "calibrate every shard with the same options",
            )
        if _bins(part) != _bins(first):
            raise DataError(
                f"{source} has histograms of {_bins(part)} bins, {first_source} of {_bins(first)}",
                "calibrate every shard with the same --bins",
            )
        if part.shard is not None and part.shard in by_id:
            raise DataError(
                f"{source} and {by_id[part.shard]} are both shard {part.shard}: its samples "
                "would count twice",
                "merge each shard once",
            )
        digest = _content_digest(part)
        if digest in by_content:
            raise DataError(
                f"{source} holds the same statistics as {by_content[digest]}: its samples "
                "would count twice",
                "merge each shard once",
            )
        by_content[digest] = source
        if part.shard is not None:
            by_id[part.shard] = source
    _check_split(parts, sources)
    histograms = dict(first.histograms)
    for part in parts[1:]:
        histograms = {name: h.merge(part.histograms[name]) for name, h in histograms.items()}
    return CalibrationStats(
        histograms=histograms,
        num_samples=sum(p.num_samples for p in parts),
        num_batches=sum(p.num_batches for p in parts),
        model_sha256=first.model_sha256,
        scope=first.scope,
    )


def _check_split(parts: Sequence[CalibrationStats], sources: Sequence[str]) -> None:
    """All parts are shards of one K/N split (or none is a shard); say which are missing."""
    counts = {None if p.shard is None else int(p.shard.split("/")[1]) for p in parts}
    if len(counts) > 1:
        described = ", ".join(
            f"{s} ({p.shard or 'whole'})" for p, s in zip(parts, sources, strict=True)
        )
        raise DataError(
            f"the stats mix different splits: {described}",
            "merge the shards of one --shard K/N split",
        )
    (count,) = counts
    if count is None:
        return
    present = {p.shard for p in parts}
    missing = [f"{k}/{count}" for k in range(1, count + 1) if f"{k}/{count}" not in present]
    if missing:
        log.warning(
            "merging %d of %d shards (missing %s): the ranges cover only part of the data",
            len(present),
            count,
            ", ".join(missing),
        )


def _bins(stats: CalibrationStats) -> int | None:
    return next((h.bins for h in stats.histograms.values()), None)


def _content_digest(stats: CalibrationStats) -> str:
    content = {
        "histograms": {name: h.to_json() for name, h in stats.histograms.items()},
        "num_samples": stats.num_samples,
        "num_batches": stats.num_batches,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
