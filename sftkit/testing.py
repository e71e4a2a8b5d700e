"""Helpers for testing an adapter the way sftkit will run it, without a model or a trainer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sftkit.data.adapt import resolve_options
from sftkit.data.rows import to_record
from sftkit.hookspecs import Adapter, Detection


def convert_rows(
    adapter: Adapter, rows: Iterable[Mapping[str, Any]], options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Convert raw rows as sftkit does (the first steps of its row chain): options checked and defaulted, then every
    record checked as canonical.

    Raises ``SftkitError`` for an unknown option and ``RowError`` for a row the adapter or the check rejects
    (an adapter's own exception becomes a RowError with reason ``rejected by adapter``, as in training).
    """
    resolved = resolve_options(adapter, options or {})
    return [to_record(adapter, resolved, row) for row in rows]


def detects(adapter: Adapter, rows: list[Mapping[str, Any]]) -> str | None:
    """Why ``dataset_format: auto`` would choose this adapter for these rows (its reason), or None."""
    columns = sorted({column for row in rows for column in row})
    found = adapter.detect(columns, rows)
    return found.reason if isinstance(found, Detection) else found
