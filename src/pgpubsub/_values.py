"""Payload text to a Python value, safely (the Notifier's payloads).

JSON first (so ``true``, ``null`` and ``{"a": 1}`` work), then a Python
literal (``{'a': 1}``, ``(1, 2)``, ``b'raw'``, ``u'text'``, ``r'\\d'``) through
:func:`ast.literal_eval`, which evaluates no code; anything else (plain text,
or input too deep or too large to parse) stays the string it was. Never raises.

Bounds: text over ``MAX_LITERAL_CHARS`` is not parsed as a literal (NOTIFY
payloads are at most 8000 bytes, so this only matters for spilled or stored
text), and nesting deeper than the parser allows (about 200 levels) fails
inside the parser and leaves the text as it is.
"""

from __future__ import annotations

import ast
from typing import Any

import msgspec

__all__ = ["MAX_LITERAL_CHARS", "parse_value"]

_json = msgspec.json.Decoder()
_LITERAL_STARTS = frozenset("([{'\"-+.0123456789TFNbBuUrR")  # string prefixes too
MAX_LITERAL_CHARS = 64 * 1024


def parse_value(text: str) -> Any:
    try:
        return _json.decode(text)
    except (msgspec.DecodeError, RecursionError, MemoryError):
        pass
    stripped = text.strip()
    if stripped[:1] in _LITERAL_STARTS and len(stripped) <= MAX_LITERAL_CHARS:
        try:
            return ast.literal_eval(stripped)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    return text
