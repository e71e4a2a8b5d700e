"""The recipe: a strict YAML file of TRL's flat keys plus sftkit's own, resolved into TRL's dataclasses.

TRL's own parser ignores a misspelled key and trains with the default. Here every key is checked
against the fields of ``ScriptArguments``, ``SFTConfig``, ``ModelConfig`` and
``DatasetMixtureConfig`` (and sftkit's ``SftkitArguments``), every value against its field's type,
and keys that only make sense together are checked together, all before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig
from trl.scripts.utils import DatasetConfig

from sftkit.errors import SftkitError
from sftkit.hardware import bf16_supported, gpu_count, gpu_memory, has_accelerator
from sftkit.train.launcher import reconcile_launcher
from sftkit.train.speed import resolve_speed


@dataclass
class SftkitArguments:
    """sftkit's own recipe keys, beside TRL's."""

    dataset_format: str = field(default="auto", metadata={"help": "adapter name, or auto to detect from the data"})
    dataset_options: dict = field(default_factory=dict, metadata={"help": "options passed to the adapter"})
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "rows per optimizer step over all processes; derives gradient_accumulation_steps"},
    )
    render_check_rows: int = field(
        default=64, metadata={"help": "how many examples the render guard renders and checks before training"}
    )
    on_invalid: typing.Literal["error", "skip"] = field(
        default="error", metadata={"help": "what an invalid row does: stop the run before step 1, or be skipped"}
    )
    max_invalid_fraction: float = field(
        default=0.1, metadata={"help": "with on_invalid: skip, the most rows that may be skipped before the run stops"}
    )
    prepare: typing.Literal["auto", "eager", "lazy"] = field(
        default="auto",
        metadata={"help": "prepare every row before step 1 (cached), or each row when the trainer draws it; auto: "
                  "lazy when max_steps reads less than the dataset"},
    )
    long_rows: typing.Literal["truncate", "skip"] = field(
        default="truncate", metadata={"help": "rows longer than max_length: cut to max_length, or skip as invalid"}
    )
    lm_head_loss: typing.Literal["auto", "trl", "torch", "cce", "liger"] = field(
        default="auto",
        metadata={"help": "what computes the training loss from the hidden states, never building the logits: TRL's "
                  "fused head (logs entropy and token accuracy too), torch's chunked linear_cross_entropy, "
                  "cut-cross-entropy or Liger's kernel; auto: the first of torch, cce, liger that runs on a GPU, "
                  "else trl"},
    )
    fixed_batch_shape: bool | None = field(
        default=None,
        metadata={"help": "pad every batch to per_device_train_batch_size x max_length tokens, so torch.compile "
                  "compiles once instead of once per shape; unset: on with torch_compile"},
    )


RECIPE_CLASSES = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, SftkitArguments)

# TRL keys sftkit does not honour, with why and what to do instead: accepting them would train something else than
# the recipe says. Keys that are honoured only for some values are checked in _check_together.
REJECTED_KEYS = {
    "dataset_streaming": "streaming datasets are not read yet: the dataset is downloaded and prepared (lazily, for a "
                         "bounded run); remove the key",
    "streaming": "streaming datasets are not read yet: the mixture is downloaded and prepared (lazily, for a bounded "
                 "run); remove the key",
    "dataset_text_field": "sftkit reads text through the text adapter: set dataset_format: text and dataset_options: "
                          "{text_column: NAME}",
    "dataset_kwargs": "sftkit prepares the data itself (adapters, the row chain), so TRL's preparation options have "
                      "nothing to act on; remove the key",
    "ignore_bias_buffers": "TRL's DPO script option for models with boolean buffers; a sftkit run has none to ignore; "
                           "remove the key",
}
# Environment variables libraries read once, when they are imported: a recipe's env: sets them too late unless it is
# applied before those imports (the sftkit command does so).
IMPORT_TIME_ENV = {
    "HF_HOME": "huggingface_hub", "HF_HUB_CACHE": "huggingface_hub", "HF_HUB_OFFLINE": "huggingface_hub",
    "HF_ENDPOINT": "huggingface_hub", "HF_DATASETS_CACHE": "datasets", "HF_DATASETS_OFFLINE": "datasets",
    "TRANSFORMERS_CACHE": "transformers", "TRANSFORMERS_OFFLINE": "transformers",
}


@dataclass
class Recipe:
    """A validated recipe: TRL's argument objects, sftkit's, and the resolved keys to record."""

    script: ScriptArguments
    training: SFTConfig
    model: ModelConfig
    mixture: DatasetMixtureConfig
    sftkit: SftkitArguments
    values: dict[str, Any]  # every key the recipe set, after overrides, plus derived values
    source: str
    notes: list[str]  # what sftkit decided on the user's behalf, for the log
    entry_adapters: list[tuple[str, dict]]  # per datasets: entry, its dataset_format and dataset_options


def _recipe_fields() -> dict[str, tuple[type, Any]]:
    """Every accepted key -> (owning dataclass, type annotation)."""
    known: dict[str, tuple[type, Any]] = {}
    for cls in RECIPE_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                known.setdefault(f.name, (cls, hints[f.name]))
    return known


# ---------------------------------------------------------------- reading the file and the command line


def parse_overrides(arguments: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split ``--config FILE`` / ``--config=FILE`` from ``--key value`` overrides (``--flag`` alone means true)."""
    config: str | None = None
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(arguments):
        token = arguments[index]
        if not token.startswith("--") or token == "--":
            raise SftkitError(f"unexpected argument {token!r}: options are written --key value or --key=value")
        key, has_value, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not has_value:
            next_is_value = index + 1 < len(arguments) and not arguments[index + 1].startswith("--")
            value = arguments[index + 1] if next_is_value else "true"
            index += 1 if next_is_value else 0
        index += 1
        if key == "config":
            config = value
        else:
            overrides[key] = CommandLineValue(value)
    return config, overrides


