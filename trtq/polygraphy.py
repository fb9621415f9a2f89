"""Polygraphy interop: export the batches trtq used as a polygraphy data loader script.

``polygraphy run model.onnx --onnxrt --trt --data-loader-script loader.py`` is how
NVIDIA's tools compare backends on real data. :func:`write_loader_script` writes that
``loader.py`` for a trtq data source: a few lines whose ``load_data()`` calls
:func:`trtq.calib.data.open_batches` with the arguments trtq used, so polygraphy sees
exactly the batches trtq calibrated or ran on (same files, order, batch size, limit,
image preprocessing and dtype casts) without a copy of the data.

The script imports trtq, so trtq must be importable where polygraphy runs (the same
virtual environment, or ``pip install trtq`` there). The data path is written
absolute, so the script works from any folder on the machine that wrote it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np

from trtq import __version__
from trtq.calib.data.images import ImagePreprocess
from trtq.errors import UserError
from trtq.fileio import write_text
from trtq.graph.load import TensorSpec

log = logging.getLogger(__name__)

_TEMPLATE = '''\
"""Polygraphy data loader written by trtq {version}: the batches trtq {purpose}.

    polygraphy run MODEL.onnx --onnxrt --data-loader-script {script_name}

load_data() reads the data through trtq (`pip install trtq` where polygraphy runs).
"""

import numpy as np

from trtq.calib.data import ImagePreprocess, open_batches
from trtq.graph.load import TensorSpec

SOURCE = {source!r}
INPUTS = [
{inputs}
]
BATCH_SIZE = {batch_size!r}
LIMIT = {limit!r}
PREPROCESS = {preprocess}


def load_data():
    """Yield {{input_name: numpy array}} batches, as polygraphy expects."""
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

    The arguments are those of :func:`~trtq.calib.data.open_batches`; ``purpose`` ends the
    script's first line ("the batches trtq calibrated on"). The file is written atomically
    and checked to compile. Data paths are made absolute.
    """
    path = Path(path)
    if path.suffix != ".py":
        raise UserError(f"loader script {path} must end in .py", "polygraphy imports it")
    text = _TEMPLATE.format(
        version=__version__,
        purpose=purpose,
        script_name=path.name,
        source=str(Path(data_source).resolve()),
        inputs="\n".join(f"    {_spec_source(spec)}," for spec in model_inputs),
        batch_size=batch_size,
        limit=limit,
        preprocess=_preprocess_source(preprocess),
    )
    compile(text, str(path), "exec")  # a bug here must not surface in polygraphy
    write_text(path, text)
    log.info("wrote polygraphy data loader %s", path)
    return path


def _spec_source(spec: TensorSpec) -> str:
    return f"TensorSpec({spec.name!r}, np.dtype({str(np.dtype(spec.dtype))!r}), {spec.shape!r})"


def _preprocess_source(preprocess: ImagePreprocess | None) -> str:
    if preprocess is None:
        return "None"
    given = [
        f"{field.name}={getattr(preprocess, field.name)!r}"
        for field in fields(preprocess)
        if getattr(preprocess, field.name) != field.default
    ]
    return f"ImagePreprocess({', '.join(given)})"
