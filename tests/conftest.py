"""Shared fixtures: data written by the tests themselves, the embedded tokenizer, a clean environment."""

from __future__ import annotations

import os

import pytest
from helpers import TINY_MODEL, sharegpt_row

from sftkit import embedded


@pytest.fixture
def sharegpt_rows() -> list[dict]:
    rows = []
    for index in range(40):
        a, b = index % 7 + 1, index % 5 + 2
        turns = [("human", f"What is {a} + {b}?"), ("gpt", f"{a} + {b} = {a + b}.")]
        if index % 4 == 0:
            turns.insert(0, ("system", "You are a concise assistant."))
        rows.append(sharegpt_row(index, *turns))
    return rows


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Prepared-data caches of the tests stay out of the user's ~/.cache, for in-process runs and subprocesses."""
    os.environ["SFTKIT_CACHE"] = str(tmp_path_factory.mktemp("sftkit-cache"))


@pytest.fixture(autouse=True)
def _clean_environment():
    """Tests start as a plain single-process run, and recipes' env: settings do not leak between tests."""
    saved = dict(os.environ)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded.resolve(TINY_MODEL))
