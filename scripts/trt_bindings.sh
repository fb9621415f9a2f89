#!/usr/bin/env bash
# NVIDIA's real TensorRT Python bindings, importable without TensorRT or a GPU.
#
# Usage:
#   scripts/trt_bindings.sh [DEST]           prepare DEST (default: .trt in the repository)
#   scripts/trt_bindings.sh --env N [DEST]   print PYTHONPATH=... and LD_LIBRARY_PATH=... lines
#                                            that make `import tensorrt` load TensorRT N (10|11)
#
# e.g.  env $(scripts/trt_bindings.sh --env 11) .venv/bin/python -c 'import tensorrt as t; print(t.__version__)'
#
# For each N in 10 and 11 it
#   * compiles scripts/trt_stubs/stub.c into DEST/stubs/N/{libnvinfer,libnvonnxparser,libnvinfer_plugin}.so.N,
#     with those exact sonames (the native libraries cannot be installed here or on CI);
#   * installs the bindings wheel (tensorrt-cu12-bindings for 10, tensorrt-cu13-bindings for 11)
#     into DEST/N with `pip install --no-deps --target`;
#   * links DEST/N/tensorrt -> tensorrt_bindings, because the wheel's package is called
#     tensorrt_bindings while everything (its own `plugin` subpackage included) does `import tensorrt`.
#     Import only `tensorrt` from there: importing `tensorrt_bindings` as well loads the extension a
#     second time and pybind11 aborts ("type already registered");
#   * checks that `import tensorrt` works and reports the expected version.
# Work already done is skipped: DEST/N/.trtq-stamp records the wheel, the Python version and the
# stub source it was made from; DEST/.stamp is written when both versions are ready (the Makefile's
# target). Environment: PYTHON (default .venv/bin/python, else python3; the wheels must match
# its version), CC (default cc).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STUB_SRC="$REPO/scripts/trt_stubs/stub.c"
VERSIONS=(10 11)

wheel_for() {
    case "$1" in
        10) echo "tensorrt-cu12-bindings==10.13.3.9" ;;
        11) echo "tensorrt-cu13-bindings==11.4.0.106" ;;
        *) echo "trt_bindings: unknown TensorRT major version '$1' (expected 10 or 11)" >&2; exit 2 ;;
    esac
}

die() { echo "trt_bindings: $*" >&2; exit 1; }

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

absdir() { mkdir -p "$1" && (cd "$1" && pwd); }

if [[ "${1:-}" == "--env" ]]; then
    [[ $# -ge 2 ]] || die "usage: $0 --env N [DEST]"
    wheel_for "$2" >/dev/null
    dest="${3:-$REPO/.trt}"
    [[ -e "$dest/$2/tensorrt/__init__.py" && -e "$dest/stubs/$2/libnvinfer.so.$2" ]] \
        || die "TensorRT $2 bindings are not prepared in $dest; run: $0 $dest"
    dest="$(cd "$dest" && pwd)"
    echo "PYTHONPATH=$dest/$2${PYTHONPATH:+:$PYTHONPATH}"
    echo "LD_LIBRARY_PATH=$dest/stubs/$2${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    exit 0
fi

[[ $# -le 1 ]] || die "usage: $0 [DEST] | $0 --env N [DEST]"
DEST="$(absdir "${1:-$REPO/.trt}")"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
CC="${CC:-cc}"
command -v "$CC" >/dev/null || die "no C compiler '$CC' (set CC, or install gcc)"
[[ -f "$STUB_SRC" ]] || die "missing $STUB_SRC"

py_tag="$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
stub_sum="$(sha256sum "$STUB_SRC" | cut -d' ' -f1)"

build_stubs() {  # N OUTDIR
    local n="$1" out="$2" lib define
    mkdir -p "$out"
    for lib in nvinfer nvonnxparser nvinfer_plugin; do
        define="STUB_$(echo "$lib" | tr '[:lower:]' '[:upper:]')"
        "$CC" -shared -fPIC -O2 -Wall -Wextra -Werror -D"$define" \
            -Wl,-soname,"lib$lib.so.$n" -o "$out/lib$lib.so.$n" "$STUB_SRC"
    done
}

prepare() {  # N
    local n="$1" wheel want start tmp_site tmp_stubs got
    wheel="$(wheel_for "$n")"
    want="format=1 wheel=$wheel python=$py_tag stub=$stub_sum"
    if [[ -f "$DEST/$n/.trtq-stamp" && "$(cat "$DEST/$n/.trtq-stamp")" == "$want" \
          && -e "$DEST/stubs/$n/libnvinfer.so.$n" ]]; then
        echo "trt_bindings: TensorRT $n already prepared in $DEST/$n"
        return
    fi
    start="$(now)"
    tmp_site="$DEST/.$n.tmp.$$"
    tmp_stubs="$DEST/stubs/.$n.tmp.$$"
    rm -rf "$tmp_site" "$tmp_stubs"
    trap 'rm -rf "$tmp_site" "$tmp_stubs"' EXIT

    build_stubs "$n" "$tmp_stubs"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --target "$tmp_site" "$wheel" \
        || die "pip could not install $wheel for $py_tag (the bindings exist for cp311/cp312 on PyPI)"
    [[ -d "$tmp_site/tensorrt_bindings" ]] || die "$wheel has no tensorrt_bindings package"
    ln -sfn tensorrt_bindings "$tmp_site/tensorrt"

    # The proof that it worked: NVIDIA's extension loads against the stubs.
    got="$(PYTHONPATH="$tmp_site" LD_LIBRARY_PATH="$tmp_stubs" \
        "$PYTHON" -c 'import tensorrt; print(tensorrt.__version__)')" \
        || die "import tensorrt failed for TensorRT $n (stubs in $tmp_stubs)"
    [[ "$got" == "${wheel##*==}" ]] || die "expected TensorRT ${wheel##*==}, imported $got"

    echo "$want" >"$tmp_site/.trtq-stamp"
    rm -rf "${DEST:?}/$n" "${DEST:?}/stubs/$n"
    mv "$tmp_stubs" "$DEST/stubs/$n"
    mv "$tmp_site" "$DEST/$n"
    trap - EXIT
    echo "trt_bindings: TensorRT $got ready in $DEST/$n ($(since "$start") s)"
}

for n in "${VERSIONS[@]}"; do
    prepare "$n"
done
printf '%s\n' "${VERSIONS[@]/#/prepared TensorRT }" >"$DEST/.stamp"
