"""Secrets stay out of what sftkit writes and prints: a token, key or password given in a recipe's ``env:``, in the
environment or as ``hub_token`` never reaches the run record, a checkpoint's record, ``skipped_rows.jsonl``, a
Kubernetes manifest or a printed command, even when the data happens to contain it.

One rule says what is secret (``is_secret``): a variable whose name says it holds a key, a secret, a password, a
token or a credential, and any URL that carries credentials (``postgres://user:pass@host``). Data is redacted
before it is serialised (``redacted``), since a serialiser may escape, quote or fold a value over lines; text
already written is redacted in every form a value takes in it (``redact``).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

# TOKENIZERS_PARALLELISM, which every Hugging Face user meets, names the tokenizers library, not a token.
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|PASSWD|TOKEN(?!IZER)|CREDENTIAL", re.IGNORECASE)
# scheme://userinfo@host: a user and password, or a token alone, before the host.
CREDENTIAL_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@\"\\<>]+@")
# Recipe keys that hold a credential by their meaning (pad_token and eos_token are the tokenizer's, not secrets).
SECRET_RECIPE_KEYS = frozenset({"hub_token"})
REDACTED = "[redacted]"
SHORTEST_SECRET = 8  # shorter values (a "1", a "true") are settings, and would redact half the text


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def has_credentials(text: str) -> bool:
    """Whether ``text`` holds a URL with credentials in it."""
    return bool(CREDENTIAL_URL.search(text))


def is_secret(name: str, value: str) -> bool:
    """Whether the variable ``name=value`` must never be written in plain text: its name or its value says so."""
    return is_secret_name(name) or has_credentials(value)


# Secrets this process was given that its environment no longer shows (a variable set again since): still secrets.
_REMEMBERED: set[str] = set()


def remember(*values: str | None) -> None:
    """Keep redacting ``values`` whatever the environment says later (a hub_token moved into HF_TOKEN, whose own
    value it replaces)."""
    _REMEMBERED.update(value for value in values if value and len(value) >= SHORTEST_SECRET)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the secret variables of ``environ`` (the process's environment by default) and the secrets
    remembered, longest first."""
    environ = os.environ if environ is None else environ
    found = {value for name, value in environ.items() if len(value) >= SHORTEST_SECRET and is_secret(name, value)}
    return sorted(found | _REMEMBERED, key=len, reverse=True)


@functools.lru_cache(maxsize=256)
def encoded_forms(value: str) -> tuple[str, ...]:
    """The forms ``value`` takes inside text sftkit writes: as it is, JSON-escaped (ASCII or not), YAML-quoted (single
    or double, ASCII or not) and as Python's repr quotes it. Longest first, so a form is replaced before a part of
    it."""
    forms = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1], value.replace("'", "''"),
             repr(value)[1:-1]}
    for allow_unicode in (False, True):
        quoted = yaml.safe_dump(value, default_style='"', width=float("inf"), allow_unicode=allow_unicode)
        forms.add(quoted.strip()[1:-1])
    return tuple(sorted(forms, key=len, reverse=True))


def redact(text: str) -> str:
    """``text`` with every secret of the environment, in each of its encoded forms, and the credentials of every URL
    replaced by ``[redacted]``."""
    for value in secret_values():
        for form in encoded_forms(value):
            if form in text:
                text = text.replace(form, REDACTED)
    return CREDENTIAL_URL.sub(rf"\1{REDACTED}@", text)


def redacted(value: Any) -> Any:
    """A copy of plain data (mappings, lists, text) with every secret replaced by ``[redacted]``: the value of a
    secret recipe key (``hub_token``) whole, and any secret inside a text. Redacted before it is serialised, a
    secret reaches the file in no encoding."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {redacted(key): REDACTED if key in SECRET_RECIPE_KEYS and item is not None else redacted(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [redacted(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value
