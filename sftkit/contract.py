"""The adapter contract, version 1.0: what a dataset-format plugin implements and what sftkit promises it.

An adapter declares its name, its options (a frozen dataclass whose fields are the ``dataset_options``
keys, each declared with ``Option(default, help)``), the columns it reads, and how it converts one raw
row into a canonical record. sftkit checks the options once before any row, checks that the data has
the required columns, hands ``convert`` each row with exactly the declared columns (a ``RowView``: reading
another is an error naming it), and renders, tokenizes and masks the records itself.

Versions: a plugin states the contract it was written for (``Adapter.contract``). sftkit loads a plugin
written for the same major version and a minor version no newer than its own; a minor version only
adds (an optional method, a hook parameter: pluggy passes a hook implementation only the parameters
it names, so an older plugin keeps working). A new major version breaks, and says so by name.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Required, TypedDict, get_args

from sftkit.errors import SftkitError

CONTRACT = "1.0"
# The reason a row is counted under when the adapter's output is not what the contract promises.
BROKEN_CONTRACT = "adapter broke the contract"
# Set (or `sftkit --debug`): an exception raised by a plugin's code stops sftkit with its traceback, for its author.
DEBUG_ENV = "SFTKIT_DEBUG"


class RowError(ValueError):
    """Raised by an adapter for a row it cannot convert; sftkit adds the row index and source.

    ``reason`` is the short category the bad-row report counts rows by (``unknown role``,
    ``empty content``, ``malformed tool call``, ...); the message says what exactly is wrong.
    """

    def __init__(self, message: str, reason: str = "rejected by adapter") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Detection:
    """What ``Adapter.detect`` returns when the adapter fits data whose column names differ from its defaults: why,
    and the ``dataset_options`` that read this data (the recipe's own options win over them)."""

    reason: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Columns:
    """The raw columns ``convert`` reads. A missing required column is one error before any row is read; a missing
    optional one reaches ``convert`` as None."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.required, *self.optional)


class RowView(Mapping[str, Any]):
    """The row ``convert`` receives: exactly the columns the adapter declared, a missing optional one as None.

    Reading any other column (``row[...]``, ``row.get(...)``, ``... in row``) raises ``SftkitError`` naming the
    adapter and the column: such a column is dropped before sftkit reads a row, so the read would give nothing in
    every row, whatever the data holds. It stops the run rather than rejecting the row, because the fault is the
    adapter's code, the same for every row, and not the data's.
    """

    __slots__ = ("_adapter", "_values")

    def __init__(self, adapter: str, columns: Sequence[str], row: Mapping[str, Any]) -> None:
        self._adapter = adapter
        self._values = {column: row.get(column) for column in columns}

    def __getitem__(self, column: str) -> Any:
        try:
            return self._values[column]
        except KeyError:
            declared = ", ".join(map(repr, self._values)) or "none"
            raise SftkitError(
                f"adapter {self._adapter!r} read column {column!r}, which its columns() does not declare (it declares "
                f"{declared}), so it would read nothing in every row: add {column!r} to the required or optional "
                "columns that columns() returns"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"RowView({self._values!r})"


def Option(default: Any = None, help: str = "") -> Any:
    """One ``dataset_options`` key of an adapter's Options dataclass: ``key: type = sftkit.Option(default, "help")``.

    A list or dict default is copied for each run (no mutable class attribute to share); the help is the line
    ``sftkit adapters`` shows beside the key. The field's type is what sftkit checks the recipe's value against.
    """
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class NoOptions:
    """The Options of an adapter that takes none."""

# The canonical records, what every adapter's convert returns (``sftkit.records`` has the helpers that build them).

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = get_args(Role)


class Function(TypedDict):
    name: str
    arguments: dict[str, Any]


class ToolCall(TypedDict, total=False):
    id: str  # the call's id, which the tool turn that answers it names (Mistral's templates read both)
    type: Required[Literal["function"]]
    function: Required[Function]


class Message(TypedDict, total=False):
    role: Required[Role]
    content: Required[str]
    reasoning_content: str  # assistant messages: the reasoning before the reply
    tool_calls: list[ToolCall]  # assistant messages that call tools
    weight: Literal[0, 1]  # assistant messages: 0 leaves the turn untrained (OpenAI's fine-tuning format)
    name: str  # tool messages: the tool that answered
    tool_call_id: str  # tool messages: the id of the call answered


class Conversation(TypedDict, total=False):
    messages: Required[list[Message]]
    tools: list[dict[str, Any]]


class PromptCompletion(TypedDict):
    prompt: str | list[Message]
    completion: str | list[Message]


class Text(TypedDict):
    text: str


Record = Conversation | PromptCompletion | Text
RecordShape = Literal["messages", "prompt_completion", "text"]


def record_shape(record: Mapping[str, Any]) -> RecordShape | None:
    """Which of the three canonical shapes a record has; None for none of them."""
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return "text" if "text" in record else None


def is_conversation(record: Mapping[str, Any]) -> bool:
    """Whether a checked record is rendered by a chat template: messages, or a prompt and completion of turns."""
    return record_shape(record) == "messages" or isinstance(record.get("prompt"), list)


class Adapter:
    """Turns one raw dataset row into a canonical record (``sftkit.records``).

    Class attributes: ``name`` (the value of ``dataset_format`` that picks it), ``description`` (one line for
    ``sftkit adapters``), ``contract`` (the contract version it was written for) and ``Options`` (a frozen
    dataclass whose fields are the ``dataset_options`` keys: ``key: type = Option(default, "help")``, allowed
    values with ``Literal[...]``). Tokenisation, chat templates, loss masking and packing are sftkit's job, not
    the adapter's.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    contract: ClassVar[str] = CONTRACT
    Options: ClassVar[type] = NoOptions

    def detect(self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str | Detection | None:
        """With ``dataset_format: auto``: why this adapter fits data with these columns and first rows (a Detection
        when reading them needs options), or None when it does not."""
        return None

    def columns(self, options: Any) -> Columns:
        """The raw columns ``convert`` reads, required and optional; the others are dropped before any pass."""
        raise NotImplementedError

    def check(self, options: Any) -> None:
        """Once per run, before any row: raise ``ValueError`` with what is wrong with an option's value."""

    def convert(self, row: Mapping[str, Any], options: Any) -> Record:
        """One raw row (a ``RowView`` of the declared columns, missing optional ones as None) -> a canonical record,
        or ``RowError``."""
        raise NotImplementedError


def option_help(options_type: type) -> list[tuple[str, Any, str, str]]:
    """(key, default, type, help) of every option, for ``sftkit adapters``."""
    from sftkit.values import type_name

    hints = typing.get_type_hints(options_type)
    return [(spec.name, option_default(spec), type_name(hints[spec.name]), spec.metadata.get("help", ""))
            for spec in dataclasses.fields(options_type)]


def option_default(spec: dataclasses.Field) -> Any:
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def compatible(contract: str) -> bool:
    """Whether a plugin written for ``contract`` runs on this sftkit: the same major version, a minor one no newer."""
    try:
        major, minor = (int(part) for part in str(contract).split("."))
    except ValueError:
        return False
    ours_major, ours_minor = (int(part) for part in CONTRACT.split("."))
    return major == ours_major and minor <= ours_minor


def options_problem(adapter: Adapter) -> str | None:
    """What is wrong with an adapter's ``Options`` as the contract declares them, or None: checked when the adapter
    registers, so that a wrong declaration is reported by name instead of failing ``sftkit adapters`` or a run."""
    options = adapter.Options
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        return (f"adapter {adapter.name!r}: Options is {options!r}, not a dataclass; declare it as a "
                "@dataclass(frozen=True) class whose fields are `key: type = sftkit.Option(default, \"help\")`")
    try:
        typing.get_type_hints(options)
    except Exception as error:  # noqa: BLE001 - any failure to read an annotation is the same declaration problem
        return (f"adapter {adapter.name!r}: the types of its Options fields cannot be read ({type(error).__name__}: "
                f"{error}); import every name they use at module level")
    if missing := [spec.name for spec in dataclasses.fields(options) if option_default(spec) is dataclasses.MISSING]:
        return (f"adapter {adapter.name!r}: Options field {', '.join(map(repr, missing))} has no default; declare "
                "each field as `key: type = sftkit.Option(default, \"help\")`")
    return None


def debugging() -> bool:
    """Whether a plugin's exception should keep its traceback (``SFTKIT_DEBUG=1``, ``sftkit --debug``) rather than
    become a one-line error: how an adapter's author finds the line that failed."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
