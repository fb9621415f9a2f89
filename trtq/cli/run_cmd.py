"""``trtq run MODEL --data DATA``: run a model or engine on data; summarize or save outputs."""

from __future__ import annotations

import argparse
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtq.cli import flagtypes
from trtq.cli.common import add_command, add_data_arguments, open_data, print_json
from trtq.errors import UserError

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  trtq run calib_data/mnist_cnn.onnx --data calib_data/mnist_test.npz
  trtq run model.trtq.onnx --data test.npz --save-outputs outputs.npz --json
  trtq run model.engine --data images/ --resize 224x224 --batch-size 16

MODEL is a .onnx file (run by ONNX Runtime) or a .engine/.plan file (TensorRT).
--save-outputs writes one array per output, keyed by output name, with the batches
concatenated in data order (read it with numpy.load)."""


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "run",
        run,
        help="run a model or engine on data and summarize its outputs",
        description="Run every batch of DATA through MODEL with trtq's runtime (ONNX Runtime "
        "for .onnx, TensorRT for .engine) and print, per output, its shape, dtype, min, max "
        "and mean. --save-outputs keeps the outputs themselves.",
        epilog=EPILOG,
        parents=parents,
    )
    parser.add_argument("model", help="ONNX model (.onnx) or TensorRT engine (.engine, .plan)")
    parser.add_argument("--data", required=True, help="input data (see the README's formats)")
    parser.add_argument(
        "--save-outputs", metavar="OUT.npz", help="write every output here (numpy .npz)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    add_runtime_arguments(parser)
    add_data_arguments(parser)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of :func:`trtq.load`, shared by ``trtq run`` and ``trtq bench``."""
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--providers",
        type=flagtypes.providers,
        help="ONNX Runtime providers, comma-separated (e.g. cuda,cpu); default cpu",
    )
    group.add_argument(
        "--device", type=flagtypes.integer(0), default=0, help="GPU index (TensorRT, ORT cuda)"
    )
    group.add_argument(
        "--plugins",
        nargs="+",
        metavar="LIB",
        help="TensorRT plugins (.so libraries or .py modules) to load first (ignored for .onnx); "
        "only these load, whatever the engine's sidecar records",
    )
    group.add_argument(
        "--allow-host-code",
        action="store_true",
        help="let a version-compatible engine run the TensorRT runtime embedded in it "
        "(only for engines you trust)",
    )
    group.add_argument(
        "--max-contexts",
        type=flagtypes.integer(1),
        metavar="N",
        help="at most N TensorRT execution contexts, shared by all threads (each holds the "
        "engine's activation memory); default: what half the free GPU memory holds, 1 to 8",
    )


def load_engine(args: argparse.Namespace):
    """The engine ``args.model`` names, with the flags of :func:`add_runtime_arguments`."""
    from trtq.runtime import load

    providers = (
        [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    )
    return load(
        args.model,
        args.device,
        plugins=args.plugins,
        allow_host_code=args.allow_host_code,
        max_contexts=args.max_contexts,
        providers=providers,
    )


def run(args: argparse.Namespace) -> int:
    from trtq.calib.data import DEFAULT_BATCH_SIZE
    from trtq.calib.data.feeds import samples_in
    from trtq.runtime.base import default_batch_size

    with load_engine(args) as engine:
        if args.batch_size is None:
            args.batch_size = default_batch_size(engine.inputs, DEFAULT_BATCH_SIZE)
        specs = engine.tensor_specs()
        batches = open_data(args, args.data, specs)
        summaries = {spec.name: OutputSummary(spec.name) for spec in engine.outputs}
        keep = args.save_outputs is not None
        samples = count = 0
        seconds = 0.0
        for index, batch in enumerate(batches):
            start = time.perf_counter()
            outputs = engine.infer(batch)
            seconds += time.perf_counter() - start
            for name, array in outputs.items():
                summaries[name].add(array, index, keep=keep)
            samples += samples_in(batch, specs)
            count += 1
        info = engine.info()
    if args.save_outputs:
        save_outputs(args.save_outputs, {name: s.concatenated() for name, s in summaries.items()})
    report = {
        "model": args.model,
        **{key: value for key, value in info.items() if key != "path"},
        "data": batches.description,
        "batches": count,
        "samples": samples,
        "inference_seconds": round(seconds, 6),
        "outputs": {name: summary.to_json() for name, summary in summaries.items()},
        "saved_outputs": args.save_outputs,
    }
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return 0


@dataclass
class OutputSummary:
    """Running shape, min, max and mean of one output over batches (float64 sums)."""

    name: str
    dtype: np.dtype | None = None
    rows: int = 0
    trailing: tuple[int, ...] | None = None
    minimum: float = float("inf")
    maximum: float = float("-inf")
    total: float = 0.0
    elements: int = 0
    numeric: bool = True
    kept: list[np.ndarray] = field(default_factory=list)

    def add(self, array: np.ndarray, index: int, *, keep: bool) -> None:
        array = np.asarray(array)
        self.dtype = array.dtype
        trailing = array.shape[1:]
        if self.trailing is None:
            self.trailing = trailing
        elif trailing != self.trailing:
            self.trailing = ()  # shapes vary: only the row count is meaningful
            if keep:
                raise UserError(
                    f"output '{self.name}' changes shape across batches ({array.shape} in batch "
                    f"{index}), so its batches cannot be concatenated for --save-outputs",
                    "run with --batch-size 1 and samples of one shape, or drop --save-outputs",
                )
        self.rows += array.shape[0] if array.ndim else 1
        self.numeric = array.dtype.kind in "biuf"
        if self.numeric and array.size:
            self.minimum = min(self.minimum, float(array.min()))
            self.maximum = max(self.maximum, float(array.max()))
            self.total += float(array.sum(dtype=np.float64))
            self.elements += array.size
        if keep:
            self.kept.append(array if array.ndim else array.reshape(1))

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *(self.trailing or ()))

    def concatenated(self) -> np.ndarray:
        return np.concatenate(self.kept) if self.kept else np.empty((0,))

    def to_json(self) -> dict[str, Any]:
        from trtq.report.metrics import json_number

        stats = self.numeric and self.elements
        return {
            "dtype": str(self.dtype),
            "shape": list(self.shape),
            "min": json_number(self.minimum) if stats else None,
            "max": json_number(self.maximum) if stats else None,
            "mean": json_number(self.total / self.elements) if stats else None,
        }


def save_outputs(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` (``numpy.savez``'s format), atomically.

    The zip is written member by member rather than through ``np.savez(file, **arrays)``,
    which would clash with output names such as ``file``.
    """
    from trtq.fileio import atomic_path

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def format_report(report: dict[str, Any]) -> str:
    """Where it ran, how much data, then one row per output."""
    backend = report["backend"]
    if report.get("providers"):
        backend += f": {', '.join(report['providers'])}"
    per_second = (
        report["samples"] / report["inference_seconds"] if report["inference_seconds"] else 0
    )
    lines = [
        f"model    {report['model']} ({backend})",
        f"data     {report['data']}",
        f"time     {report['inference_seconds']:.3f} s in inference ({per_second:,.0f} samples/s)",
    ]
    rows = [("output", "dtype", "shape", "min", "max", "mean")]
    for name, out in report["outputs"].items():
        rows.append(
            (
                name,
                out["dtype"],
                "x".join(map(str, out["shape"])),
                *(_number(out[key]) for key in ("min", "max", "mean")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines.extend(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
    if report["saved_outputs"]:
        lines.append(f"wrote {report['saved_outputs']}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"
