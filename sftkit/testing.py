"""Helpers for testing an adapter the way sftkit will run it, without a model or a trainer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sftkit.contract import Adapter
from sftkit.data.adapt import declared_columns, detection, resolve_options
from sftkit.data.rows import to_record
from sftkit.errors import SftkitError


def convert_rows(
    adapter: Adapter, rows: Iterable[Mapping[str, Any]], options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Convert raw rows as sftkit does (the first steps of its row chain): options checked and defaulted, then every
    record checked as canonical.

    Raises ``SftkitError`` for an unknown or bad option, a missing required column and a read of a column the adapter
    did not declare, and ``RowError`` for a row the adapter or the check rejects (an adapter's own exception becomes
    a RowError with reason ``rejected by adapter``, as in training; under ``SFTKIT_DEBUG=1`` it is raised as it is).
    """
    resolved = resolve_options(adapter, options or {})
    declared = declared_columns(adapter, resolved)
    records = []
    for index, row in enumerate(rows):
        if missing := [column for column in declared.required if column not in row]:
            raise SftkitError(f"row {index}: adapter {adapter.name!r} needs column(s) {', '.join(map(repr, missing))}, "
                              f"which the row lacks (it has {', '.join(row) or 'none'})")
        records.append(to_record(adapter, resolved, row, declared.all))
    return records


def detects(adapter: Adapter, rows: list[Mapping[str, Any]]) -> str | None:
    """Why ``dataset_format: auto`` would choose this adapter for these rows (its reason), or None; SftkitError when
    its ``detect`` raises or returns what the contract does not allow, for which ``auto`` leaves the adapter out."""
    columns = sorted({column for row in rows for column in row})
    found = detection(adapter, columns, rows)
    return found.reason if found is not None else None
