"""Hostile data files (issue class "resource bombs"): headers that lie, zip bombs, image bombs.

Each case runs the real command in a child process under an address-space limit and a
timeout, and asserts the exit code, the one line on stderr, and that the files are as
they were. The checks these exercise live in trtq/calib/data/arrays.py (header claims
against file sizes, lazy reads) and trtq/calib/data/images.py (Pillow's bomb guard).
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from trtq.calib.data import open_batches
from trtq.cli import main
from trtq.errors import EXIT_USER_ERROR, DataError
from trtq.graph.load import TensorSpec

MNIST_SAMPLE = (1, 28, 28)
#: Twice what `trtq calibrate` needs on the MNIST sample: a bomb that allocates hits it.
ADDRESS_SPACE = 2 << 30

# The child's own peak (VmHWM, in kB): ru_maxrss would also count the pages of the pytest
# process it was forked from, whose peak survives the exec.
_RUNNER = """
import re, sys
from trtq.cli import main
code = main(sys.argv[1:])
sys.stderr.flush()
with open("/proc/self/status") as status:
    print(re.search(r"VmHWM:\\s*(\\d+)", status.read()).group(1), file=sys.__stderr__)
sys.exit(code)
"""


@dataclass
class Run:
    code: int
    lines: list[str]
    maxrss_mb: float
    seconds: float


def run_trtq(*argv, timeout: float = 30) -> Run:
    """The CLI in a child process limited to :data:`ADDRESS_SPACE`; its peak memory too."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
    )
    seconds = time.monotonic() - start
    lines = result.stderr.strip().splitlines()
    maxrss = float(lines.pop()) / 1024 if lines and lines[-1].isdigit() else float("nan")
    return Run(result.returncode, lines, maxrss, seconds)


