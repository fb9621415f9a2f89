"""Output paths (issue class "output paths"): one policy for every output of every command.

The rules live in trtq/outputs.py (which paths may be written) and trtq/fileio.py (how:
atomically, OS errors as one line, stale temporary files swept, the model's rename as the
commit point of a model with external data). Each test asserts the exit code, the one line
on stderr, and the state of every file afterwards: inputs unchanged byte for byte, nothing
written where the command was refused, no temporary file left.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from trtq import fileio
from trtq.cli import main
from trtq.errors import EXIT_USER_ERROR, UserError
from trtq.outputs import writable_target

#: Standard output by a path whose folder (/proc/self/fd) takes no new files: a regression
#: cannot replace the system's /dev/stdout link with a regular file there, as root could.
STDOUT = "/dev/fd/1"
TEMP_NAME = re.compile(r"\..*\.trtq-\d+-.*\.tmp")


@pytest.fixture
def work(tmp_path, mnist_model, mnist_test) -> Path:
    """A folder with a model and data of its own, so that a broken policy can only hurt copies."""
    shutil.copy(mnist_model, tmp_path / "model.onnx")
    np.savez(tmp_path / "data.npz", input=mnist_test["input"][:16].astype(np.float32))
    return tmp_path


def trtq(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("trtq: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry under ``folder``: the bytes of files, the kind of everything else."""
    state: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode
        name = str(path.relative_to(folder))
        state[name] = path.read_bytes() if stat.S_ISREG(mode) else stat.S_IFMT(mode)
    return state


def temps(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if TEMP_NAME.fullmatch(p.name)]


def refused(capsys, work: Path, *argv, expect: tuple[str, ...]) -> None:
    """The command exits 2 with one line holding ``expect``, and changes no file."""
    before = snapshot(work)
    code, _, err = trtq(capsys, *argv)
    assert code == EXIT_USER_ERROR
    assert_one_line(err, *expect)
    assert snapshot(work) == before


