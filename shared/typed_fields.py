"""Typed reads of Flower mappings (message records, node and run configs): a wrong type is a clear error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class FieldError(ValueError):
    """A field of a message or config has the wrong type."""


def get_int(record: Mapping[str, Any], key: str) -> int:
    """``record[key]`` as an int (bools and non-integral floats are refused)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise FieldError(f"field {key!r}: expected an integer, got {value!r}")
    return int(value)


def get_float(record: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """``record[key]`` as a float; ``default`` when absent (if given)."""
    if key not in record and default is not None:
        return default
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"field {key!r}: expected a number, got {value!r}")
    return float(value)


def get_int_list(record: Mapping[str, Any], key: str) -> list[int]:
    """``record[key]`` as a list of ints."""
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise FieldError(f"field {key!r}: expected a list of integers")
    return [int(v) for v in value]
