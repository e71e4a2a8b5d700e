"""Adapt: pick the adapter for the data and turn every raw row into a canonical record."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import datasets

from sftkit.errors import SftkitError
from sftkit.hookspecs import Adapter, RowError
from sftkit.plugins import InstalledAdapter, Registry

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
DETECTION_ROWS = 16


def choose_adapter(dataset_format: str, dataset: datasets.Dataset, registry: Registry) -> tuple[InstalledAdapter, str]:
    """The named adapter, or with ``auto`` the single one that recognises the data; returns it and why."""
    if dataset_format != "auto":
        return registry.get(dataset_format), "named by dataset_format"
    rows = dataset.select(range(min(DETECTION_ROWS, dataset.num_rows))).to_list()
    matches = []
    for name, installed in sorted(registry.adapters.items()):
        reason = installed.adapter.detect(dataset.column_names, rows)
        if reason:
            matches.append((installed, f"dataset_format auto: {name} ({reason})"))
    if len(matches) == 1:
        return matches[0]
    adapters = ", ".join(sorted(registry.adapters))
    if not matches:
        raise SftkitError(
            f"dataset_format auto: no installed adapter recognises columns {dataset.column_names}. "
            f"Installed adapters: {adapters}. Set dataset_format to one of them (with dataset_options to name the "
            "columns), or install a plugin for this format."
        )
    names = ", ".join(installed.adapter.name for installed, _ in matches)
    raise SftkitError(
        f"dataset_format auto: several adapters recognise columns {dataset.column_names}: {names}. "
        "Set dataset_format to the one you mean."
    )


def resolve_options(adapter: Adapter, given: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter's options with defaults filled in; an option it does not know is an error."""
    known = adapter.options
    for key in given:
        if key not in known:
            accepted = ", ".join(sorted(known)) or "none"
            raise SftkitError(
                f"dataset_options: adapter {adapter.name!r} has no option {key!r} (accepted: {accepted})"
            )
    resolved = {key: given.get(key, option.default) for key, option in known.items()}
    for key, value in resolved.items():
        choices = known[key].choices
        if choices is not None and value not in choices:
            raise SftkitError(
                f"dataset_options: {key} of adapter {adapter.name!r} must be one of {list(choices)}, got {value!r}"
            )
    return resolved


def check_record(record: Mapping[str, Any]) -> None:
    """A canonical record is messages, prompt/completion, or text; raise RowError for anything else."""
    if "messages" in record:
        for position, message in enumerate(record["messages"]):
            if message.get("role") not in ROLES:
                raise RowError(f"turn {position} has role {message.get('role')!r}; canonical roles are {ROLES}")
            if not isinstance(message.get("content"), str) and not message.get("tool_calls"):
                raise RowError(f"turn {position} ({message['role']}) has no text content")
    elif "prompt" in record and "completion" in record:
        pass
    elif not isinstance(record.get("text"), str):
        raise RowError(f"the adapter produced {sorted(record)}; expected messages, prompt/completion or text")


def adapt(
    dataset: datasets.Dataset, installed: InstalledAdapter, options: Mapping[str, Any], split: str
) -> datasets.Dataset:
    """Convert every row; a row the adapter rejects stops the run with its index and the reason."""
    adapter = installed.adapter
    columns = adapter.columns(options)
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise SftkitError(
            f"{split} data: adapter {adapter.name!r} reads columns {missing} that the data does not have "
            f"(it has {dataset.column_names}); name the right ones in dataset_options"
        )
    dataset = dataset.select_columns(columns)  # never carry unread columns through an expensive pass

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        records = []
        for offset, index in enumerate(indices):
            row = {column: batch[column][offset] for column in columns}
            try:
                record = adapter.convert(row, options)
                check_record(record)
            except RowError as error:
                raise SftkitError(f"{split} row {index}: {error} (adapter {adapter.name})") from None
            records.append(record)
        keys = sorted({key for record in records for key in record})
        return {key: [record.get(key) for record in records] for key in keys}

    return dataset.map(
        convert, batched=True, with_indices=True, remove_columns=columns, desc=f"Adapting {split} rows ({adapter.name})"
    )
