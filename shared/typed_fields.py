"""Typed reads of Flower mappings (node configs, Flower's own records): a wrong type is a clear error.

fedrec's messages are read by ``shared/protocol.py``, whose errors also name the message kind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class FieldError(ValueError):
    """A field of a message or config has the wrong type."""


def get_int(record: Mapping[str, Any], key: str) -> int:
    """``record[key]`` as an int (bools and non-integral floats are refused)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"field {key!r}: expected an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise FieldError(f"field {key!r}: expected an integer, got {value!r}")  # int() would raise on NaN/inf
    return int(value)


def get_float(record: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """``record[key]`` as a float; ``default`` when absent (if given)."""
    if key not in record and default is not None:
        return default
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"field {key!r}: expected a number, got {value!r}")
    return float(value)