def in_child(function: Callable[[], int]) -> tuple[int, str]:
    """Run ``function`` in a forked child: its exit code, and what it wrote to stderr."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            os.close(read)
            sys.stderr = os.fdopen(write, "w", buffering=1)
            code = function()
        except BaseException as exc:
            print(f"child failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as stream:
        text = stream.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


# --- distinct paths --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "another spelling", "symbolic link", "hard link"])
def test_output_equal_to_the_input_model(capsys, work, how):
    model = work / "model.onnx"
    (work / "sub").mkdir()
    output = {
        "same path": model,
        "another spelling": work / "sub" / ".." / "model.onnx",
        "symbolic link": work / "link.onnx",
        "hard link": work / "hard.onnx",
    }[how]
    if how == "symbolic link":
        output.symlink_to(model)
    if how == "hard link":
        os.link(model, output)
    refused(
        capsys,
        work,
        "normalize",
        model,
        "-o",
        output,
        expect=(f"-o/--output {output} is the same file as the model {model}", "destroy the input"),
    )


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["-o", "out.onnx", "--report", "out.onnx"], "--report out.onnx is the same file as -o"),
        (["-o", "out.onnx", "--stats", "model.onnx"], "--stats model.onnx is the same file as the"),
        (["-o", "out.onnx", "--cache", "data.npz"], "--cache data.npz is the same file as --calib"),
        (["-o", "out.onnx", "--stats", "s.json", "--cache", "s.json"], "--stats s.json is the"),
        (["-o", "out.onnx", "--export-loader", "out.onnx"], "--export-loader out.onnx is the"),
    ],
    ids=["report=o", "stats=model", "cache=data", "stats=cache", "loader=o"],
)
def test_quantize_outputs_distinct(capsys, work, monkeypatch, flags, expect):
    monkeypatch.chdir(work)
    refused(capsys, work, "quantize", "model.onnx", "--calib", "data.npz", *flags, expect=(expect,))


def test_saved_outputs_never_replace_the_data(capsys, work, monkeypatch):
    monkeypatch.chdir(work)
    expect = "--save-outputs data.npz is the same file as --data data.npz"
    argv = ["run", "model.onnx", "--data", "data.npz", "--save-outputs", "data.npz"]
    refused(capsys, work, *argv, expect=(expect,))
    folder = work / "batches"
    folder.mkdir()
    shutil.copy(work / "data.npz", folder / "a.npz")
    refused(
        capsys,
        work,
        "run",
        "model.onnx",
        "--data",
        folder,
        "--save-outputs",
        folder / "outputs.npz",
        expect=("is in the data folder of --data", "the next run would read it as data"),
    )


def test_engine_and_its_sidecar_are_outputs_too(capsys, work):
    """Checked before TensorRT is needed: `trtq build` refuses these on any machine."""
    engine = work / "m.engine"
    refused(
        capsys,
        work,
        "build",
        work / "model.onnx",
        "-o",
        engine,
        "--timing-cache",
        f"{engine}.json",
        expect=(f"is the same file as the sidecar of -o/--output {engine}.json",),
    )


# --- what an output may be -------------------------------------------------------------


def test_output_that_is_a_directory(capsys, work):
    (work / "out").mkdir()
    refused(
        capsys,
        work,
        "normalize",
        work / "model.onnx",
        "-o",
        work / "out",
        expect=(f"-o/--output {work / 'out'} is a directory", "name a file"),
    )


def test_output_that_is_a_fifo(capsys, work):
    fifo = work / "out.onnx"
    os.mkfifo(fifo)
    refused(
        capsys,
        work,
        "normalize",
        work / "model.onnx",
        "-o",
        fifo,
        expect=(f"-o/--output {fifo} is a FIFO (named pipe)",),
    )
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.fixture
def null_device(tmp_path) -> Path:
    """A node of the null device that a broken policy may destroy without harm.

    As root, a private node (a regression would replace the system's /dev/null, which
    root may do); as any other user, /dev/null itself, which such a user cannot replace.
    """
    if os.geteuid() != 0:
        return Path(os.devnull)
    node = tmp_path / "devices" / "null"
    node.parent.mkdir()
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.stat(os.devnull).st_rdev)
    except OSError as exc:
        pytest.skip(f"cannot create a device node to test with: {exc}")
    return node


def test_null_device_is_written_through_and_stays_a_device(capsys, work, null_device):
    before = os.stat(null_device)
    code, _, err = trtq(capsys, "normalize", work / "model.onnx", "-o", null_device)
    assert code == 0, err
    after = os.stat(null_device)
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    # Any number of outputs may be thrown away.
    data = ["--calib", work / "data.npz", "--limit", "8"]
    outputs = ["-o", null_device, "--report", null_device]
    code, _, err = trtq(capsys, "quantize", "-q", work / "model.onnx", *data, *outputs)
    assert code == 0, err
    # Read back when present: a stream is never a cache. Nor an engine, with its sidecar.
    for argv, expect in [
        (["quantize", "-o", work / "q.onnx", "--stats", null_device], "--stats"),
        (["build", "-o", null_device], "-o/--output"),
    ]:
        refused(
            capsys,
            work,
            argv[0],
            work / "model.onnx",
            *argv[1:],
            expect=(f"{expect} {null_device} is a stream",),
        )
    assert stat.S_ISCHR(os.stat(null_device).st_mode)


def test_other_devices_are_refused(capsys, work, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    zero = tmp_path / "zero"
    os.mknod(zero, stat.S_IFCHR | 0o666, os.makedev(1, 5))
    refused(
        capsys,
        work,
        "normalize",
        work / "model.onnx",
        "-o",
        zero,
        expect=(f"-o/--output {zero} is a character device", "/dev/stdout"),
    )
    assert stat.S_ISCHR(zero.lstat().st_mode)


def test_standard_output_gets_the_model(work):
    for name in ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1", "/dev/stderr"):
        assert writable_target(name).stream, name
    result = subprocess.run(
        [sys.executable, "-m", "trtq", "normalize", "-q", work / "model.onnx", "-o", STDOUT],
        capture_output=True,
        check=True,
    )
    model = onnx.load_from_string(result.stdout)
    assert model.graph.input[0].name == "input"
    assert temps(work) == [] and sorted(p.name for p in work.iterdir()) == [
        "data.npz",
        "model.onnx",
    ]


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["normalize", "-q", "{model}", "-o", STDOUT], f"cannot write {STDOUT}: Broken pipe"),
        (["inspect", "{model}", "--json"], "the pipe trtq was writing to was closed"),
    ],
    ids=["model", "report"],
)
def test_broken_pipe_on_stdout(work, argv, expect):
    argv = [a.format(model=work / "model.onnx") for a in argv]
    process = subprocess.Popen(
        [sys.executable, "-m", "trtq", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # the reader is gone before trtq writes
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == EXIT_USER_ERROR
    assert_one_line(err, expect)
    assert temps(work) == []


def test_name_over_255_bytes(capsys, work):
    long_name = work / ("m" * 300 + ".onnx")
    refused(
        capsys,
        work,
        "normalize",
        work / "model.onnx",
        "-o",
        long_name,
        expect=("is 305 bytes, over the 255-byte limit", "choose a shorter name"),
    )


def test_read_only_folder(mnist_model):
    """As a user without rights to the folder: refused up front, and at the write itself."""
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is closed to other users
    try:
        base.chmod(0o755)
        folder = base / "ro"
        folder.mkdir(mode=0o555)
        folder.chmod(0o555)

        def as_nobody() -> int:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            code = main(["normalize", str(mnist_model), "-o", str(folder / "out.onnx")])
            os.access = lambda *args, **kwargs: True  # past the early check: the write itself
            try:
                fileio.write_text(folder / "out.json", "{}")
            except UserError as exc:
                print(f"write: {exc.message}", file=sys.stderr)
            return code

        code, err = in_child(as_nobody)
        lines = err.strip().splitlines()
        assert code == EXIT_USER_ERROR, err
        assert lines[0] == (
            f"trtq: error: -o/--output: folder {folder} is not writable. "
            "choose another folder or fix its rights."
        )
        assert lines[1].startswith(f"write: cannot write {folder / 'out.json'}: Permission denied")
        assert len(lines) == 2 and list(folder.iterdir()) == []
    finally:
        shutil.rmtree(base)


def test_file_size_limit_is_one_line(work):
    """RLIMIT_FSIZE below the model's size: EFBIG, not a process killed by SIGXFSZ."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    before = snapshot(work)
    out = work / "out.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "trtq", "normalize", "-q", work / "model.onnx", "-o", out],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    assert_one_line(result.stderr, f"cannot write {out}: File too large", "ulimit -f")
    assert snapshot(work) == before  # no out.onnx, no temporary file


