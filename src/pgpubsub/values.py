"""Payload text to a Python value, safely (the Notifier's payloads).

JSON first (so ``true``, ``null`` and ``{"a": 1}`` work), then a Python
literal (``{'a': 1}``, ``(1, 2)``) through :func:`ast.literal_eval`, which
evaluates no code; anything else (plain text, or input too deep or too large
to parse) stays the string it was. Never raises.
"""

from __future__ import annotations

import ast
from typing import Any

import msgspec

__all__ = ["parse_value"]

_json = msgspec.json.Decoder()
_LITERAL_STARTS = frozenset("([{'\"-+.0123456789TFN")


def parse_value(text: str) -> Any:
    try:
        return _json.decode(text)
    except (msgspec.DecodeError, RecursionError, MemoryError):
        pass
    stripped = text.strip()
    if stripped[:1] in _LITERAL_STARTS:
        try:
            return ast.literal_eval(stripped)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    return text
