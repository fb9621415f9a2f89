"""Small onnx-graphsurgeon helpers shared by the graph passes."""

from __future__ import annotations

import onnx_graphsurgeon as gs


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` instead.

    Iterates over a copy of the consumer list (rewiring mutates it) and
    handles a node that reads the same tensor more than once.
    """
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new
