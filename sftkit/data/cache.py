"""The preparation cache: tokenized rows on disk, keyed by everything that changes them.

A second run with the same data, adapter, tokenizer, chat template, token settings and versions of the
libraries that render and tokenize rows loads the prepared rows at once. Any change in those gives another key, so a stale cache is never read.
Processes that share the cache directory wait on a file lock, not a collective: the first one
prepares and the others load, however long preparation takes.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import datasets
from filelock import FileLock

from sftkit import __version__
from sftkit.caches import cache_home
from sftkit.contract import debugging

logger = logging.getLogger(__name__)

COMPLETE = "complete.json"


def cache_root() -> Path:
    return cache_home() / "prepared"


def _package_files(module_name: str) -> dict[str, Path]:
    """Every Python file of the top-level package that ``module_name`` belongs to (or the module's own file), by
    its name inside the package."""
    name = module_name.split(".")[0]
    top = sys.modules.get(name) or importlib.import_module(name)
    roots = [Path(path) for path in getattr(top, "__path__", [])]
    if not roots:
        return {name: Path(top.__file__)} if getattr(top, "__file__", None) else {}
    return {f"{name}/{file.relative_to(root)}": file for root in roots for file in root.rglob("*.py")}


def code_digest(adapter_types: Iterable[type]) -> str:
    """The code that turns rows into tokens: all of sftkit, and all of each adapter's package. An upgrade of sftkit
    or of a plugin, or an edit anywhere in them, is a new key (helpers an adapter imports included)."""
    files: dict[str, Path] = {}
    for package in {"sftkit", *(adapter.__module__ for adapter in adapter_types)}:
        files.update(_package_files(package))
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes())
    return digest.hexdigest()


# Libraries whose upgrade can change what a row renders or tokenizes to: the chat template's engine and its filters
# (jinja2, transformers' apply_chat_template), and the tokenizer.
RENDERING_LIBRARIES = ("transformers", "tokenizers", "jinja2")


def library_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in RENDERING_LIBRARIES}


def preparation_key(parts: dict[str, Any], code: str) -> str:
    """A short digest of every input to preparation, given as ``parts``, of the code that runs it, and of the
    versions of the libraries that render and tokenize rows. A debugging run (``SFTKIT_DEBUG``) prepares its rows
    anew, so that an adapter's exception on any row shows its traceback."""
    payload = json.dumps({"sftkit": __version__, "code": code, "libraries": library_versions(),
                          "debug": debugging(), **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cached(key: str, build: Callable[[], dict[str, datasets.Dataset]]) -> tuple[dict[str, datasets.Dataset], bool]:
    """The prepared splits for ``key``: loaded from disk when present, else built and saved. Returns (splits, hit)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / key
    with FileLock(str(root / f"{key}.lock")):
        hit = (folder / COMPLETE).is_file()
        if not hit:
            splits = build()
            for name, rows in splits.items():
                rows.save_to_disk(str(folder / name))
            (folder / COMPLETE).write_text(json.dumps({"splits": list(splits)}))
            logger.info("prepared rows cached in %s", folder)
        names = json.loads((folder / COMPLETE).read_text())["splits"]
    return {name: datasets.load_from_disk(str(folder / name)) for name in names}, hit
