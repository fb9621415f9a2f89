"""ONNX frontend: load, validate, normalise and inspect models.

Passes that rewrite a model live in :mod:`trtq.graph.normalize`; each is a
function from graph to graph so they can be tested and reordered one by one.
"""

import onnx_graphsurgeon as gs

from trtq.graph.load import TensorSpec, load_model, model_inputs, model_outputs

__all__ = ["TensorSpec", "load_model", "model_inputs", "model_outputs"]

# graphsurgeon prints warnings (and a hint to install "colored") through its own
# logger; trtq reports problems itself, so only graphsurgeon's errors get through.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
