"""Values checked against the type their key declares: recipe keys and adapters' options alike.

A value is taken as the type wants it or refused, never guessed across kinds: ``0625`` is a number in
YAML and not a string, ``true`` is not ``"true"``. Values typed on the command line are text, parsed as
YAML for keys that are not text. A number can be of its type and still make no sense for its key: a
``Bound`` says which numbers do.
"""

from __future__ import annotations

import enum
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from sftkit.errors import SftkitError


class MixtureEntry:
    """The type of a ``datasets:`` entry (TRL's ``DatasetConfig``): a mapping, checked key by key by the recipe reader."""


class CommandLineValue(str):
    """A value typed on the command line: kept as text for text fields, parsed as YAML for the others."""


def type_name(annotation: Any) -> str:
    """How a type reads in an error message: "true/false", "one of 'a', 'b'", "integer or null"."""
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(annotation))
    names = {bool: "true/false", int: "integer", float: "number", str: "string", dict: "mapping", Mapping: "mapping",
             list: "list", MixtureEntry: "mapping"}
    origin = typing.get_origin(annotation) or annotation
    if origin is list and typing.get_args(annotation):
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    if origin in (dict, Mapping) and typing.get_args(annotation):
        key, value = typing.get_args(annotation)
        return f"mapping of {type_name(key)} to {type_name(value)}"
    return names.get(origin, getattr(origin, "__name__", str(origin)))


class Mismatch(Exception):
    """A value that is not of the type its key (or option) declares."""


@dataclass(frozen=True)
class Bound:
    """The numbers a key makes sense with, beyond its type: a library takes ``max_length: -5`` or ``seed: -1`` and
    fails far from the recipe, or does something else than asked. From ``low`` up to ``high`` (an ``*_open`` end
    excluded), finite, or one of ``also``: values with a meaning of their own, ``meaning`` says which."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    also: tuple[Any, ...] = ()
    meaning: str = ""

    def admits(self, value: Any) -> bool:
        if any(value == special and type(value) is type(special) for special in self.also):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """How the bound reads in an error: "at least 1", "at least 0 and below 1", "above 0, or -1 (...)"."""
        parts = [f"{'above' if self.low_open else 'at least'} {_number(self.low)}"]
        if self.high != math.inf:
            parts.append(f"{'below' if self.high_open else 'at most'} {_number(self.high)}")
        text = " and ".join(parts)
        return f"{text}, or {self.meaning}" if self.meaning else text


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def coerce(value: Any, annotation: Any) -> Any:
    """Return ``value`` as ``annotation`` wants it, or raise Mismatch. Never guesses across kinds."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # the first member type that takes the value (text typed too)
        for arg in typing.get_args(annotation):
            try:
                return coerce(value, arg)
            except Mismatch:
                continue
        raise Mismatch
    if isinstance(value, CommandLineValue):
        if annotation is str or (isinstance(annotation, type) and issubclass(annotation, enum.Enum)):
            return coerce(str(value), annotation)
        return coerce(yaml.safe_load(value), annotation)
    if annotation is Any:
        return value
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise Mismatch
    if annotation is type(None):
        if value is None:
            return None
        raise Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise Mismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as text
            try:
                return float(value)
            except ValueError:
                raise Mismatch from None
        raise Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise Mismatch
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if any(value == member.value for member in annotation):  # compared, not hashed: a list is no member either
            return value
        raise Mismatch
    if origin is list or annotation is list:
        (item_type,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, list):
            return [coerce(item, item_type) for item in value]
        raise Mismatch
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        key_type, value_type = typing.get_args(annotation) or (Any, Any)
        if isinstance(value, dict):
            return {coerce(key, key_type): coerce(item, value_type) for key, item in value.items()}
        raise Mismatch
    if annotation is MixtureEntry:
        if not isinstance(value, dict):
            raise Mismatch
        return value  # checked key by key in _check_mixture
    return value  # library objects (e.g. ParallelismConfig): let their own constructors judge

def parse_overrides(arguments: list[str]) -> dict[str, Any]:
    """``--key value`` recipe overrides (``--flag`` alone means true), kept as text until the key's type is known."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(arguments):
        token = arguments[index]
        if not token.startswith("--") or token == "--":
            raise SftkitError(f"unexpected argument {token!r}: recipe keys are written --key value or --key=value")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            next_is_value = index + 1 < len(arguments) and not arguments[index + 1].startswith("--")
            value = arguments[index + 1] if next_is_value else "true"
            index += 1 if next_is_value else 0
        index += 1
        overrides[key.replace("-", "_")] = CommandLineValue(value)
    return overrides
