"""Adapt: pick the adapter for the data and turn every raw row into a canonical record."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import datasets

from sftkit.errors import SftkitError
from sftkit.hookspecs import Adapter, RowError
from sftkit.plugins import InstalledAdapter, Registry

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
ADAPTED = datasets.Features(
    {"record": datasets.Value("string"), "invalid": datasets.Value("string"), "problem": datasets.Value("string")}
)
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


def _check_tool_calls(position: int, calls: Any) -> None:
    if not isinstance(calls, list) or not all(
        isinstance(call, Mapping)
        and isinstance(call.get("function"), Mapping)
        and isinstance(call["function"].get("name"), str)
        and isinstance(call["function"].get("arguments"), Mapping)
        for call in calls
    ):
        raise RowError(
            f"turn {position} has malformed tool_calls {calls!r:.120}; each needs function.name (text) and "
            "function.arguments (a mapping)",
            reason="malformed tool call",
        )


def _check_messages(messages: Any, what: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"{what} must be a non-empty list of turns", reason="empty content")
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise RowError(f"turn {position} has role {role!r}; canonical roles are {', '.join(ROLES)}",
                           reason="unknown role")
        if message.get("tool_calls"):
            _check_tool_calls(position, message["tool_calls"])
        elif not isinstance(message.get("content"), str) or not message["content"].strip():
            raise RowError(f"turn {position} ({role}) is empty", reason="empty content")


def check_record(record: Mapping[str, Any]) -> None:
    """What every trainable record needs, whatever its adapter; raises RowError with the reason."""
    if "messages" in record:
        messages = record["messages"]
        _check_messages(messages, "messages")
        roles = [message["role"] for message in messages]
        if "assistant" not in roles:
            raise RowError("the conversation has no assistant turn", reason="no assistant turn")
        if roles[-1] != "assistant":
            raise RowError(f"the conversation ends on a {roles[-1]} turn, not an assistant turn",
                           reason="does not end on a trained turn")
    elif "prompt" in record and "completion" in record:
        for part in ("prompt", "completion"):
            value = record[part]
            if isinstance(value, str):
                if not value.strip():
                    raise RowError(f"{part} is empty", reason="empty content")
            else:
                _check_messages(value, part)
        completion = record["completion"]
        if not isinstance(completion, str) and completion[-1]["role"] != "assistant":
            raise RowError("the completion does not end on an assistant turn", reason="does not end on a trained turn")
    elif isinstance(record.get("text"), str):
        if not record["text"].strip():
            raise RowError("text is empty", reason="empty content")
    else:
        raise RowError(f"the adapter produced {sorted(record)}; expected messages, prompt/completion or text")


def adapt(
    dataset: datasets.Dataset, installed: InstalledAdapter, options: Mapping[str, Any], split: str,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Convert every row to ``record`` (canonical, as JSON) or mark it ``invalid`` with the reason and ``problem``.

    Records travel as JSON text so that tool-call arguments of any shape survive Arrow, which would
    otherwise merge every row's argument keys into one struct.
    """
    adapter = installed.adapter
    columns = [column for column in adapter.columns(options) if column in dataset.column_names]
    if not columns:
        raise SftkitError(
            f"{split} data: adapter {adapter.name!r} reads columns {adapter.columns(options)}, and the data has none of "
            f"them (it has {dataset.column_names}); name the right ones in dataset_options or choose another format"
        )
    dataset = dataset.select_columns(columns)  # never carry unread columns through an expensive pass

    def convert(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"record": [], "invalid": [], "problem": []}
        for offset in range(len(batch[columns[0]])):
            row = {column: batch[column][offset] for column in columns}
            try:
                record = adapter.convert(row, options)
                check_record(record)
            except RowError as error:
                out["record"].append(None)
                out["invalid"].append(error.reason)
                out["problem"].append(str(error))
                continue
            out["record"].append(json.dumps(record, ensure_ascii=False))
            out["invalid"].append(None)
            out["problem"].append(None)
        return out

    return dataset.map(
        convert, batched=True, remove_columns=columns, features=ADAPTED, num_proc=num_proc,
        desc=f"Adapting {split} rows ({adapter.name})",
    )