def test_os_errors_while_writing_become_one_line(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(UserError, match=f"cannot write {target}: No space left on device"):
        fileio.write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and temps(tmp_path) == []
    with pytest.raises(UserError, match="is a directory"):
        fileio.write_text(tmp_path, "x")


# --- temporary files of killed writers -------------------------------------------------


def test_temp_of_a_killed_writer_is_swept(capsys, work):
    out = work / "out.onnx"

    def killed_mid_write() -> int:
        with fileio.atomic_path(out) as tmp:
            tmp.write_bytes(b"half a model")
            os._exit(9)  # as SIGKILL: no cleanup runs

    code, _ = in_child(killed_mid_write)
    assert code == 9 and len(temps(work)) == 1
    code, _, err = trtq(capsys, "normalize", "-q", work / "model.onnx", "-o", out)
    assert code == 0, err
    assert temps(work) == [] and onnx.load(out).graph.input[0].name == "input"


def test_which_temps_are_stale(tmp_path):
    target = tmp_path / "m.onnx"
    dead = subprocess.Popen(["true"])
    dead.wait()
    old = time.time() - fileio.STALE_AFTER_S - 60
    names = {
        "dead": f".m.onnx.trtq-{dead.pid}-abcdefgh.tmp",
        "alive": f".m.onnx.trtq-{os.getpid()}-abcdefgh.tmp",
        "alive but untouched": f".m.onnx.trtq-{os.getpid()}-ijklmnop.tmp",
        "other target": f".n.onnx.trtq-{dead.pid}-abcdefgh.tmp",
        "not trtq's": f".m.onnx.{dead.pid}-abcdefgh.tmp",
    }
    for key, name in names.items():
        (tmp_path / name).write_text(key)
    os.utime(tmp_path / names["alive but untouched"], (old, old))
    fileio.sweep_stale_temps(target)
    left = {p.read_text() for p in tmp_path.iterdir()}
    assert left == {"alive", "other target", "not trtq's"}


# --- models with external data: the model's rename commits model and data together --------


def _weights(model: Path | onnx.ModelProto) -> dict[str, np.ndarray]:
    model = onnx.load(model) if isinstance(model, Path) else model
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_weights(path: Path, model: onnx.ModelProto) -> None:
    expected = _weights(model)
    got = _weights(path)
    assert got.keys() == expected.keys()
    for name, array in got.items():
        np.testing.assert_array_equal(array, expected[name])


def _scaled(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 256:
            tensor.CopyFrom(numpy_helper.from_array(array * factor, tensor.name))
    return copy


def _data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".data"))


def test_external_data_commit_point(tmp_path, mnist_model, monkeypatch):
    base = onnx.load(mnist_model)
    first, second, third = (_scaled(base, f) for f in (1.0, 2.0, 3.0))
    target = tmp_path / "big.onnx"
    fileio.save_model(first, target, external_data_over=1)  # as if it were over 2 GB
    assert len(_data_files(tmp_path)) == 1
    committed = target.read_bytes()
    real_replace = os.replace

    def crash(before_commit: bool) -> Callable[[], int]:
        def child() -> int:
            def replace(src, dst):
                if Path(dst) == target and before_commit:
                    os._exit(9)
                real_replace(src, dst)
                if Path(dst) == target:
                    os._exit(9)

            os.replace = replace
            fileio.save_model(second, target, external_data_over=1)
            return 0

        return child

    # Killed after the new data is in place, before the model is renamed: the old model
    # still loads its own weights (the new data file has a name of its own).
    assert in_child(crash(before_commit=True))[0] == 9
    assert target.read_bytes() == committed
    assert_weights(target, first)
    assert len(_data_files(tmp_path)) == 2  # one unreferenced, swept by the next save
    # Killed right after the rename: the new model with its new weights.
    assert in_child(crash(before_commit=False))[0] == 9
    assert_weights(target, second)
    # A failed rename (an exception, not a kill) cleans up after itself.
    committed = target.read_bytes()
    data_before = _data_files(tmp_path)

    def failing(src, dst):
        if Path(dst) == target:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(UserError, match=f"cannot write {target}: No space left on device"):
        fileio.save_model(third, target, external_data_over=1)
    monkeypatch.undo()
    assert target.read_bytes() == committed and _data_files(tmp_path) == data_before
    # The next good save leaves one model, one data file, and no staging folder.
    fileio.save_model(third, target, external_data_over=1)
    assert len(_data_files(tmp_path)) == 1 and temps(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", *_data_files(tmp_path)]
    assert_weights(target, third)
