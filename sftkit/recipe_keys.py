"""The keys a recipe may set, with their types and defaults, known without importing TRL.

TRL's argument classes (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``, ``DatasetMixtureConfig``) define
most recipe keys, but importing them imports transformers, torch and peft: seconds that commands which only read
a recipe (``sftkit k8s render``) should not spend. Their keys are read once for each installed TRL and
transformers and kept in sftkit's cache as JSON: each type in a small vocabulary of its own (an enum keeps its
values, TRL's ``DatasetConfig`` becomes ``MixtureEntry``), each default as the class gives it. A missing or
unreadable cache file is rebuilt from the classes themselves, so the keys are always the installed TRL's.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import importlib.metadata
import json
import os
import sys
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sftkit.caches import cache_home
from sftkit.values import MixtureEntry

# TRL's classes that define recipe keys, first owner of a key first (SFTConfig's output_dir, not another's).
TRL_CLASSES = ("ScriptArguments", "SFTConfig", "ModelConfig", "DatasetMixtureConfig")
FORMAT = 1  # the cache file's layout; a change makes every cached file stale


@dataclass(frozen=True)
class Key:
    """One recipe key: the class that declares it, its type, and the default that class gives it."""

    name: str
    owner: str
    annotation: Any
    default: Any

    def default_value(self) -> Any:
        """The default, as a fresh copy: a list or mapping default is the caller's to change."""
        return copy.deepcopy(self.default)


@dataclass(frozen=True)
class KeyTable:
    """Every key of a set of dataclasses, and the keys a ``datasets:`` mixture entry takes."""

    keys: dict[str, Key]
    mixture_entry_keys: frozenset[str]


@functools.cache
def trl_keys() -> KeyTable:
    """TRL's recipe keys: from the cache when it holds this TRL's and transformers', else read from the classes."""
    path = cache_home() / "recipe-keys" / f"{_versions()}.json"
    try:
        return _decode(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):  # absent, unreadable, or written by another layout
        pass
    table = _read_trl_classes()
    _store(path, table)
    return _decode(table)


def keys_of(classes: tuple[type, ...]) -> dict[str, Key]:
    """The keys of dataclasses defined here (sftkit's own), in the same terms as TRL's."""
    return _decode({"keys": _encode_classes(classes), "mixture_entry_keys": []}).keys


def _versions() -> str:
    """What the cached keys depend on: the installed TRL and transformers, the interpreter, and this layout."""
    installed = "-".join(f"{name}{importlib.metadata.version(name)}" for name in ("trl", "transformers"))
    return f"{installed}-py{sys.version_info.major}.{sys.version_info.minor}-f{FORMAT}"


def _read_trl_classes() -> dict[str, Any]:
    import trl
    from trl.scripts.utils import DatasetConfig

    classes = tuple(getattr(trl, name) for name in TRL_CLASSES)
    return {"keys": _encode_classes(classes),
            "mixture_entry_keys": sorted(field.name for field in dataclasses.fields(DatasetConfig))}


def _store(path: Any, table: dict[str, Any]) -> None:
    """Write atomically; a cache that cannot be written only means the next command reads the classes again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as file:
            json.dump(table, file)
        os.replace(file.name, path)
    except OSError:
        pass


# ---------------------------------------------------------------- types and defaults as JSON


def _encode_classes(classes: tuple[type, ...]) -> list[dict[str, Any]]:
    keys: dict[str, dict[str, Any]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.init and field.name not in keys:
                default = field.default_factory() if field.default is dataclasses.MISSING else field.default
                keys[field.name] = {"name": field.name, "owner": cls.__name__, "type": _encode(hints[field.name]),
                                    "default": default.value if isinstance(default, enum.Enum) else default}
    return list(keys.values())


def _encode(annotation: Any) -> Any:
    """A type annotation in a vocabulary JSON holds: a name, or [kind, ...] for the types built from others."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return ["union", [_encode(arg) for arg in typing.get_args(annotation)]]
    if origin is typing.Literal:
        return ["literal", list(typing.get_args(annotation))]
    if origin is list:
        return ["list", _encode(typing.get_args(annotation)[0])]
    if origin in (dict, Mapping):
        return ["dict", *(_encode(arg) for arg in typing.get_args(annotation))]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return ["enum", annotation.__name__, [member.value for member in annotation]]
    if annotation is Any:
        return "any"
    if annotation is type(None):
        return "none"
    if annotation in (bool, int, float, str, dict, list):
        return annotation.__name__
    if getattr(annotation, "__name__", None) in ("DatasetConfig", MixtureEntry.__name__):
        return "mixture_entry"
    return ["object", getattr(annotation, "__name__", str(annotation))]  # judged by its class's own constructor


def _decode(table: dict[str, Any]) -> KeyTable:
    named: dict[str, type] = {}  # one class a name, so equal annotations stay equal
    keys = {entry["name"]: Key(entry["name"], entry["owner"], _decode_type(entry["type"], named), entry["default"])
            for entry in table["keys"]}
    return KeyTable(keys, frozenset(table["mixture_entry_keys"]))


_NAMES = {"any": Any, "none": type(None), "bool": bool, "int": int, "float": float, "str": str, "dict": dict,
          "list": list, "mixture_entry": MixtureEntry}


def _decode_type(encoded: Any, named: dict[str, type]) -> Any:
    if isinstance(encoded, str):
        return _NAMES[encoded]
    kind, *rest = encoded
    if kind == "union":
        return typing.Union[tuple(_decode_type(arg, named) for arg in rest[0])]  # noqa: UP007 (built from a list)
    if kind == "literal":
        return typing.Literal[tuple(rest[0])]
    if kind == "list":
        return list[_decode_type(rest[0], named)]
    if kind == "dict":
        return dict[_decode_type(rest[0], named), _decode_type(rest[1], named)]
    if kind == "enum":
        name, values = rest
        return named.setdefault(name, enum.Enum(name, [(str(value), value) for value in values]))
    if kind == "object":
        return named.setdefault(rest[0], type(rest[0], (), {}))
    raise KeyError(kind)
