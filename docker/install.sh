#!/usr/bin/env bash
# Installs trtq from this checkout: the Python half of docker/Dockerfile, kept here so that it
# runs (and is tested, tests/test_docker.py) outside Docker too.
#
# Usage:
#   docker/install.sh [--venv DIR] [--system-site-packages] [--gpu auto|yes|no]
#                     [--tensorrt-major N]
#
#   --venv DIR               install into the virtual environment DIR, created if missing
#                            (default: the environment of $PYTHON, e.g. an activated venv)
#   --system-site-packages   create DIR so that it also sees the interpreter's own packages;
#                            the image needs this to use the TensorRT that NVIDIA installed
#   --gpu auto|yes|no        the `gpu` extra (pycuda, compiled here against the local CUDA).
#                            auto (default): only where it can be built (nvcc, a libcuda to
#                            link, a C++ compiler, Python headers), otherwise skipped with the
#                            reason; yes: fail instead of skipping (the image); no: never
#   --tensorrt-major N       TensorRT N must be importable afterwards (the image); without it
#                            the TensorRT check runs only where TensorRT is installed
#
# Environment: PYTHON (interpreter that creates the venv or is installed into; default python3),
# CUDA_ROOT or CUDA_HOME (the CUDA toolkit; default: from nvcc on PATH, else /usr/local/cuda).
# pip's own variables (PIP_INDEX_URL, PIP_NO_CACHE_DIR, ...) pass through.
# Also copies the MNIST sample of calib_data/ into <prefix>/share/trtq/sample (trtq doctor).
# Idempotent: an existing venv is reused and trtq is reinstalled from the current source.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }
joined() { local out; out="$(printf '%s; ' "$@")"; echo "${out%; }"; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

venv=""
system_site=0
gpu=auto
trt_major=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --venv) [[ $# -ge 2 ]] || die "--venv needs a directory"; venv="$2"; shift 2 ;;
        --venv=*) venv="${1#*=}"; shift ;;
        --system-site-packages) system_site=1; shift ;;
        --gpu) [[ $# -ge 2 ]] || die "--gpu needs auto, yes or no"; gpu="$2"; shift 2 ;;
        --gpu=*) gpu="${1#*=}"; shift ;;
        --tensorrt-major) [[ $# -ge 2 ]] || die "--tensorrt-major needs 10 or 11"; trt_major="$2"; shift 2 ;;
        --tensorrt-major=*) trt_major="${1#*=}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case "$gpu" in auto | yes | no) ;; *) die "--gpu must be auto, yes or no, not '$gpu'" ;; esac
[[ -z "$trt_major" || "$trt_major" =~ ^[0-9]+$ ]] || die "--tensorrt-major must be a number, not '$trt_major'"
[[ -f "$REPO/pyproject.toml" && -d "$REPO/trtq" ]] \
    || die "no trtq source in $REPO (this script must stay at docker/install.sh in the checkout)"

# --- 1. The Python environment -------------------------------------------------------------
base_python="${PYTHON:-python3}"
command -v "$base_python" >/dev/null || die "no Python interpreter '$base_python' (set PYTHON)"
if [[ -n "$venv" ]]; then
    if [[ -x "$venv/bin/python" ]]; then
        say "reusing the virtual environment $venv"
        # An existing venv keeps how it was made; say so when that differs from what was asked.
        if [[ $system_site -eq 1 ]] \
            && ! grep -qiE '^include-system-site-packages *= *true' "$venv/pyvenv.cfg" 2>/dev/null; then
            say "warning: $venv was created without --system-site-packages; remove it to recreate it"
        fi
    elif [[ -e "$venv" && -n "$(ls -A "$venv" 2>/dev/null)" ]]; then
        die "$venv exists and is not a virtual environment; choose another --venv"
    else
        say "creating the virtual environment $venv"
        venv_args=()
        [[ $system_site -eq 1 ]] && venv_args+=(--system-site-packages)
        # Debian/Ubuntu split ensurepip into python3-venv; say so rather than print a traceback.
        "$base_python" -m venv "${venv_args[@]}" "$venv" \
            || die "could not create $venv with $base_python (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    python="$(cd "$venv" && pwd)/bin/python"
else
    python="$(command -v "$base_python")"
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "trtq needs Python >= 3.10; $python is $("$python" -V 2>&1)"

# --- 2. Can pycuda be built here? ----------------------------------------------------------
# pycuda is compiled from source against the local CUDA toolkit. Its link step needs an
# unversioned libcuda.so: the driver's (a GPU machine), or the toolkit's stub (inside
# `docker build`, where no driver is mounted; the real libcuda.so.1 is mounted by
# `docker run --gpus` and loaded then). CPU machines and CI may have nvcc, but have no libcuda.so.
missing=()
cuda_root="${CUDA_ROOT:-${CUDA_HOME:-}}"
if [[ -z "$cuda_root" ]]; then
    if command -v nvcc >/dev/null; then
        cuda_root="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"
    elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
        cuda_root=/usr/local/cuda
    fi
fi
if [[ -z "$cuda_root" || ! -x "$cuda_root/bin/nvcc" ]]; then
    missing+=("the CUDA toolkit (nvcc; set CUDA_ROOT)")
fi
libcuda_dir=""
if [[ -n "$cuda_root" ]]; then
    for dir in "$cuda_root/lib64" "$cuda_root/lib64/stubs" "$cuda_root"/targets/*/lib/stubs; do
        if [[ -e "$dir/libcuda.so" ]]; then libcuda_dir="$dir"; break; fi
    done
fi
if [[ -z "$libcuda_dir" ]] && command -v ldconfig >/dev/null; then
    # `libcuda.so (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so`: the driver's own.
    driver_lib="$(ldconfig -p 2>/dev/null | awk '$1 == "libcuda.so" { print $NF; exit }')"
    [[ -n "$driver_lib" ]] && libcuda_dir="$(dirname "$driver_lib")"
fi
[[ -n "$libcuda_dir" ]] || missing+=("libcuda.so (the NVIDIA driver, or the toolkit's stubs)")
command -v "${CXX:-c++}" >/dev/null || missing+=("a C++ compiler (${CXX:-c++})")
"$python" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing+=("Python headers (on Debian/Ubuntu: apt-get install python3-dev)")

with_gpu=0
case "$gpu" in
    no) say "skipping the gpu extra (pycuda): --gpu no" ;;
    yes | auto)
        if [[ ${#missing[@]} -eq 0 ]]; then
            with_gpu=1
            say "installing with the gpu extra: pycuda is built against $cuda_root (libcuda.so from $libcuda_dir)"
        elif [[ "$gpu" == yes ]]; then
            die "--gpu yes, but pycuda cannot be built here; missing: $(joined "${missing[@]}")"
        else
            say "installing WITHOUT the gpu extra (pycuda cannot be built here; missing: $(joined "${missing[@]}"))"
            say "only TensorRT 10's own calibrator (trtq build --calib-mode trt) needs it; the rest of trtq works"
        fi
        ;;
esac

# --- 3. Install ----------------------------------------------------------------------------
target="$REPO"
[[ $with_gpu -eq 1 ]] && target="${REPO}[gpu]"
pip_env=()
if [[ $with_gpu -eq 1 ]]; then
    # CUDA_ROOT and nvcc on PATH tell pycuda's setup where the toolkit is; LIBRARY_PATH lets
    # the linker find libcuda.so when it is only a stub.
    pip_env=("CUDA_ROOT=$cuda_root" "PATH=$cuda_root/bin:$PATH"
             "LIBRARY_PATH=$libcuda_dir${LIBRARY_PATH:+:$LIBRARY_PATH}")
fi
# setuptools builds the wheel in the source tree (build/): tidy up after ourselves only.
had_build_dir=0
[[ -e "$REPO/build" ]] && had_build_dir=1
start=$SECONDS
say "pip install $target (into $("$python" -c 'import sys; print(sys.prefix)'))"
# --upgrade: a re-run installs the current source even when the version number is unchanged;
# dependencies are only upgraded where the requirements need it (pip's default strategy).
env "${pip_env[@]}" "$python" -m pip install --quiet --disable-pip-version-check \
    --progress-bar off --upgrade "$target" \
    || die "pip could not install $target (see pip's message above)"
[[ $had_build_dir -eq 1 ]] || rm -rf "${REPO:?}/build"
say "installed in $((SECONDS - start)) s"

# The image's TensorRT is a system package: reachable only from a venv created with
# --system-site-packages. NGC images also keep the wheels in /opt/tensorrt/python; install the
# matching one if the import does not work but the wheel is there.
if [[ -n "$trt_major" ]] && ! "$python" -c 'import tensorrt' 2>/dev/null; then
    py_tag="$("$python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
    shopt -s nullglob
    wheels=(/opt/tensorrt/python/tensorrt-"$trt_major".*-"$py_tag"-*.whl)
    shopt -u nullglob
    if [[ ${#wheels[@]} -gt 0 ]]; then
        say "tensorrt is not importable; installing ${wheels[0]}"
        "$python" -m pip install --quiet --disable-pip-version-check --no-deps "${wheels[0]}" \
            || die "pip could not install ${wheels[0]}"
    fi
fi

# --- 4. The MNIST sample that `trtq doctor` builds into engines ----------------------------
# A checkout has it in calib_data/; an installed trtq (the image's: its source is deleted after
# this script) finds it in <prefix>/share/trtq/sample, where trtq/doctor.py looks.
sample_src="$REPO/calib_data"
sample_files=(mnist_cnn.onnx mnist_calib.npz mnist_test.npz)
sample_dest="$("$python" -c 'import sys; print(sys.prefix)')/share/trtq/sample"
have_sample=1
for name in "${sample_files[@]}"; do [[ -f "$sample_src/$name" ]] || have_sample=0; done
if [[ $have_sample -eq 1 ]]; then
    if ! mkdir -p "$sample_dest" || ! (cd "$sample_src" && cp "${sample_files[@]}" "$sample_dest/"); then
        die "could not copy the MNIST sample into $sample_dest"
    fi
    say "the MNIST sample for trtq doctor: $sample_dest"
else
    say "no MNIST sample in $sample_src: trtq doctor will need --sample-dir"
fi

# --- 5. Verify -----------------------------------------------------------------------------
# The command pip wrote: venv/bin in a venv; elsewhere wherever the interpreter puts scripts.
trtq_cmd="$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/trtq"
[[ -x "$trtq_cmd" ]] || trtq_cmd="$(command -v trtq || true)"
[[ -n "$trtq_cmd" ]] || die "pip finished but installed no trtq command"
version="$("$trtq_cmd" --version)" || die "'$trtq_cmd --version' failed"
say "$trtq_cmd --version: $version"

if [[ $with_gpu -eq 1 ]]; then
    # Not `import pycuda.driver`: during `docker build` there is no libcuda.so.1 to load.
    "$python" -c 'from importlib.metadata import version; print("install.sh: pycuda", version("pycuda"))' \
        || die "the gpu extra was requested but pycuda is not installed"
fi

if [[ -n "$trt_major" ]]; then
    trt_version="$("$python" -c 'import trtq, tensorrt; print(tensorrt.__version__)')" \
        || die "'import trtq, tensorrt' failed in $python; TensorRT $trt_major was required (--tensorrt-major)"
    [[ "${trt_version%%.*}" == "$trt_major" ]] \
        || die "TensorRT $trt_version is installed but --tensorrt-major $trt_major was asked for (does the base image match TRT_MAJOR?)"
    say "import trtq, tensorrt: TensorRT $trt_version"
elif "$python" -c 'import tensorrt' 2>/dev/null; then
    trt_version="$("$python" -c 'import trtq, tensorrt; print(tensorrt.__version__)')" \
        || die "'import trtq, tensorrt' failed in $python"
    say "import trtq, tensorrt: TensorRT $trt_version"
else
    say "TensorRT is not installed in this environment: skipped 'import tensorrt' (inside the image it is checked)"
fi
say "done"
