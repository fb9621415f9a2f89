#!/usr/bin/env bash
# GPU checks, run on the lent GPU machine (no TensorRT there, no network):
#   - the tests marked `gpu` (pycuda batch streaming, TensorRT 10's calibrator over
#     the real bindings with stub native libraries);
#   - bench/gpu_streaming.py (pinned double-buffered streaming vs synchronous copies).
# Needs the wheels in .gpu-wheels (see ../shared/wheels/README.md; plus
# tensorrt-cu12-bindings 10.13.3.9 and onnx-graphsurgeon for Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
site=/tmp/trtq-gpu-site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .gpu-wheels/*.whl
ln -sfn "$site/tensorrt_bindings" "$site/tensorrt"
stubs=/tmp/trtq-trt-stubs
mkdir -p "$stubs"
for lib in nvinfer nvonnxparser nvinfer_plugin; do
    define="STUB_$(echo "$lib" | tr '[:lower:]' '[:upper:]')"
    gcc -shared -fPIC -D"$define" -Wl,-soname,"lib$lib.so.10" -o "$stubs/lib$lib.so.10" scripts/trt_stubs/stub.c
done
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" LD_LIBRARY_PATH="$stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -p no:cacheprovider -o addopts="" -m gpu tests/test_gpu_streaming.py tests/test_gpu_runtime.py tests/test_gpu_plugins.py -v 2>&1 | tee "$OUT/pytest.log"
python3 bench/gpu_streaming.py --json "$OUT/gpu_streaming.json" 2>&1 | tee "$OUT/bench.log"
