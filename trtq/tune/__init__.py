"""Per-node precision against the model's output: sensitivity, and fallback to a target.

INT8 does not hurt every layer alike. These modules measure, node by node, what
quantizing it costs at the model's outputs, and move the worst offenders back to high
precision until a fidelity target holds:

* :mod:`.holdout` - the data the figures are measured on (held out from calibration);
* :mod:`.evaluate` - one *configuration* (the set of nodes left in high precision)
  built from the calibrated plan and scored against FP32, cached, on a pluggable
  executor (this process, or a pool of worker processes);
* :mod:`.sensitivity` - ``trtq sensitivity``: every node alone, and every node but one;
* :mod:`.fallback` - ``trtq quantize --target-*``: the greedy search and its steps.
"""
