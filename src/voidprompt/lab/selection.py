"""Which rows a ``where = {...}`` table picks: the one rule of the report's filters and of the
jobs a study's ``[explain]`` captures."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def matches(row: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    """Whether every column named in ``where`` equals its value (numbers compared with a tolerance;
    a list means any of its values)."""

    def one(a: Any, wanted: Any) -> bool:
        if isinstance(wanted, list | tuple):
            return any(_equal(a, w) for w in wanted)
        return _equal(a, wanted)

    return all(one(row.get(k), v) for k, v in where.items())


def select(rows: Sequence[Mapping[str, Any]], where: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The rows that :func:`matches` ``where``, in their order."""
    return [r for r in rows if matches(r, where)]