def trtq_here(capsys, *argv) -> Run:
    """The CLI in this process, for cases that cannot blow up (their guard is not memory)."""
    start = time.monotonic()
    code = main([str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    return Run(code, lines, float("nan"), time.monotonic() - start)


def assert_refused(run: Run, *fragments: str) -> None:
    assert run.code == EXIT_USER_ERROR, run.lines
    assert len(run.lines) == 1, run.lines
    assert run.lines[0].startswith("trtq: error: ")
    for fragment in fragments:
        assert fragment in run.lines[0], run.lines[0]


def digest(folder: Path) -> dict[str, str]:
    """Every file in ``folder`` by name, with the hash of its bytes."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def npy_header(shape, dtype="<f4", version=(1, 0)) -> bytes:
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    buffer = io.BytesIO()
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buffer, header)
    else:
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


# --- header bombs ---------------------------------------------------------------------


def test_npy_header_claiming_a_billion_samples(mnist_model, tmp_path):
    bomb = tmp_path / "bomb.npy"
    bomb.write_bytes(npy_header((10**9, *MNIST_SAMPLE)) + bytes(64))
    assert bomb.stat().st_size < 256
    before = digest(tmp_path)
    run = run_trtq("inspect", mnist_model, "--data", bomb, timeout=20)
    assert_refused(run, str(bomb), "header claims a 1000000000x1x28x28 float32 array", "3.1 TB")
    assert run.seconds < 15
    stats = tmp_path / "stats.json"
    run = run_trtq("calibrate", mnist_model, "--calib", bomb, "-o", stats, timeout=20)
    assert_refused(run, str(bomb), "header claims")
    assert digest(tmp_path) == before  # nothing written, the bomb untouched


def test_npz_member_header_claiming_a_billion_samples(mnist_model, tmp_path):
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.npy", npy_header((10**9, *MNIST_SAMPLE)) + bytes(3136))
    before = digest(tmp_path)
    run = run_trtq("inspect", mnist_model, "--data", bomb, "--limit", "16", timeout=20)
    assert_refused(run, f"{bomb} (array 'input'): the header claims a 1000000000x1x28x28")
    assert digest(tmp_path) == before


def test_zip_declaring_more_than_deflate_can_produce(tmp_path):
    """A central directory that declares 4 GB for a member of a few hundred bytes."""
    bomb = tmp_path / "forged.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.npy", npy_header((100_000, *MNIST_SAMPLE)) + bytes(3136))
    raw = bytearray(bomb.read_bytes())
    entry = raw.index(b"PK\x01\x02")
    raw[entry + 24 : entry + 28] = struct.pack("<I", 0xFFFFFFF0)  # uncompressed size
    bomb.write_bytes(bytes(raw))
    spec = TensorSpec("input", np.dtype(np.float32), ("N", *MNIST_SAMPLE))
    with pytest.raises(DataError, match="more than its compression can produce"):
        open_batches(bomb, [spec])


def test_truncated_npy_is_one_line(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.ones((10, *MNIST_SAMPLE), np.float32))
    cut = tmp_path / "cut.npy"
    cut.write_bytes(good.read_bytes()[:-100])
    spec = TensorSpec("input", np.dtype(np.float32), ("N", *MNIST_SAMPLE))
    with pytest.raises(DataError, match=r"only 31\.3 kB of data follow it"):
        open_batches(cut, [spec])


def test_empty_samples_cannot_be_claimed_by_the_billion(tmp_path):
    bomb = tmp_path / "empty.npy"
    bomb.write_bytes(npy_header((10**9, 0)))
    spec = TensorSpec("x", np.dtype(np.float32), ("N", "T"))
    with pytest.raises(DataError, match="holds 1000000000 samples with no values"):
        open_batches(bomb, [spec])


def test_data_path_that_is_a_fifo_does_not_block(mnist_model, tmp_path):
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    run = run_trtq("inspect", mnist_model, "--data", fifo, timeout=20)
    assert_refused(run, f"data {fifo} is not a regular file or a folder")


# --- a real zip bomb: --limit bounds what is read ---------------------------------------


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory) -> Path:
    """314 MB of float32 zeros in 100,000 MNIST-shaped samples, 1.4 MB compressed."""
    path = tmp_path_factory.mktemp("bomb") / "zeros.npz"
    count = 100_000
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
        archive.open("input.npy", "w", force_zip64=True) as member,
    ):
        member.write(npy_header((count, *MNIST_SAMPLE), version=(2, 0)))
        chunk = bytes(count * 3136 // 20)
        for _ in range(20):
            member.write(chunk)
    return path


def test_compressed_bomb_with_limit_stays_small_and_fast(mnist_model, zip_bomb, tmp_path):
    assert zip_bomb.stat().st_size < 2_000_000
    stats = tmp_path / "stats.json"
    run = run_trtq("calibrate", mnist_model, "--calib", zip_bomb, "--limit", "16", "-o", stats)
    assert run.code == 0, run.lines
    assert "16 samples" in "\n".join(run.lines)
    # The member is 314 MB; reading it whole (as before) peaked above that.
    assert run.maxrss_mb < 250, f"peak memory {run.maxrss_mb:.0f} MB"
    assert run.seconds < 15
    assert stats.is_file()


def test_npz_rows_are_read_lazily_and_exactly(tmp_path, mnist_test):
    """Streamed .npz members give the same batches as numpy, pass after pass."""
    digits = mnist_test["input"][:100].astype(np.float32)
    path = tmp_path / "digits.npz"
    np.savez_compressed(path, input=digits)
    spec = TensorSpec("input", np.dtype(np.float32), ("N", *MNIST_SAMPLE))
    source = open_batches(path, [spec], batch_size=32, limit=70)
    for _ in range(2):  # the second pass starts the stream again
        batches = [batch["input"] for batch in source]
        assert [len(b) for b in batches] == [32, 32, 6]
        np.testing.assert_array_equal(np.concatenate(batches), digits[:70])
    fortran = tmp_path / "fortran.npz"
    np.savez(fortran, input=np.asfortranarray(digits))
    got = np.concatenate([b["input"] for b in open_batches(fortran, [spec], batch_size=40)])
    np.testing.assert_array_equal(got, digits)


# --- image bombs -----------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking grayscale PNG header for ``width`` x ``height`` with one tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(width + 1)[:4096]))
        + chunk(b"IEND", b"")
    )


def save_digit(path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(path)


@pytest.mark.parametrize(
    "size",
    [(100_000, 100_000), (10_000, 10_000)],
    ids=["over-twice-the-limit", "over-the-limit"],
)
def test_image_decompression_bomb(capsys, mnist_model, tmp_path, size):
    pytest.importorskip("PIL")
    folder = tmp_path / "images"
    folder.mkdir()
    save_digit(folder / "digit.png")
    bomb = folder / "zbomb.png"
    bomb.write_bytes(png_claiming(*size))
    before = digest(folder)
    run = trtq_here(capsys, "inspect", mnist_model, "--data", folder)
    assert_refused(run, f"image {bomb} is too large to decode safely", "MAX_IMAGE_PIXELS")
    assert digest(folder) == before


def test_broken_image_is_one_line(capsys, mnist_model, tmp_path):
    pytest.importorskip("PIL")
    folder = tmp_path / "images"
    folder.mkdir()
    save_digit(folder / "digit.png")
    (folder / "cut.png").write_bytes((folder / "digit.png").read_bytes()[:-30])
    run = trtq_here(capsys, "inspect", mnist_model, "--data", folder)
    assert_refused(run, f"cannot decode image {folder / 'cut.png'}")
