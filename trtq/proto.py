"""Protobuf's 2 GB limit on a model held in memory, found by trying rather than by sizing.

``ModelProto.ByteSize()`` costs as much as serializing the model (it walks every weight),
and under protobuf's upb backend it raises ``EncodeError`` for a message over 2 GB instead
of returning its size. Callers that only need to know whether the model fits, before
serializing it anyway, serialize once here and branch on the result.
"""

from __future__ import annotations

import onnx
from google.protobuf.message import EncodeError, Message


def serialized(
    message: Message, *, limit: int = onnx.checker.MAXIMUM_PROTOBUF, deterministic: bool = False
) -> bytes | None:
    """The message's bytes, or None if they would be ``limit`` bytes or more (default:
    protobuf's 2 GB limit, beyond which they cannot be made at all)."""
    try:
        data = message.SerializeToString(deterministic=deterministic)
    except (EncodeError, ValueError):  # upb: EncodeError; the pure-Python backend: ValueError
        return None
    return data if len(data) < limit else None
