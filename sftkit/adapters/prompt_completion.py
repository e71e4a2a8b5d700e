"""Prompt-completion: ``prompt`` and ``completion`` columns, each text or a list of ``{role, content}`` turns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sftkit.adapters.messages import ROLES, _short, check_role_map, convert_messages
from sftkit.hookspecs import Adapter, Option, RowError, hookimpl


class PromptCompletionAdapter(Adapter):
    name = "prompt_completion"
    description = "TRL prompt-completion: prompt and completion columns, both text or both lists of {role, content}."
    options = {
        "prompt_column": Option("prompt", "column with the prompt (text or a list of {role, content} turns)"),
        "completion_column": Option(
            "completion", "column with the completion (text or a list of {role, content} turns)"
        ),
        "role_map": Option(
            {}, "extra role -> canonical role (system, user, assistant, tool), merged over the identity map"
        ),
    }

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str | None:
        if {"prompt", "completion"} <= set(columns):
            return "columns prompt and completion"
        return None

    def columns(self, options: Mapping[str, Any]) -> list[str]:
        return [options["prompt_column"], options["completion_column"]]

    def convert(self, row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        check_role_map(options["role_map"], ROLES)
        role_map = {**{role: role for role in ROLES}, **options["role_map"]}
        values = {}
        for key in ("prompt_column", "completion_column"):
            column = options[key]
            if column not in row:
                raise RowError(f"the row has no column {column!r}; name the right one with dataset_options {key}")
            value = row[column]
            if isinstance(value, list):
                if not value:
                    raise RowError(f"column {column!r} is an empty list of turns", reason="empty content")
                value = convert_messages(value, column, role_map)
            elif not isinstance(value, str):
                raise RowError(
                    f"column {column!r} must be text or a list of {{role, content}} turns, got {_short(value)}"
                )
            values[key] = value
        prompt, completion = values["prompt_column"], values["completion_column"]
        if isinstance(prompt, str) != isinstance(completion, str):
            raise RowError(
                f"columns {options['prompt_column']!r} and {options['completion_column']!r} must both be text or both "
                f"be lists of turns; got {type(prompt).__name__} and {type(completion).__name__}"
            )
        if isinstance(completion, str) and not completion.strip():
            raise RowError(f"column {options['completion_column']!r} is empty", reason="empty content")
        return {"prompt": prompt, "completion": completion}


@hookimpl
def register_adapters(register) -> None:
    register(PromptCompletionAdapter())
