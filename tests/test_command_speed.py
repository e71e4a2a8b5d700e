"""Commands that only read (``--help``, ``adapters``, ``plot``, ``k8s render``) answer at once: they import neither
torch nor transformers nor TRL, whose imports alone take seconds. TRL's recipe keys come from sftkit's cache of
them (``sftkit.recipe_keys``), which must say exactly what TRL's classes say."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest
from helpers import ROOT, TINY_MODEL, write_recipe

from sftkit import recipe_keys
from sftkit.recipe import known_keys, read_recipe, setting
from sftkit.values import Mismatch, coerce, type_name

HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


def heavy_imports(tmp_path, *arguments: str) -> list[str]:
    """The heavy libraries a fresh interpreter has imported after running ``sftkit ARGUMENTS``."""
    script = ("import sys\nfrom sftkit.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
              "except SystemExit as exit:  # --help\n    code = exit.code\n"
              f"print('IMPORTED', ' '.join(name for name in {HEAVY!r} if name in sys.modules))\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script, *arguments], check=False, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("IMPORTED"))
    return line.removeprefix("IMPORTED").split()


@pytest.fixture(scope="module")
def warm_keys() -> None:
    """TRL's keys in the cache, as any earlier sftkit command that imports TRL (train, check) leaves them."""
    recipe_keys.trl_keys()


def test_the_command_modules_import_no_heavy_library():
    modules = ["sftkit.cli", "sftkit.k8s.commands", "sftkit.k8s.render", "sftkit.k8s.bundle", "sftkit.k8s.resources",
               "sftkit.outputs.plot", "sftkit.plugins", "sftkit.recipe"]
    script = (f"import importlib, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
              "from sftkit.cli import build_parser\nbuild_parser()\n"
              f"print([name for name in {HEAVY!r} if name in sys.modules])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("arguments", [["--help"], ["adapters"], ["k8s", "render", "--help"]])
def test_help_and_the_adapter_list_import_no_heavy_library(tmp_path, arguments):
    assert heavy_imports(tmp_path, *arguments) == []


def test_rendering_a_recipe_imports_no_heavy_library(tmp_path, warm_keys):
    recipe = write_recipe(tmp_path / "recipe.yaml", model_name_or_path=TINY_MODEL,
                          dataset_name="embedded:infinity-instruct-sample", output_dir="/data/run")
    arguments = ["k8s", "render", "--config", str(recipe), "--nodes", "2", "--gpus-per-node", "8", "--image", "x:1",
                 "--volume", "runs:/data", "-o", str(tmp_path / "job.yaml")]
    assert heavy_imports(tmp_path, *arguments) == []
    assert (tmp_path / "job.yaml").read_text().count("kind: ") >= 2


def test_plotting_runs_imports_no_heavy_library(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    history = [{"step": step, "loss": 3.0 / step, "epoch": 0.1 * step} for step in range(1, 6)]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    pytest.importorskip("matplotlib")
    assert heavy_imports(tmp_path, "plot", str(run), "-o", str(tmp_path / "loss.png")) == []
    assert (tmp_path / "loss.png").stat().st_size > 0


# ---------------------------------------------------------------- the cached keys are TRL's


def test_the_cached_keys_are_trls_keys_with_their_types_and_defaults(tmp_path, monkeypatch):
    from sftkit.setup.resolve import RECIPE_CLASSES

    monkeypatch.setenv("SFTKIT_CACHE", str(tmp_path))
    recipe_keys.trl_keys.cache_clear()
    try:
        built = recipe_keys.trl_keys()  # read from the classes, and written
        assert list((tmp_path / "recipe-keys").glob("*.json"))
        recipe_keys.trl_keys.cache_clear()
        cached = recipe_keys.trl_keys()  # read back from the file
    finally:
        recipe_keys.trl_keys.cache_clear()
    assert {name: (key.owner, type_name(key.annotation), key.default) for name, key in cached.keys.items()} == {
        name: (key.owner, type_name(key.annotation), key.default) for name, key in built.keys.items()}
    assert cached.mixture_entry_keys == built.mixture_entry_keys
    live = {}
    for cls in RECIPE_CLASSES:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.init and field.name not in live:
                live[field.name] = (cls.__name__, hints[field.name], field)
    keys = {**cached.keys, **recipe_keys.keys_of(RECIPE_CLASSES[-1:])}
    assert keys.keys() == live.keys()
    for name, (owner, annotation, field) in live.items():
        key = keys[name]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert key.owner == owner, name
        # TRL's DatasetConfig is a datasets: entry, a mapping checked key by key
        assert type_name(key.annotation) == type_name(annotation).replace("DatasetConfig", "mapping"), name
        assert key.default == getattr(default, "value", default), name


@pytest.mark.parametrize(("key", "typed", "value"), [
    ("save_strategy", "no", "no"),  # an enum keeps text typed on the command line as text (YAML would read false)
    ("eval_strategy", "steps", "steps"),
    ("lr_scheduler_type", "cosine", "cosine"),
    ("optim", "adamw_torch", "adamw_torch"),
    ("max_length", "128", 128),
    ("dtype", "bfloat16", "bfloat16"),
])
def test_values_typed_on_the_command_line_read_as_trls_types_say(key, typed, value):
    from sftkit.values import CommandLineValue

    assert coerce(CommandLineValue(typed), known_keys()[key].annotation) == value


def test_an_enum_key_refuses_a_value_outside_it_and_names_the_choices():
    annotation = known_keys()["lr_scheduler_type"].annotation
    with pytest.raises(Mismatch):
        coerce(["linear"], annotation)
    assert "'cosine'" in type_name(annotation)


def test_a_damaged_cache_file_is_read_again_from_trls_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTKIT_CACHE", str(tmp_path))
    recipe_keys.trl_keys.cache_clear()
    try:
        recipe_keys.trl_keys()
        (cached,) = (tmp_path / "recipe-keys").glob("*.json")
        cached.write_text('{"keys": [{"name": "only_this"}]}')
        recipe_keys.trl_keys.cache_clear()
        assert "max_length" in recipe_keys.trl_keys().keys
        assert "max_length" in {entry["name"] for entry in json.loads(cached.read_text())["keys"]}  # rewritten
    finally:
        recipe_keys.trl_keys.cache_clear()


def test_an_unwritable_cache_still_reads_recipes(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SFTKIT_CACHE", str(blocked))
    recipe_keys.trl_keys.cache_clear()
    try:
        checked = read_recipe(str(ROOT / "configs" / "recipes" / "quickstart.yaml"))
    finally:
        recipe_keys.trl_keys.cache_clear()
    assert checked.values["max_steps"] == 200


def test_a_keys_default_is_a_fresh_copy():
    first = setting({}, "dataset_options")
    first["changed"] = True
    assert setting({}, "dataset_options") == {}
