"""The plugin contract: one hook, one adapter interface. Everything a dataset-format plugin needs.

A plugin is a module (or object) with a function decorated by ``hookimpl``::

    from sftkit.hookspecs import Adapter, hookimpl

    @hookimpl
    def register_adapters(register):
        register(MyAdapter())

Third-party distributions expose that module through the ``sftkit`` entry-point group. sftkit's
own adapters register through exactly the same hook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("sftkit")
hookimpl = pluggy.HookimplMarker("sftkit")


class RowError(ValueError):
    """Raised by an adapter for a row it cannot convert; sftkit adds the row index and source.

    ``reason`` is the short category the bad-row report counts rows by (``unknown role``,
    ``empty content``, ``malformed tool call``, ...); the message says what exactly is wrong.
    """

    def __init__(self, message: str, reason: str = "rejected by adapter") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Option:
    """One ``dataset_options`` key an adapter accepts, with its default, a one-line help and allowed values."""

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None  # when set, sftkit rejects any other value before reading a row


@dataclass(frozen=True)
class Detection:
    """What ``Adapter.detect`` returns when the adapter fits data whose column names differ from its defaults: why,
    and the ``dataset_options`` that read this data (the recipe's own options win over them)."""

    reason: str
    options: Mapping[str, Any] = field(default_factory=dict)


class Adapter:
    """Turns one raw dataset row into a canonical record that TRL trains on.

    Canonical records are one of:
      - ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``,
        optionally with ``"tools": [...]`` (JSON-schema function definitions); an assistant turn
        may carry ``"tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}]``;
      - ``{"prompt": str | messages, "completion": str | messages}``;
      - ``{"text": str}``.
    Tokenisation, loss masking and packing are sftkit's job, not the adapter's.
    """

    name: str = ""
    description: str = ""
    options: Mapping[str, Option] = {}

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str | Detection | None:
        """Return why this adapter fits data with these columns and first rows (a ``Detection`` when it needs options
        to read them), or None if it does not."""
        return None

    def columns(self, options: Mapping[str, Any]) -> list[str]:
        """The raw columns ``convert`` reads; all others are dropped before any expensive pass."""
        raise NotImplementedError

    def convert(self, row: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        """Convert one raw row to a canonical record, or raise ``RowError`` saying what is wrong."""
        raise NotImplementedError


@hookspec
def register_adapters(register: Callable[[Adapter], None]) -> None:
    """Register dataset adapters by calling ``register(adapter)`` once for each."""
