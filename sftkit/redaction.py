"""Secrets stay out of what sftkit writes: a token given in a recipe's ``env:`` (or the environment) never reaches
the run record, a checkpoint's record or ``skipped_rows.jsonl``, even when the data happens to contain it."""

from __future__ import annotations

import os
import re

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_KEY", re.IGNORECASE)
REDACTED = "[redacted]"
SHORTEST_SECRET = 8  # shorter values (a "1", a "true") are settings, and would redact half the text


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def redact(text: str) -> str:
    """``text`` with the value of every secret-looking environment variable replaced by ``[redacted]``."""
    for name, value in os.environ.items():
        if len(value) >= SHORTEST_SECRET and is_secret_name(name) and value in text:
            text = text.replace(value, REDACTED)
    return text
