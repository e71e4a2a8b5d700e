"""Helpers for testing an adapter the way sftkit will run it, without a model or a trainer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sftkit.adapt import check_record, resolve_options
from sftkit.hookspecs import Adapter


def convert_rows(
    adapter: Adapter, rows: Iterable[Mapping[str, Any]], options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Convert raw rows as sftkit does: options checked and defaulted, then every record checked as canonical.

    Raises ``SftkitError`` for an unknown option and ``RowError`` for a row the adapter or the check rejects.
    """
    resolved = resolve_options(adapter, options or {})
    records = []
    for row in rows:
        record = adapter.convert(row, resolved)
        check_record(record)
        records.append(record)
    return records


def detects(adapter: Adapter, rows: list[Mapping[str, Any]]) -> str | None:
    """What ``dataset_format: auto`` would hear from this adapter for these rows."""
    columns = sorted({column for row in rows for column in row})
    return adapter.detect(columns, rows)