class CommandLineValue(str):
    """A value typed on the command line: kept as text for text fields, parsed as YAML for the others."""


def read_recipe_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise SftkitError(f"recipe {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise SftkitError(f"recipe {path}: not valid YAML:\n{error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SftkitError(f"recipe {path}: the top level must be a mapping of key: value, got {type(values).__name__}")
    return values


# ---------------------------------------------------------------- types


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    names = {bool: "true/false", int: "integer", float: "number", str: "string", dict: "mapping", list: "list"}
    origin = typing.get_origin(annotation) or annotation
    if origin is list and typing.get_args(annotation):
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    return names.get(origin, getattr(origin, "__name__", str(origin)))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, annotation: Any) -> Any:
    """Return ``value`` as ``annotation`` wants it, or raise _Mismatch. Never guesses across kinds."""
    if isinstance(value, CommandLineValue):
        if annotation is str or (isinstance(annotation, type) and issubclass(annotation, enum.Enum)):
            return _coerce(str(value), annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            for arg in typing.get_args(annotation):
                try:
                    return _coerce(value, arg)
                except _Mismatch:
                    continue
            raise _Mismatch
        return _coerce(yaml.safe_load(value), annotation)
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise _Mismatch
    if annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as text
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if value in {member.value for member in annotation}:
            return value
        raise _Mismatch
    if origin is list or annotation is list:
        (item_type,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, list):
            return [_coerce(item, item_type) for item in value]
        raise _Mismatch
    if origin is dict or annotation is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if annotation is DatasetConfig:
        if not isinstance(value, dict):
            raise _Mismatch
        return value  # checked key by key in _check_mixture
    return value  # library objects (e.g. ParallelismConfig): let their own constructors judge


def _closest(key: str, candidates: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


ENTRY_ADAPTER_KEYS = ("dataset_format", "dataset_options")


def _check_mixture(entries: list[dict[str, Any]], source: str) -> None:
    known = {f.name for f in dataclasses.fields(DatasetConfig)} | set(ENTRY_ADAPTER_KEYS)
    for position, entry in enumerate(entries):
        for key in entry:
            if key not in known:
                raise SftkitError(
                    f"recipe {source}: datasets[{position}] has unknown key {key!r}{_closest(key, known)} "
                    f"(accepted: {', '.join(sorted(known))})"
                )
        if "path" not in entry:
            raise SftkitError(f"recipe {source}: datasets[{position}] needs a 'path'")
        if not isinstance(entry.get("dataset_format", ""), str) or not isinstance(entry.get("dataset_options", {}), dict):
            raise SftkitError(
                f"recipe {source}: datasets[{position}]: dataset_format must be a string and dataset_options a mapping"
            )


def _split_entry_adapters(values: dict[str, Any]) -> tuple[list[tuple[str, dict]], list[dict[str, Any]]]:
    """Each mixture entry's adapter settings, and the entries without them, as TRL's DatasetConfig wants them."""
    adapters, entries = [], []
    for entry in values.get("datasets", []):
        dataset_format = entry.get("dataset_format", values.get("dataset_format", "auto"))
        adapters.append((dataset_format, entry.get("dataset_options", values.get("dataset_options", {}))))
        entries.append({key: value for key, value in entry.items() if key not in ENTRY_ADAPTER_KEYS})
    return adapters, entries


# ---------------------------------------------------------------- keys that go together


OPTIONAL_PACKAGES = {
    "use_peft": ("peft", "pip install 'sftkit[peft]'"),
    "load_in_4bit": ("bitsandbytes", "pip install bitsandbytes"),
    "load_in_8bit": ("bitsandbytes", "pip install bitsandbytes"),
}


def _check_together(values: dict[str, Any], source: str) -> None:
    def fail(message: str) -> typing.NoReturn:
        raise SftkitError(f"recipe {source}: {message}")

    lora_keys = sorted(key for key in values if key.startswith("lora_") or key in ("use_rslora", "use_dora"))
    if lora_keys and not values.get("use_peft"):
        fail(f"{', '.join(lora_keys)} only take effect with use_peft: true; add it or remove them")
    for key, (package, install) in OPTIONAL_PACKAGES.items():
        if values.get(key) and importlib.util.find_spec(package) is None:
            fail(f"{key}: true needs the {package} package, which is not installed: {install}")
    if values.get("load_in_4bit") and values.get("load_in_8bit"):
        fail("load_in_4bit and load_in_8bit are both true; choose one")
    if values.get("bf16") and values.get("fp16"):
        fail("bf16 and fp16 are both true; choose one")
    if values.get("global_batch_size") is not None and "gradient_accumulation_steps" in values:
        fail(
            "global_batch_size and gradient_accumulation_steps are both set; global_batch_size derives "
            "gradient_accumulation_steps, so remove one of them"
        )
    if values.get("dataset_config") is not None and not values.get("dataset_name"):
        fail("dataset_config is set but dataset_name is not; dataset_config names a configuration of dataset_name")
    if values.get("datasets") and values.get("dataset_name"):
        fail("both datasets (a mixture) and dataset_name are set; use one of them")
    if not values.get("datasets") and not values.get("dataset_name"):
        fail("no data: set dataset_name (a Hub name, a local directory, a file or a glob) or datasets (a mixture)")
    if not values.get("model_name_or_path"):
        fail("model_name_or_path is required (a Hub model id or a local directory)")
    if values.get("packing") and "max_length" in values and values["max_length"] is None:
        fail("packing needs max_length (the length of a packed row); set it, or remove packing")
    if values.get("packing_strategy") and not values.get("packing"):
        fail("packing_strategy is set but packing is not enabled; add packing: true or remove packing_strategy")
    if values.get("do_train") is False:
        fail("do_train: false, but sftkit train always trains; run sftkit check to prepare and see the data without "
             "training, and remove the key")
    if values.get("do_predict"):
        fail("do_predict: sftkit does not run predictions after training; remove the key")
    if values.get("max_steps", -1) <= 0 and values.get("num_train_epochs", 1) <= 0:
        fail("the run would train nothing: set max_steps > 0 or num_train_epochs > 0")
    size = values.get("test_split_size")
    if size and not 0 < size < 1 and not (size >= 1 and float(size).is_integer()):
        fail(f"test_split_size must be a fraction between 0 and 1 or a whole number of rows, got {size}")


# ---------------------------------------------------------------- derived values


def number_of_processes() -> int:
    """Processes in this launch, from the variables every launcher (accelerate, torchrun, Kubeflow) sets."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def derive_gradient_accumulation(global_batch: int, per_device: int, processes: int, source: str) -> int:
    """global = per_device x processes x accumulation; anything else is an error with the nearest valid values."""
    rows_per_pass = per_device * processes
    if global_batch <= 0 or global_batch % rows_per_pass:
        lower = max(rows_per_pass, global_batch // rows_per_pass * rows_per_pass)
        upper = (global_batch // rows_per_pass + 1) * rows_per_pass
        per_device_options = [size for size in range(1, global_batch + 1) if global_batch % (size * processes) == 0]
        suggestion = f"global_batch_size: {lower} or {upper}"
        if per_device_options:
            suggestion += f", or per_device_train_batch_size one of {per_device_options[-6:]}"
        raise SftkitError(
            f"recipe {source}: global_batch_size {global_batch} is not a multiple of per_device_train_batch_size "
            f"{per_device} x {processes} process(es) = {rows_per_pass}. Use {suggestion}."
        )
    return global_batch // rows_per_pass


def resolve_device(values: dict[str, Any], notes: list[str], source: str) -> None:
    """On a machine without an accelerator, train on the CPU, with several processes as gloo DDP. Several GPUs
    without a launcher would run nn.DataParallel in one process, which sftkit's batch arithmetic does not describe:
    that stops with the command that uses them all."""
    if "use_cpu" not in values and not has_accelerator():
        values["use_cpu"] = True
        notes.append("device: CPU (no GPU found; several processes would run DDP over gloo)")
    gpus = gpu_count()
    if gpus > 1 and "WORLD_SIZE" not in os.environ and not values.get("use_cpu"):
        raise SftkitError(
            f"this machine has {gpus} GPUs and no launcher started this run, which would train on them as one process "
            "(nn.DataParallel) with another batch than the recipe says. Start it with\n"
            f"  accelerate launch --multi_gpu --num_processes {gpus} -m sftkit --config {source}\n"
            "or choose one GPU with CUDA_VISIBLE_DEVICES=0."
        )


def resolve_precision(values: dict[str, Any], notes: list[str], source: str) -> None:
    """bf16 mixed precision where the hardware has it, else fp32; explicit settings win; the launcher never does."""
    import torch

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if "bf16" in values or "fp16" in values:
        chosen = "bf16" if values.get("bf16") else "fp16" if values.get("fp16") else "no"
        reason = "as the recipe says"
        if chosen == "fp16" and not torch.cuda.is_available():
            raise SftkitError(f"recipe {source}: fp16: true needs a CUDA GPU; on this machine leave precision unset")
    else:
        on_cpu = values.get("use_cpu", False)
        chosen = "bf16" if bf16_supported() and not on_cpu else "no"
        reason = "the hardware supports bf16" if chosen == "bf16" else "no bf16-capable GPU"
    values["bf16"], values["fp16"] = chosen == "bf16", chosen == "fp16"
    if launcher is not None and launcher != chosen:
        notes.append(
            f"the launcher asked for mixed_precision={launcher}; the recipe decides precision, so it is ignored "
            "(set bf16 or fp16 in the recipe to change it)"
        )
    # transformers falls back on the launcher's setting when bf16 and fp16 are both false: pin it.
    os.environ["ACCELERATE_MIXED_PRECISION"] = chosen
    label = {"bf16": "bf16 mixed precision (fp32 master weights)", "fp16": "fp16 mixed precision", "no": "fp32"}
    notes.append(f"precision: {label[chosen]} ({reason}); weights loaded as {values.get('dtype', 'float32')}")


# ---------------------------------------------------------------- putting it together


def apply_environment(environment: Any, source: str) -> None:
    """Set the recipe's ``env:`` variables; one that a library already read at import time is an error, not a no-op."""
    if not isinstance(environment, dict):
        raise SftkitError(f"recipe {source}: env must be a mapping of VARIABLE: value")
    for name, value in environment.items():
        name, value = str(name), str(value)
        library = IMPORT_TIME_ENV.get(name)
        if library in sys.modules and os.environ.get(name) != value:
            raise SftkitError(
                f"recipe {source}: env: {name} is read by {library} when it is imported, which happened before this "
                f"recipe was loaded, so it would have no effect. Run through the sftkit command (it sets env: first), "
                f"or set {name} in the environment before starting."
            )
        os.environ[name] = value


def resolve_resume(values: dict[str, Any], source: str) -> str | None:
    """``resume_from_checkpoint``: true means the latest checkpoint in output_dir, a path must be a checkpoint; both
    checked before any data work."""
    from transformers.trainer_utils import get_last_checkpoint

    asked = values["resume_from_checkpoint"]
    if asked in (False, None, "false", "False"):
        return None
    output_dir = str(values.get("output_dir") or SFTConfig.output_dir or "trainer_output")
    if asked in (True, "true", "True"):
        latest = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if latest is None:
            raise SftkitError(f"recipe {source}: resume_from_checkpoint: true, but output_dir {output_dir} holds no "
                              "checkpoint-N folder to resume from; remove the key to start fresh")
        return latest
    if not isinstance(asked, str) or not (Path(asked) / "trainer_state.json").is_file():
        raise SftkitError(f"recipe {source}: resume_from_checkpoint {asked!r} is not a checkpoint (a checkpoint-N "
                          f"folder with a trainer_state.json); use true for the latest one in output_dir")
    return asked


def load_recipe(path: str | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, check and resolve a recipe file with command-line overrides on top."""
    source = path or "<command line>"
    values = read_recipe_file(path) if path else {}
    values.update(overrides or {})

    apply_environment(values.pop("env", None) or {}, source)

    known = _recipe_fields()
    for key in values:
        if key in REJECTED_KEYS:
            raise SftkitError(f"recipe {source}: {key}: {REJECTED_KEYS[key]}")
        if key not in known:
            raise SftkitError(f"recipe {source}: unknown key {key!r}{_closest(key, known)}")
    if "resume_from_checkpoint" in values:
        values["resume_from_checkpoint"] = resolve_resume(values, source)
    for key, value in list(values.items()):
        annotation = known[key][1]
        try:
            values[key] = _coerce(value, annotation)
        except _Mismatch:
            shown = str(value) if isinstance(value, CommandLineValue) else repr(value)
            hint = " (quote it: '0625', not 0625, which YAML reads as a number)" if annotation in (str, str | None) else ""
            raise SftkitError(
                f"recipe {source}: {key} must be {_type_name(annotation)}, got {shown}{hint}"
            ) from None
    _check_mixture(values.get("datasets", []), source)
    _check_together(values, source)
    entry_adapters, entries = _split_entry_adapters(values)

    notes: list[str] = []
    resolve_device(values, notes, source)
    resolve_precision(values, notes, source)
    resolve_speed(values, notes, gpu_memory())
    if values.get("global_batch_size") is not None:
        per_device = values.get("per_device_train_batch_size", SFTConfig.per_device_train_batch_size)
        processes = number_of_processes()
        values["gradient_accumulation_steps"] = derive_gradient_accumulation(
            values["global_batch_size"], per_device, processes, source
        )
        notes.append(
            f"global_batch_size {values['global_batch_size']} = {per_device} per device x {processes} process(es) "
            f"x {values['gradient_accumulation_steps']} accumulation step(s)"
        )

    per_device = values.get("per_device_train_batch_size", SFTConfig.per_device_train_batch_size)
    accumulation = values.get("gradient_accumulation_steps", SFTConfig.gradient_accumulation_steps)
    adjusted = reconcile_launcher(values, per_device, accumulation, number_of_processes(), notes, source)

    built = {}
    for cls in RECIPE_CLASSES:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        arguments = {key: value for key, value in {**values, **adjusted}.items() if key in names}
        if cls is DatasetMixtureConfig and entries:
            arguments["datasets"] = entries
        try:
            built[cls] = cls(**arguments)
        except (ValueError, TypeError) as error:
            raise SftkitError(f"recipe {source} with this launcher's settings: {error}") from None
    return Recipe(
        script=built[ScriptArguments],
        training=built[SFTConfig],
        model=built[ModelConfig],
        mixture=built[DatasetMixtureConfig],
        sftkit=built[SftkitArguments],
        values=values,
        source=source,
        notes=notes,
        entry_adapters=entry_adapters,
    )
