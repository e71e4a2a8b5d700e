"""Adapt: pick the adapter for the data, check its options, and what a canonical record must be."""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import datasets

from sftkit.contract import (
    BROKEN_CONTRACT,
    CONTRACT,
    ROLES,
    Adapter,
    Columns,
    Detection,
    RowError,
    debugging,
    record_shape,
)
from sftkit.errors import SftkitError
from sftkit.plugins import InstalledAdapter, Registry
from sftkit.records import INVALID_WEIGHT, short
from sftkit.values import Mismatch, coerce, type_name

logger = logging.getLogger(__name__)

DETECTION_ROWS = 16


def choose_adapter(dataset_format: str, dataset: datasets.Dataset,
                   registry: Registry) -> tuple[InstalledAdapter, str, dict[str, Any]]:
    """The named adapter, or with ``auto`` the single one that recognises the data; returns it, why, and the options
    its detection found (such as the name of the column that holds the turns)."""
    if dataset_format != "auto":
        return registry.get(dataset_format), "named by dataset_format", {}
    rows = dataset.select(range(min(DETECTION_ROWS, dataset.num_rows))).to_list()
    matches, left_out = [], []
    for name, installed in sorted(registry.adapters.items()):
        try:
            found = detection(installed.adapter, dataset.column_names, rows)
        except SftkitError as error:  # one plugin's bug must not stop the others from detecting
            left_out.append(name)
            logger.warning("dataset_format auto leaves out adapter %r (from %s %s), whose detect() failed: %s. Tell "
                           "its authors, or set dataset_format.", name, installed.distribution, installed.version, error)
            continue
        if found is not None:
            matches.append((installed, f"dataset_format auto: {name} ({found.reason})", dict(found.options)))
    if len(matches) == 1:
        return matches[0]
    adapters = ", ".join(sorted(registry.adapters))
    if not matches:
        failed = f" ({', '.join(left_out)} left out: detect() failed)" if left_out else ""
        raise SftkitError(
            f"dataset_format auto: no installed adapter recognises columns {dataset.column_names}. "
            f"Installed adapters: {adapters}{failed}. Set dataset_format to one of them (with dataset_options to name "
            "the columns), or install a plugin for this format."
        )
    names = ", ".join(installed.adapter.name for installed, _, _ in matches)
    raise SftkitError(
        f"dataset_format auto: several adapters recognise columns {dataset.column_names}: {names}. "
        "Set dataset_format to the one you mean."
    )


