"""Polygraphy interop: export the batches trtq used as a polygraphy data loader script.

``polygraphy run model.onnx --onnxrt --trt --data-loader-script loader.py`` is how
NVIDIA's tools compare backends on real data. :func:`write_loader_script` writes that
``loader.py`` for a trtq data source: a few lines whose ``load_data()`` calls
:func:`trtq.calib.data.open_batches` with the arguments trtq used, so polygraphy sees
exactly the batches trtq calibrated or ran on (same files, order, batch size, limit,
image preprocessing and dtype casts) without a copy of the data.

The script imports trtq, so trtq must be importable where polygraphy runs (the same
virtual environment, or ``pip install trtq`` there). The data path is written
absolute, so the script works from any folder on the machine that wrote it. Its text is
fixed; what varies (paths, input names, settings) is one JSON document that the script
parses, so a file name holding quotes or newlines stays a file name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from trtq import __version__
from trtq.calib.data.images import ImagePreprocess
from trtq.errors import UserError
from trtq.fileio import write_text
from trtq.graph.load import TensorSpec

log = logging.getLogger(__name__)

#: The whole script; only the one JSON literal at SETTINGS varies. File names, input names
#: and everything else of the caller's reach the script as data, never as code.
_TEMPLATE = '''\
"""Polygraphy data loader written by trtq: the batches trtq used, read through trtq.

    polygraphy run MODEL.onnx --onnxrt --data-loader-script THIS_FILE.py

load_data() reads the data through trtq (`pip install trtq` where polygraphy runs).
SETTINGS (JSON) holds the data source and how trtq read it.
"""

import json

import numpy as np

from trtq.calib.data import ImagePreprocess, open_batches
from trtq.graph.load import TensorSpec

SETTINGS = json.loads(%s)
SOURCE = SETTINGS["source"]
INPUTS = [
    TensorSpec(spec["name"], np.dtype(spec["dtype"]), tuple(spec["shape"]))
    for spec in SETTINGS["inputs"]
]
BATCH_SIZE = SETTINGS["batch_size"]
LIMIT = SETTINGS["limit"]
PREPROCESS = (
    None
    if SETTINGS["preprocess"] is None
    else ImagePreprocess(
        **{
            key: tuple(value) if isinstance(value, list) else value
            for key, value in SETTINGS["preprocess"].items()
        }
    )
)


def load_data():
    """Yield {input_name: numpy array} batches, as polygraphy expects."""
    yield from open_batches(
        SOURCE, INPUTS, batch_size=BATCH_SIZE, limit=LIMIT, preprocess=PREPROCESS
    )
'''


def write_loader_script(
    path: str | Path,
    data_source: str | Path,
    model_inputs: Sequence[TensorSpec],
    batch_size: int | None = None,
    *,
    limit: int | None = None,
    preprocess: ImagePreprocess | None = None,
    purpose: str = "used",
) -> Path:
    """Write a polygraphy data loader script that yields trtq's batches; return its path.

    The arguments are those of :func:`~trtq.calib.data.open_batches`; ``purpose`` (e.g.
    "calibrated on") is logged. The script is fixed text plus one JSON document, which
    it parses when imported: no name or path can become code, whatever characters it
    holds. The file is written atomically and checked to compile. Data paths are made
    absolute.
    """
    path = Path(path)
    if path.suffix != ".py":
        raise UserError(f"loader script {path} must end in .py", "polygraphy imports it")
    settings = {
        "trtq_version": __version__,
        "source": str(Path(data_source).resolve()),
        "inputs": [_spec_settings(spec) for spec in model_inputs],
        "batch_size": batch_size,
        "limit": limit,
        "preprocess": _preprocess_settings(preprocess),
    }
    # json.dumps with ensure_ascii gives printable ASCII; repr() of that str is a Python
    # string literal that evaluates back to it exactly.
    text = _TEMPLATE % repr(json.dumps(settings, ensure_ascii=True, allow_nan=False))
    compile(text, str(path), "exec")  # a bug here must not surface in polygraphy
    write_text(path, text)
    log.info("wrote polygraphy data loader %s (the batches trtq %s)", path, purpose)
    return path


def _spec_settings(spec: TensorSpec) -> dict[str, Any]:
    """A model input as the script's JSON holds it."""
    return {"name": spec.name, "dtype": str(np.dtype(spec.dtype)), "shape": list(spec.shape)}


def _preprocess_settings(preprocess: ImagePreprocess | None) -> dict[str, Any] | None:
    """The image preprocessing fields that differ from their defaults (tuples as lists)."""
    if preprocess is None:
        return None
    return {
        field.name: getattr(preprocess, field.name)
        for field in fields(preprocess)
        if getattr(preprocess, field.name) != field.default
    }
