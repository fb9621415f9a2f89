"""Calibration: from the user's data to the ranges that quantization needs.

:mod:`trtq.calib.data` turns a path (a .npz/.npy file, a folder of arrays or images,
or a polygraphy-style loader script) into re-iterable batches of model inputs, checked
against the model's input names, shapes and dtypes. Streaming activation statistics,
range selection and calibration caches build on these batches.
"""

from trtq.calib.data import BatchSource, ImagePreprocess, check_batch, open_batches

__all__ = ["BatchSource", "ImagePreprocess", "check_batch", "open_batches"]
