"""Numbers a key cannot mean are refused when the recipe is read, one table for every numeric key: a number of the
right type (max_length: -5, seed: -1, learning_rate: .nan) would otherwise train, or fail far from the recipe."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest

from sftkit.errors import SftkitError
from sftkit.recipe import BOUNDS, read_recipe
from sftkit.setup.resolve import RECIPE_CLASSES
from sftkit.values import Bound, parse_overrides

BASE = "model_name_or_path: embedded:tiny-qwen2\ndataset_name: embedded:infinity-instruct-sample\n"


def numeric_keys() -> dict[str, tuple[type, ...]]:
    """Every key of TRL's classes and sftkit's whose type takes a number, with the number types it takes."""
    keys: dict[str, tuple[type, ...]] = {}
    for cls in RECIPE_CLASSES:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            annotation = hints[field.name]
            members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
                else (annotation,)
            if field.init and field.name not in keys and (numbers := tuple(m for m in members if m in (int, float))):
                keys[field.name] = numbers
    return keys


def defaults() -> dict[str, object]:
    return {field.name: field.default for cls in RECIPE_CLASSES for field in dataclasses.fields(cls)}


def nonsense(bound: Bound, numbers: tuple[type, ...]) -> list[object]:
    """Numbers of the key's type just outside its bound, and NaN and infinity where it takes floats."""
    number = int if int in numbers else float
    values = [bound.low if bound.low_open else bound.low - 1]
    if bound.high != math.inf:
        values.append(bound.high if bound.high_open else bound.high + 1)
    values = [number(value) for value in values if value not in bound.also]
    if float in numbers:
        values += [math.nan, math.inf, -math.inf]
    return values


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE)
    return str(path)


def test_every_numeric_key_has_a_bound():
    """A numeric key TRL adds in a new version fails here until it gets a bound."""
    assert set(numeric_keys()) == set(BOUNDS)


@pytest.mark.parametrize("key", sorted(numeric_keys()))
def test_nonsense_numbers_are_refused_and_the_default_is_not(recipe, key):
    numbers, bound = numeric_keys()[key], BOUNDS[key]
    for value in nonsense(bound, numbers):
        with pytest.raises(SftkitError, match=f"^command line: {key} must be .*{bound.describe()[:8]}.*, got "):
            read_recipe(recipe, {key: value})
    default = defaults()[key]
    assert default is None or bound.admits(default), f"{key}: TRL's default {default!r} is out of its bound"


@pytest.mark.parametrize("line, says", [
    ("per_device_train_batch_size: 0", "per_device_train_batch_size must be at least 1, got 0"),
    ("per_device_eval_batch_size: -2", "per_device_eval_batch_size must be at least 1, got -2"),
    ("global_batch_size: 0", "global_batch_size must be at least 1, got 0"),
    ("seed: -1", "seed must be at least 0 and at most 4,294,967,295, got -1"),
    ("seed: 4294967296", "seed must be at least 0 and at most 4,294,967,295, got 4294967296"),
    ("data_seed: -1", "data_seed must be at least 0"),
    ("learning_rate: .nan", "learning_rate must be a finite number above 0, got nan"),
    ("learning_rate: nan", "learning_rate must be a finite number above 0, got 'nan'"),
    ("num_train_epochs: .nan", "num_train_epochs must be a finite number at least 0, got nan"),
    ("max_length: -5", "max_length must be at least 1, got -5"),
    ("render_check_rows: -1", "render_check_rows must be at least 0, got -1"),
    ("max_steps: 0", r"max_steps must be at least 1, or -1 \(train num_train_epochs\), got 0"),
    ("pad_to_multiple_of: eight", "pad_to_multiple_of must be at least 1, or 'auto'"),
])
def test_the_issues_cases_name_the_file_the_key_and_the_range(recipe, line, says):
    with open(recipe, "a") as file:
        file.write(line + "\n")
    with pytest.raises(SftkitError, match=f"^recipe {recipe}: {says}"):
        read_recipe(recipe)


def test_what_a_number_may_also_mean_is_accepted(recipe):
    values = read_recipe(recipe, parse_overrides(["--max_steps", "-1", "--pad_to_multiple_of", "auto",
                                                  "--render_check_rows", "0", "--seed", str(2**32 - 1)])).values
    assert (values["max_steps"], values["pad_to_multiple_of"], values["render_check_rows"]) == (-1, "auto", 0)