def detection(adapter: Adapter, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Detection | None:
    """What the adapter's ``detect`` says of this data, as a Detection, or None when it does not fit. A ``detect``
    that raises or returns something else is a plugin's bug: SftkitError naming the adapter (``SFTKIT_DEBUG=1``
    lets its exception through, with its traceback)."""
    try:
        found = adapter.detect(columns, rows)
    except Exception as error:  # the plugin's code: reported by the adapter's name
        if debugging():
            raise
        raise SftkitError(f"adapter {adapter.name!r}: detect() raised {type(error).__name__}: {error}") from None
    if found is None or isinstance(found, Detection):
        return found
    if isinstance(found, str):
        return Detection(found) if found else None
    raise SftkitError(f"adapter {adapter.name!r}: detect() returned {found!r:.80}; the adapter contract {CONTRACT} asks "
                      "for the reason it fits (text), a sftkit.Detection, or None")


def resolve_options(adapter: Adapter, given: Mapping[str, Any]) -> Any:
    """The adapter's Options for a run, checked once before any row: each key known, each value of its declared
    type, then the adapter's own ``check``. Any failure is one configuration error naming the adapter."""
    hints = typing.get_type_hints(adapter.Options)
    known = {spec.name for spec in dataclasses.fields(adapter.Options)}
    for key in given:
        if key not in known:
            accepted = ", ".join(sorted(known)) or "none"
            raise SftkitError(f"dataset_options: adapter {adapter.name!r} has no option {key!r} (accepted: {accepted})")
    typed = {}
    for key, value in given.items():
        try:
            typed[key] = coerce(value, hints[key])
        except Mismatch:
            raise SftkitError(f"dataset_options: {key} of adapter {adapter.name!r} must be {type_name(hints[key])}, "
                              f"got {value!r}") from None
        if isinstance(typed[key], float) and not math.isfinite(typed[key]):
            raise SftkitError(f"dataset_options: {key} of adapter {adapter.name!r} must be a finite number, got "
                              f"{value!r}")
    options = adapter.Options(**typed)
    try:
        adapter.check(options)
    except (ValueError, TypeError) as error:
        raise SftkitError(f"dataset_options of adapter {adapter.name!r}: {error}") from None
    return options


def options_record(options: Any) -> dict[str, Any]:
    """The options as plain values, for the run record and the cache key."""
    return dataclasses.asdict(options)


def _check_tool_calls(position: int, calls: Any) -> None:
    if not isinstance(calls, list) or not all(
        isinstance(call, Mapping)
        and isinstance(call.get("function"), Mapping)
        and isinstance(call["function"].get("name"), str)
        and isinstance(call["function"].get("arguments"), Mapping)
        and isinstance(call.get("id", ""), str)
        for call in calls
    ):
        raise RowError(
            f"turn {position} has malformed tool_calls {calls!r:.120}; each needs function.name (text), "
            "function.arguments (a mapping) and, if it has one, a text id",
            reason="malformed tool call",
        )


def _check_messages(messages: Any, what: str, adapter: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"{what} must be a non-empty list of turns", reason="empty content")
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            # The data's speakers are the adapter's to map (an unknown one is its own row error, with the option
            # that maps it): a role outside the canonical ones here is the adapter's output, not the data.
            made = f"role {role!r}" if isinstance(message, Mapping) else f"{short(message)}, not a mapping,"
            raise RowError(f"adapter {adapter!r} made turn {position} of the {what} with {made} where the contract "
                           f"asks for a role among {', '.join(ROLES)}: check the adapter's options (such as a role "
                           "map), else its code; the data is not at fault", reason=BROKEN_CONTRACT)
        if message.get("tool_calls"):
            _check_tool_calls(position, message["tool_calls"])
        elif not isinstance(message.get("content"), str) or not message["content"].strip():
            raise RowError(f"turn {position} ({role}) is empty", reason="empty content")
        weight = message.get("weight")
        if weight is not None and (weight not in (0, 1) or (weight == 1 and role != "assistant")):
            raise RowError(f"turn {position} ({role}) has weight {weight!r}; a weight is 0 (not trained) or 1 "
                           "(trained), and only assistant turns are trained", reason=INVALID_WEIGHT)
        for key in ("reasoning_content", "tool_call_id"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise RowError(f"turn {position} ({role}): {key} must be text, got {message[key]!r:.80}")


def _check_trained(messages: list[Mapping[str, Any]], what: str) -> None:
    """Some assistant turn of ``messages`` is trained (``weight`` 0 leaves one out)."""
    replies = [message for message in messages if message["role"] == "assistant"]
    if replies and all(message.get("weight") == 0 for message in replies):
        raise RowError(f"every assistant turn of the {what} has weight 0, so nothing trains", reason="no trained turn")


def check_record(record: Mapping[str, Any], adapter: str) -> None:
    """What every trainable record needs, whatever its adapter (named in what breaks the contract); raises RowError
    with the reason."""
    shape = record_shape(record)
    if shape == "messages":
        messages = record["messages"]
        _check_messages(messages, "messages", adapter)
        roles = [message["role"] for message in messages]
        if "assistant" not in roles:
            raise RowError("the conversation has no assistant turn", reason="no assistant turn")
        if roles[-1] != "assistant":
            raise RowError(f"the conversation ends on a {roles[-1]} turn, not an assistant turn",
                           reason="does not end on a trained turn")
        _check_trained(messages, "conversation")
    elif shape == "prompt_completion":
        for part in ("prompt", "completion"):
            value = record[part]
            if isinstance(value, str):
                if not value.strip():
                    raise RowError(f"{part} is empty", reason="empty content")
            else:
                _check_messages(value, part, adapter)
        completion = record["completion"]
        if not isinstance(completion, str):
            if completion[-1]["role"] != "assistant":
                raise RowError("the completion does not end on an assistant turn",
                               reason="does not end on a trained turn")
            _check_trained(completion, "completion")
    elif shape == "text" and isinstance(record["text"], str):
        if not record["text"].strip():
            raise RowError("text is empty", reason="empty content")
    else:
        raise RowError(f"adapter {adapter!r} made a record of {', '.join(map(repr, record)) or 'nothing'}, where the "
                       "contract asks for messages, prompt and completion, or text", reason=BROKEN_CONTRACT)


def declared_columns(adapter: Adapter, options: Any) -> Columns:
    """The columns the adapter reads with these options, as the contract asks it to declare them."""
    columns = adapter.columns(options)
    if not isinstance(columns, Columns):
        raise SftkitError(f"adapter {adapter.name!r}: columns() returned {type(columns).__name__}; the adapter contract "
                          f"{CONTRACT} asks for sftkit.Columns(required=(...), optional=(...))")
    return columns


def check_columns(installed: InstalledAdapter, options: Any, dataset: datasets.Dataset, source: str) -> None:
    """Every column the adapter requires is in the data: one error naming the plugin, the column and what is there."""
    adapter = installed.adapter
    missing = [column for column in declared_columns(adapter, options).required if column not in dataset.column_names]
    if missing:
        raise SftkitError(
            f"dataset {source}: adapter {adapter.name!r} (from {installed.distribution} {installed.version}) needs "
            f"column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}, which the data lacks (it has "
            f"{', '.join(dataset.column_names)}); name the right ones in dataset_options or choose another format"
        )
