"""The ``sftkit`` command: ``train`` (the default), ``check``, ``adapters``, ``k8s render`` and ``launch``."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

from sftkit.errors import SftkitError

USAGE = """\
usage: sftkit [train] --config RECIPE.yaml [--key value ...]
       sftkit check --config RECIPE.yaml [--rows N] [--no-color] [--key value ...]
       sftkit adapters
       sftkit k8s render --config RECIPE.yaml --nodes N --gpus-per-node G --image IMAGE [options]
       sftkit launch --config RECIPE.yaml [--accelerate-config FILE] [--key value ...]

  train       fine-tune as the recipe says (also: python -m sftkit, accelerate launch -m sftkit)
  check       validate the recipe and data and show what would train, without training
  adapters    list the installed dataset adapters and their options
  k8s render  the Kubeflow job (TrainJob or PyTorchJob) and ConfigMap that train the recipe on a cluster
  launch      start this machine's share of a job (Kubernetes pod, SLURM node or one machine) with accelerate

Any recipe key can be given as --key value; it overrides the file.
"""


def _setup_logging() -> None:
    # TRL's own default (gradient_checkpointing=True) trips this transformers deprecation on every run.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(format="sftkit: %(message)s", level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("sftkit").setLevel(logging.INFO if main_process else logging.WARNING)
    # sftkit tokenizes whole rows and applies max_length itself; the tokenizer's length warning is noise here.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


def _adapters() -> str:
    from sftkit import plugins

    registry = plugins.registry()
    lines = []
    for name, installed in sorted(registry.adapters.items()):
        adapter = installed.adapter
        lines.append(f"{name:<20} {installed.distribution} {installed.version}  {adapter.description}")
        for option, spec in adapter.options.items():
            choices = f"; one of {json.dumps(list(spec.choices))}" if spec.choices else ""
            lines.append(f"{'':<22}{option} (default {json.dumps(spec.default)}{choices}): {spec.help}")
    for distribution, error in registry.broken.items():
        lines.append(f"{'(failed to load)':<20} {distribution}: {error}")
    return "\n".join(lines)


def _check_options(arguments: list[str], rows: int, colour: bool) -> tuple[int, bool, list[str]]:
    """Take check's own --rows N and --no-color out of the recipe overrides."""
    remaining = []
    iterator = iter(arguments)
    for token in iterator:
        if token == "--no-color":
            colour = False
        elif token == "--rows" or token.startswith("--rows="):
            value = token.partition("=")[2] or next(iterator, "")
            if not value.isdigit():
                raise SftkitError(f"--rows takes a whole number, got {value!r}")
            rows = int(value)
        else:
            remaining.append(token)
    return rows, colour, remaining


def _environment_first(arguments: list[str]) -> None:
    """Set the recipe's env: variables before transformers, datasets and the Hub client are imported, since some
    (HF_HOME, HF_HUB_OFFLINE, ...) are read at import. The recipe loader checks them again with the rest."""
    config = next((token.partition("=")[2] or (arguments[i + 1] if i + 1 < len(arguments) else "")
                   for i, token in enumerate(arguments) if token == "--config" or token.startswith("--config=")), None)
    if not config or not os.path.isfile(config):
        return
    import yaml

    try:
        with open(config, encoding="utf-8") as file:
            values = yaml.safe_load(file)
    except yaml.YAMLError:
        return  # the recipe loader reports it, with the file's name
    environment = values.get("env") if isinstance(values, dict) else None
    if isinstance(environment, dict):
        for name, value in environment.items():
            os.environ[str(name)] = str(value)


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = "train"
    if arguments and not arguments[0].startswith("-"):
        command = arguments.pop(0)
    if command in ("k8s", "launch"):  # their own options, help and errors
        _setup_logging()
        from sftkit.k8s.commands import main as cluster_main

        return cluster_main(command, arguments)
    if command in ("help", "-h", "--help") or arguments[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    _setup_logging()
    _environment_first(arguments)
    try:
        if command == "adapters":
            print(_adapters())
            return 0
        if command not in ("train", "check"):
            raise SftkitError(f"unknown command {command!r}; commands are train, check, adapters, k8s and launch")

        from sftkit.recipe import load_recipe, parse_overrides

        rows, colour = 2, sys.stdout.isatty() and "NO_COLOR" not in os.environ
        if command == "check":
            rows, colour, arguments = _check_options(arguments, rows, colour)
        config, overrides = parse_overrides(arguments)
        if config is None:
            raise SftkitError("no recipe: give --config RECIPE.yaml (see configs/recipes/ for examples)")
        recipe = load_recipe(config, overrides)
        if command == "check":
            from sftkit.check import check

            check(recipe, rows, colour)
            return 0
        from sftkit.train.job import train

        train(recipe)
        return 0
    except SftkitError as error:
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"sftkit: error{rank}: {error}", file=sys.stderr)
        return 1 if command == "check" else 2
