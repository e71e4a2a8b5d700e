"""The ``sftkit`` command: one subcommand a job, each with its own ``--help``; recipe keys as ``--key value``.

Commands that read a recipe take ``--config FILE`` and any recipe key as ``--key value`` (or
``--key=value``; a bare ``--flag`` means true), which overrides the file. ``sftkit --config FILE``
without a command trains, as ``python -m sftkit`` and ``accelerate launch -m sftkit`` do.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from sftkit import __version__
from sftkit.contract import DEBUG_ENV
from sftkit.errors import SftkitError, StoppedBySignal
from sftkit.values import parse_overrides

RECIPE_KEYS = "Any recipe key can follow as --key value (or --key=value; a bare --flag means true): it overrides the file."



def _setup_logging() -> None:
    # TRL's own default (gradient_checkpointing=True) trips this transformers deprecation on every run.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(format="sftkit: %(message)s", level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("sftkit").setLevel(logging.INFO if main_process else logging.WARNING)
    # sftkit tokenizes whole rows and applies max_length itself; the tokenizer's length warning is noise here.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


# The recipe reader's bound (sftkit.recipe.MAX_RECIPE_BYTES, which imports TRL): a larger file is the reader's to refuse.
ENVIRONMENT_READ_BYTES = 256 * 1024


def _environment_first(config: str | None) -> None:
    """Set the recipe's env: variables before transformers, datasets and the Hub client are imported, since some
    (HF_HOME, HF_HUB_OFFLINE, ...) are read at import. Resolving the recipe checks them again with the rest. A file
    this read cannot take (too large, not UTF-8, not YAML, a variable no environment can hold) is the recipe
    reader's to report, with the file's name; and like the reader this read runs no code (a safe loader)."""
    if not config or not os.path.isfile(config):
        return
    import yaml

    try:
        with open(config, "rb") as file:
            raw = file.read(ENVIRONMENT_READ_BYTES + 1)
        values = None if len(raw) > ENVIRONMENT_READ_BYTES else yaml.safe_load(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return
    environment = values.get("env") if isinstance(values, dict) else None
    if isinstance(environment, dict):
        for name, value in environment.items():
            if isinstance(value, (str, int, float)):  # a list or a mapping is the reader's to refuse
                try:
                    os.environ[str(name)] = str(value)
                except (ValueError, OSError):  # "=" or a NUL byte in it, or no name: the reader names the variable
                    continue


def _recipe(options: argparse.Namespace) -> Any:
    from sftkit.setup.resolve import load_recipe

    return load_recipe(options.config, parse_overrides(options.overrides))


def _train(options: argparse.Namespace) -> None:
    from sftkit.jobs.train import train

    train(_recipe(options))


def _check(options: argparse.Namespace) -> None:
    from sftkit.jobs.check import check

    colour = not options.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    check(_recipe(options), options.rows, colour)


def _adapters(options: argparse.Namespace) -> None:
    from sftkit.plugins import describe_adapters

    print(describe_adapters())


def _chat(options: argparse.Namespace) -> None:
    from transformers.utils import logging as transformers_logging

    from sftkit.outputs.chat import chat

    transformers_logging.disable_progress_bar()  # loading bars would scroll the conversation away
    chat(options.model, options.prompt, options.system, options.max_new_tokens)


def _merge(options: argparse.Namespace) -> None:
    from transformers.utils import logging as transformers_logging

    from sftkit.outputs.merge import merge

    transformers_logging.disable_progress_bar()
    output = merge(options.adapter, options.output)
    print(f"sftkit: {options.adapter} merged into its base: {output} holds the full model (sftkit chat {output} "
          "talks to it)")


def _plot(options: argparse.Namespace) -> None:
    from sftkit.outputs.plot import describe, plot_runs

    runs = plot_runs(options.directories, options.output)
    print(f"sftkit: loss curves of {len(runs)} run{'s' if len(runs) > 1 else ''} drawn in {options.output}")
    for directory, run in zip(options.directories, runs, strict=True):
        print(f"  {directory}: {describe(run)}")


def _export(options: argparse.Namespace) -> None:
    from sftkit.export.job import export

    exported = export(options.model, options.to, options.output, options.type)
    print(f"sftkit: {options.model} exported for {exported.target} ({exported.type_name}) in {exported.output}: "
          f"{len(exported.checks)} checks passed, report in {exported.report}")
    for check in exported.checks:
        print(f"  {check.name}: {check.detail}")
    for note in exported.notes:
        print(f"  not run: {note}")
    print("run it:")
    for command in exported.commands:
        print(f"  {command}")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of tokens above 0, got {text!r}")
    return int(text)


def _output_commands(commands: Any) -> None:
    """chat, merge, plot and export: what to do with a trained model and its history."""
    chat = commands.add_parser(
        "chat", help="talk to a trained model: a run's output_dir, a checkpoint, or a LoRA adapter on its base",
        description="Talk to a trained model through the chat template it was trained with, its answers streamed as "
                    "they are generated. With --prompt: one answer, then exit. Without: a conversation in the "
                    "terminal (/reset starts over, /exit or Ctrl-D quits).")
    chat.add_argument("model", metavar="MODEL", help="a run's output_dir or checkpoint-* folder: a full model, or a "
                      "LoRA adapter (applied to the base model its adapter_config.json names)")
    chat.add_argument("--prompt", metavar="TEXT", help="answer this one message and exit")
    chat.add_argument("--system", metavar="TEXT", help="a system message to open the conversation with")
    chat.add_argument("--max-new-tokens", type=_positive, default=512, metavar="N",
                      help="the longest answer, in tokens (default 512)")
    chat.set_defaults(run=_chat)
    merge = commands.add_parser(
        "merge", help="merge a LoRA adapter into its base model, saved as a full model",
        description="Merge a LoRA run's adapter into its base model and save a full model that loads with "
                    "AutoModelForCausalLM alone: safetensors weights, the tokenizer and its chat template, and a "
                    "generation config that stops at the end of the assistant's turn.")
    merge.add_argument("adapter", metavar="ADAPTER_DIR", help="the output_dir (or a checkpoint) of a run with "
                       "use_peft: true")
    merge.add_argument("-o", "--output", required=True, metavar="OUT", help="a new directory for the merged model")
    merge.set_defaults(run=_merge)
    plot = commands.add_parser(
        "plot", help="draw the loss curves of one or more runs on one figure",
        description="Draw train loss, held-out loss and learning rate against step (and the losses against tokens "
                    "seen) of one or more runs on one figure, each run labelled by what differs between their run "
                    "records (sftkit_run.yaml). A run that stopped early is drawn from its latest checkpoint.")
    plot.add_argument("directories", nargs="+", metavar="DIR", help="a run's output_dir")
    plot.add_argument("-o", "--output", default="loss.png", metavar="FILE", help="the picture (PNG; default "
                      "loss.png)")
    plot.set_defaults(run=_plot)
    export = commands.add_parser(
        "export", help="write a trained model for llama.cpp (GGUF), Ollama or vLLM, and prove it answers the same",
        description="Write a run's model (a LoRA run merged into its base first) as a GGUF file for llama.cpp, a GGUF "
                    "file and Modelfile for Ollama, or a Hugging Face folder for vLLM, with its tokenizer, chat "
                    "template and stop tokens; then read it back with transformers (and llama.cpp, where "
                    "llama-cpp-python is installed) and compare prompts, token ids, logits and greedy answers with "
                    "the trained model on the run's held-out prompts. OUT/export_report.md holds the checks and the "
                    "command that runs the model. GGUF needs pip install \"sftkit[export]\".")
    export.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="a run's output_dir or checkpoint-* folder: a "
                        "full model, or a LoRA adapter (merged into the base model its adapter_config.json names)")
    export.add_argument("--to", required=True, choices=("gguf", "ollama", "vllm"), help="gguf: one .gguf file for "
                        "llama.cpp; ollama: the .gguf file and a Modelfile; vllm: a Hugging Face folder")
    export.add_argument("-o", "--output", required=True, metavar="OUT", help="a new directory for what is written")
    export.add_argument("--type", choices=("f32", "f16", "bf16", "q8_0"), help="the type of the weights (default: "
                        "the type the model was saved in); q8_0 is GGUF's 8-bit quantisation")
    export.set_defaults(run=_export)


def _recipe_command(commands: Any, name: str, help: str, run: Callable) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=help, epilog=RECIPE_KEYS)
    parser.add_argument("--config", required=True, metavar="RECIPE.yaml", help="the recipe (configs/recipes/ has examples)")
    parser.set_defaults(run=run, takes_recipe_keys=True, sets_environment=True)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from sftkit.k8s import commands as cluster

    parser = argparse.ArgumentParser(
        prog="sftkit", allow_abbrev=False,
        description="Supervised fine-tuning of causal language models from one recipe file.",
        epilog="sftkit --config RECIPE.yaml (no command) trains. sftkit COMMAND --help says more. --debug (or "
               f"{DEBUG_ENV}=1), with any command: a plugin's exception stops sftkit with its traceback.")
    parser.add_argument("--version", action="version", version=f"sftkit {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _recipe_command(commands, "train", "fine-tune as the recipe says (also: python -m sftkit, accelerate launch -m "
                    "sftkit)", _train)
    check = _recipe_command(commands, "check", "show what would train (adapter, rows by outcome, lengths, marked "
                            "examples) without training; exit 1 if it would not start", _check)
    check.add_argument("--rows", type=int, default=2, metavar="N", help="examples to show (default 2)")
    check.add_argument("--no-color", action="store_true", help="mark trained tokens with [[ ]] instead of green")
    adapters = commands.add_parser("adapters", help="list the installed dataset adapters, their contract and options",
                                   description="List the installed dataset adapters: name, distribution, version, "
                                               "contract, and options.")
    adapters.set_defaults(run=_adapters)
    _output_commands(commands)
    k8s = commands.add_parser("k8s", help="Kubernetes: render the Kubeflow job that trains a recipe",
                              description="Kubernetes through Kubeflow Trainer (TrainJob) or the training operator "
                                          "(PyTorchJob). See docs/kubernetes.md.")
    k8s.set_defaults(run=lambda options: k8s.print_help())
    render = k8s.add_subparsers(title="commands", metavar="COMMAND").add_parser(
        "render", help="the ConfigMap and the job, as YAML for kubectl apply -f -", **cluster.RENDER)
    cluster.add_render_arguments(render)
    render.set_defaults(run=cluster.run_render, takes_recipe_keys=True)
    launch = commands.add_parser("launch", help="start this machine's share of a job (a pod, a SLURM node, one "
                                 "machine) with accelerate", **cluster.LAUNCH)
    cluster.add_launch_arguments(launch)
    launch.set_defaults(run=cluster.run_launch, takes_recipe_keys=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in arguments:  # any command, anywhere on the line; the variable reaches launched processes too
        at = arguments.index("--debug")
        if at + 1 == len(arguments) or arguments[at + 1].startswith("--"):  # else the recipe key debug, with a value
            arguments.pop(at)
            os.environ[DEBUG_ENV] = "1"
    if arguments and arguments[0].startswith("--") and arguments[0] not in ("--help", "--version"):
        arguments.insert(0, "train")  # sftkit --config RECIPE.yaml, python -m sftkit, accelerate launch -m sftkit
    parser = build_parser()
    options, rest = parser.parse_known_args(arguments)
    if not hasattr(options, "run"):
        parser.print_help()
        return 0 if not arguments else 2
    if rest and not getattr(options, "takes_recipe_keys", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    options.overrides = rest
    _setup_logging()
    if getattr(options, "sets_environment", False):
        _environment_first(options.config)
    try:
        options.run(options)
        return 0
    except StoppedBySignal as stopped:
        if os.environ.get("RANK", "0") == "0":
            print(f"sftkit: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except SftkitError as error:
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"sftkit: error{rank}: {error}", file=sys.stderr)
        return 1 if options.run is _check else 2
