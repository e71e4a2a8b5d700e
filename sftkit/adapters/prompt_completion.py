"""Prompt-completion: ``prompt`` and ``completion`` columns, each text or a list of ``{role, content}`` turns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sftkit import (
    EMPTY_CONTENT,
    ROLES,
    Adapter,
    Columns,
    Option,
    Record,
    RowError,
    check_role_map,
    hookimpl,
    messages_from_turns,
    short,
    text,
)


@dataclass(frozen=True)
class PromptCompletionOptions:
    prompt_column: str = Option("prompt", "column with the prompt (text or a list of {role, content} turns)")
    completion_column: str = Option("completion", "column with the completion (text or a list of {role, content} "
                                                  "turns)")
    role_map: Mapping[str, str] = Option({}, "extra role -> canonical role (system, user, assistant, tool), merged over "
                                          "the identity map")


class PromptCompletionAdapter(Adapter):
    name = "prompt_completion"
    description = "TRL prompt-completion: prompt and completion columns, both text or both lists of {role, content}."
    Options = PromptCompletionOptions

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str | None:
        if {"prompt", "completion"} <= set(columns):
            return "columns prompt and completion"
        return None

    def columns(self, options: PromptCompletionOptions) -> Columns:
        return Columns(required=(options.prompt_column, options.completion_column))

    def check(self, options: PromptCompletionOptions) -> None:
        check_role_map(options.role_map, ROLES)

    def convert(self, row: Mapping[str, Any], options: PromptCompletionOptions) -> Record:
        role_map = {**{role: role for role in ROLES}, **options.role_map}
        values = {}
        for key, column in (("prompt", options.prompt_column), ("completion", options.completion_column)):
            value = row[column]
            if isinstance(value, list):
                if not value:
                    raise RowError(f"column {column!r} is an empty list of turns", reason=EMPTY_CONTENT)
                value = messages_from_turns(value, column, role_map)
            elif not isinstance(value, str):
                raise RowError(f"column {column!r} must be text or a list of {{role, content}} turns, got {short(value)}")
            values[key] = value
        prompt, completion = values["prompt"], values["completion"]
        if isinstance(prompt, str) != isinstance(completion, str):
            raise RowError(
                f"columns {options.prompt_column!r} and {options.completion_column!r} must both be text or both "
                f"be lists of turns; got {type(prompt).__name__} and {type(completion).__name__}"
            )
        if isinstance(completion, str):
            text(completion, options.completion_column, "completion_column")
        return {"prompt": prompt, "completion": completion}


@hookimpl
def register_adapters(register) -> None:
    register(PromptCompletionAdapter())
