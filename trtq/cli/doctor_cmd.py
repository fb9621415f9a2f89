"""``trtq doctor``: the environment, and real FP32/FP16/INT8 engine checks where a GPU is."""

from __future__ import annotations

import argparse

from trtq.cli.common import add_command, print_json
from trtq.doctor import FLOORS, SAMPLE_FILES, Diagnosis, EngineCheck, diagnose
from trtq.errors import EXIT_GATE_FAILED, UserError

EPILOG = f"""\
examples:
  trtq doctor                       # what is installed; engine checks where TensorRT + a GPU are
  trtq doctor --require-gpu --json  # a smoke test: exit 2 if the engine checks cannot run
  trtq doctor --keep out/doctor     # keep the engines, sidecars and built graphs

The engine checks build the MNIST sample ({", ".join(SAMPLE_FILES)}) as FP32, FP16 and
INT8 engines, run them through trtq.load on the 1000 held-out digits and compare them
with the FP32 model in ONNX Runtime. The sample is looked for in --sample-dir, else
calib_data/ of the trtq checkout, else <venv>/share/trtq/sample (docker/install.sh puts
it there: the Docker image has it), else ./calib_data.
Exit status: 0 every check passed (or they were skipped), 2 bad input (or skipped with
--require-gpu), 3 an engine check failed."""


def add_parser(subparsers, parents) -> None:
    parser = add_command(
        subparsers,
        "doctor",
        run,
        help="check this machine: versions, GPU, and real engine builds",
        description="Report what trtq finds here (Python, trtq and its packages, TensorRT, "
        "pycuda, the NVIDIA driver and GPUs, the MNIST sample, plugins) and, where TensorRT "
        "and a GPU are usable, build and run FP32, FP16 and INT8 engines of the sample and "
        "check them against ONNX Runtime.",
        epilog=EPILOG,
        parents=parents,
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--sample-dir", metavar="DIR", help="folder with the MNIST sample (calib_data/)"
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="write the engines there (created if missing) instead of a temporary folder",
    )
    parser.add_argument(
        "--require-gpu",
        action="store_true",
        help="exit 2 when the engine checks cannot run here (no TensorRT, GPU or pycuda)",
    )


def run(args: argparse.Namespace) -> int:
    diagnosis = diagnose(args.sample_dir, keep=args.keep)
    if args.json:
        print_json(diagnosis.to_json())
    else:
        print(format_diagnosis(diagnosis))
    if diagnosis.skipped and args.require_gpu:
        raise UserError(
            f"engine checks skipped: {diagnosis.skipped}",
            "run where TensorRT and a GPU are usable (docker run --gpus all ...), "
            "or drop --require-gpu",
        )
    return 0 if diagnosis.passed else EXIT_GATE_FAILED


def format_diagnosis(diagnosis: Diagnosis) -> str:
    """The environment (``ok``/``--``, name, value), then the engine table or why it is absent."""
    width = max(len(finding.name) for finding in diagnosis.environment)
    lines = ["environment"]
    for finding in diagnosis.environment:
        mark = "ok" if finding.ok else "--"
        lines.append(f"  {mark}  {finding.name:<{width}}  {finding.value}")
    lines.append("")
    if diagnosis.skipped:
        lines.append(f"engine checks skipped: {diagnosis.skipped}")
        return "\n".join(lines)
    lines.append(f"engine checks: the MNIST sample in {diagnosis.sample}")
    lines += _table(diagnosis.checks)
    measured = next((check for check in diagnosis.checks if check.agreement), None)
    if measured is not None and measured.reference_accuracy is not None:
        lines.append(
            f"  against ONNX Runtime FP32 on {measured.agreement.samples} held-out digits "
            f"(accuracy {measured.reference_accuracy:.2%})"
        )
    failed = [check for check in diagnosis.checks if not check.passed]
    for check in failed:
        lines.append(f"  {check.precision}: {'; '.join(check.problems())}")
    total = len(diagnosis.checks)
    lines.append(
        f"{len(failed)} of {total} engine checks FAILED"
        if failed
        else f"all {total} engine checks passed"
    )
    return "\n".join(lines)


_COLUMNS = ("precision", "engine", "build", "cosine", "min cos", "top-1", "accuracy", "floor", "")


def _table(checks: list[EngineCheck]) -> list[str]:
    rows = [_COLUMNS, *(_row(check) for check in checks)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return ["  " + "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]  # fmt: skip


def _row(check: EngineCheck) -> tuple[str, ...]:
    floor = FLOORS[check.precision]
    limits = f"cos>={floor.cosine} top-1>={floor.top1:.1%} drop<={floor.drop_points}"
    verdict = "pass" if check.passed else "FAIL"
    agreement = check.agreement
    if agreement is None or check.accuracy is None:
        return (check.precision, "-", "-", "-", "-", "-", "-", limits, verdict)
    return (
        check.precision,
        f"{(check.engine_bytes or 0) / 1024:,.0f} KiB",
        f"{check.build_seconds or 0:.1f} s",
        f"{agreement.cosine_mean:.6f}",
        f"{agreement.cosine_min:.6f}",
        "n/a" if agreement.top1 is None else f"{agreement.top1:.2%}",
        f"{check.accuracy:.2%}",
        limits,
        verdict,
    )
