"""Hostile flag values (issue 13, class 5): refused while parsing, in one line, exit 2.

Every case runs ``trtq.cli.main`` in-process on the MNIST sample and checks the whole
contract: status 2, exactly one line on stderr of the form
``trtq <command>: error: argument <flag>: <problem>. <fix>.``, no traceback, no usage
block, and no file written (parsing ends before any work).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trtq.cli import build_parser, main
from trtq.errors import EXIT_USER_ERROR

REPO = Path(__file__).resolve().parent.parent
MODEL = str(REPO / "calib_data" / "mnist_cnn.onnx")
DATA = str(REPO / "calib_data" / "mnist_calib.npz")

#: (command, its arguments before the bad flag; OUT is replaced by a file in tmp_path)
COMMANDS = {
    "calibrate": ["calibrate", MODEL, "--calib", DATA, "-o", "OUT"],
    "quantize": ["quantize", MODEL, "--calib", DATA, "-o", "OUT"],
    "compare": ["compare", MODEL, MODEL, "--data", DATA],
    "build": ["build", MODEL, "-o", "OUT"],
    "run": ["run", MODEL, "--data", DATA, "--save-outputs", "OUT"],
    "bench": ["bench", MODEL, "--shapes", "input:1x1x28x28"],
    "normalize": ["normalize", MODEL, "-o", "OUT"],
}

CASES = [
    # command, flag, value, fragment of the message
    ("calibrate", "--shard", "3/2", "K must be from 1 to N"),
    ("calibrate", "--shard", "abc", "not K/N"),
    ("calibrate", "--shard", "0/2", "K must be from 1 to N"),
    ("calibrate", "--shard", "1/0", "K must be from 1 to N"),
    ("calibrate", "--max-memory", "lots", "bad memory size 'lots'"),
    ("calibrate", "--max-memory", "0", "out of range"),
    ("calibrate", "--max-memory", "1.2.3G", "bad memory size"),
    ("calibrate", "--bins", "0", "not a power of two from 128 to 65536"),
    ("calibrate", "--bins", "-8", "not a power of two"),
    ("calibrate", "--bins", "3000", "not a power of two"),
    ("calibrate", "--bins", str(1 << 40), "not a power of two from 128 to 65536"),
    ("calibrate", "--bins", "many", "not a whole number"),
    ("calibrate", "--percentile", "150", "150 is out of range"),
    ("calibrate", "--percentile", "nan", "not a finite number"),
    ("calibrate", "--percentile", "0", "out of range"),
    ("calibrate", "--trt-version", "abc", "bad TensorRT version 'abc'"),
    ("calibrate", "--trt-version", "11.0", "TensorRT 11 removed calibrators"),
    ("calibrate", "--providers", "tpu", "provider 'tpu' is not available"),
    ("calibrate", "--providers", ",", "names no provider"),
    ("calibrate", "--batch-size", "0", "0 is out of range"),
    ("calibrate", "--limit", "-1", "-1 is out of range"),
    ("calibrate", "--limit", "1.5", "not a whole number"),
    ("calibrate", "--resize", "2x", "is not HEIGHTxWIDTH"),
    ("calibrate", "--mean", "a,b", "not a comma-separated list of numbers"),
    ("calibrate", "--std", "0.2,0", "has a zero"),
    ("calibrate", "--std", "nan", "must be finite"),
    ("calibrate", "--scale", "1/0", "not a number or fraction"),
    ("calibrate", "--freeze-input", "sr", "is not NAME=VALUE"),
    ("calibrate", "--freeze-input", "=3", "is not NAME=VALUE"),
    ("calibrate", "--freeze-input", "sr=1e999", "is not NAME=VALUE with finite numbers"),
    ("quantize", "--exclude-nodes", "(", "not a valid regular expression"),
    ("quantize", "--keep-fp32-nodes", "[a-", "not a valid regular expression"),
    ("quantize", "--max-abs", "nan", "not a finite number"),
    ("quantize", "--max-abs", "-1", "out of range"),
    ("quantize", "--max-abs", "inf", "not a finite number"),
    ("quantize", "--max-reduction", "0", "out of range"),
    ("quantize", "--min-channels", "-1", "out of range"),
    ("quantize", "--percentile", "100.5", "out of range"),
    ("quantize", "--include-ops", "Relu", "choose from Conv,ConvTranspose,Gemm,MatMul"),
    ("quantize", "--exclude-ops", "Conv;Relu", "is not an ONNX op type"),
    ("quantize", "--keep-fp32-ops", "Soft max", "is not an ONNX op type"),
    ("quantize", "--max-memory", "lots", "bad memory size"),
    ("quantize", "--min-cosine", "1.5", "out of range"),
    ("quantize", "--max-rel-l2", "-0.1", "out of range"),
    ("quantize", "--verify-samples", "0", "out of range"),
    ("quantize", "--freeze-input", "sr=abc", "is not NAME=VALUE"),
    ("compare", "--min-cosine", "2", "give a number from -1 to 1"),
    ("compare", "--min-cosine", "nan", "not a finite number"),
    ("compare", "--max-drop", "-1", "give a number from 0 to 100"),
    ("compare", "--max-drop", "101", "out of range"),
    ("compare", "--max-rel-l2", "nan", "not a finite number"),
    ("build", "--workspace", "lots", "bad memory size 'lots'"),
    ("build", "--workspace", "4Q", "bad memory size"),
    ("build", "--builder-optimization-level", "9", "give a number from 0 to 5"),
    ("build", "--builder-optimization-level", "-1", "out of range"),
    ("build", "--shapes", "input:1xax28", "bad shape 'input:1xax28'"),
    ("build", "--shapes", "input:0x1x28x28", "dimensions must be positive"),
    ("build", "--min-shapes", "input", "bad shape 'input'"),
    ("run", "--device", "-1", "out of range"),
    ("run", "--batch-size", "0", "out of range"),
    ("bench", "--threads", "0", "give a number from 1 to 1024"),
    ("bench", "--threads", "100000", "out of range"),
    ("bench", "--iterations", "0", "out of range"),
    ("bench", "--warmup", "-1", "out of range"),
    ("bench", "--seed", "-1", "out of range"),
    ("bench", "--shapes", "input=1x1x28x28", "bad shape"),
    ("normalize", "--freeze-input", "a=1,x", "is not NAME=VALUE"),
]


def _argv(command: str, tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    out = tmp_path / f"out.{command}"
    argv = [str(out) if arg == "OUT" else arg for arg in COMMANDS[command]]
    return [*argv, *extra], out


def _parse_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expecting argparse's exit 2; return the one stderr line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_USER_ERROR
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err and "usage:" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("command", "flag", "value", "fragment"),
    CASES,
    ids=[f"{c}{f}={v}" for c, f, v, _ in CASES],
)
def test_bad_flag_value_is_one_line_at_parse_time(capsys, tmp_path, command, flag, value, fragment):
    argv, _ = _argv(command, tmp_path, f"{flag}={value}")
    line = _parse_error(capsys, argv)
    assert line.startswith(f"trtq {command}: error: argument {flag}: "), line
    assert fragment in line, line
    assert line.endswith("."), f"no fix at the end: {line}"
    assert list(tmp_path.iterdir()) == [], "a file was written before the flags were checked"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["quantize", MODEL], "the following arguments are required: -o/--output"),
        (["quantize", MODEL, "-o", "x.onnx", "--precision", "int4"], "invalid choice: 'int4'"),
        (["quantize", MODEL, "-o", "x.onnx", "--frobnicate"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_argparse_own_errors_are_one_line_with_a_pointer_to_help(capsys, argv, fragment):
    line = _parse_error(capsys, argv)
    assert line.startswith("trtq") and ": error: " in line and fragment in line, line
    assert line.endswith("--help`"), line


def test_good_values_still_parse(tmp_path):
    args = build_parser().parse_args(
        [
            *_argv("calibrate", tmp_path)[0],
            "--shard=2/4",
            "--max-memory=1.5GiB",
            "--bins=4096",
            "--percentile=99.9",
            "--trt-version=10.13.3",
            "--resize=224x224",
            "--mean=0.485,0.456,0.406",
            "--scale=1/255",
            "--freeze-input=sr=16000",
            "--providers=cpu",
        ]
    )
    assert (args.shard.index, args.shard.count) == (2, 4)
    assert args.max_memory == 3 << 29 and args.bins == 4096 and args.percentile == 99.9
    assert args.trt_version == "10.13.3" and args.resize == "224x224"
    assert args.freeze_input == ["sr=16000"] and args.providers == "cpu"
    args = build_parser().parse_args(
        [
            *_argv("quantize", tmp_path)[0],
            "--exclude-nodes=/head/.*",
            "--include-ops=Conv,MatMul",
            "--max-abs=1e4",
            "--min-channels=0",
        ]
    )
    assert args.exclude_nodes == "/head/.*" and args.include_ops == "Conv,MatMul"
    assert args.max_abs == 1e4 and args.min_channels == 0


#: Flags whose values are paths or names, checked when used (existence, names in the model).
FREE_TEXT = {
    "model",
    "reference",
    "candidate",
    "output",
    "calib",
    "data",
    "eval",
    "cache",
    "stats",
    "report",
    "report_json",
    "html",
    "compare",
    "sensitivity",
    "export_loader",
    "save_outputs",
    "timing_cache",
    "labels",
    "label_output",
    "plugins",
    "merge",
    "sample_dir",
    "keep",
}


def test_every_flag_with_a_value_is_validated_when_parsed():
    """A new flag taking numbers or syntax must come with a type from trtq.cli.flagtypes."""
    subparsers = build_parser()._subparsers._group_actions[0].choices
    unchecked = [
        f"trtq {name} {action.dest}"
        for name, parser in subparsers.items()
        for action in parser._actions
        if action.nargs != 0
        and action.type is None
        and action.choices is None
        and action.dest not in FREE_TEXT | {"help", "version"}
    ]
    assert unchecked == []
