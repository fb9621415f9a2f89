"""The public Python API: what ``trtq`` the command does, as functions.

``import trtq`` then ``trtq.quantize(...)``, ``trtq.calibrate(...)``,
``trtq.build(...)``, ``trtq.compare(...)``, ``trtq.load(...)``. Each takes paths
or in-memory objects, validates what it is given at this boundary, and returns a
typed result; the CLI modules (``trtq/cli/*_cmd.py``) are thin shells that parse
flags, call these and print. See ARCHITECTURE.md ("Public API").
"""

from __future__ import annotations

from trtq.runtime import load

__all__ = ["load"]
