"""The recipe: a strict YAML file of TRL's flat keys plus sftkit's own, read and checked without side effects.

TRL's own parser ignores a misspelled key and trains with the default. Here every key is checked
against the fields of ``ScriptArguments``, ``SFTConfig``, ``ModelConfig`` and
``DatasetMixtureConfig`` (and sftkit's ``SftkitArguments``), every value against its field's type
and every number against its key's bound (``BOUNDS``), and keys that only make sense together are checked together, all before anything is loaded.
Reading a recipe (``read_recipe``) touches nothing: no environment variable, no hardware probe, no
file written. ``sftkit.setup.resolve`` then settles what depends on the machine and the launcher, with
the pieces defined here: the keys' defaults (``setting``), the ``Decisions`` it takes and the
``BatchGeometry`` it derives.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import math
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sftkit.errors import SftkitError
from sftkit.recipe_keys import Key, keys_of, trl_keys
from sftkit.values import Bound, CommandLineValue, Mismatch, coerce, type_name

if TYPE_CHECKING:
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig


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
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "start over in an output_dir that holds another run (its checkpoints are removed); "
                  "otherwise such a run is refused unless it resumes"},
    )
    grad_norm_limit: float | None = field(
        default=None,
        metadata={"help": "stop the run when a step's gradient norm (before clipping) passes this; a NaN or "
                  "infinite loss or gradient stops it in any case"},
    )
    mixture: typing.Literal["under", "over"] = field(
        default="under",
        metadata={"help": "a mixture whose datasets entries set fraction (each source's share of the trained "
                  "tokens): under down-samples the larger sources, over repeats the smaller ones"},
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
    lm_head_loss: typing.Literal["auto", "trl", "torch", "cce", "liger", "logits"] = field(
        default="auto",
        metadata={"help": "what computes the training loss from the hidden states, never building the logits: TRL's "
                  "fused head (logs entropy and token accuracy too), torch's chunked linear_cross_entropy, "
                  "cut-cross-entropy or Liger's kernel; or logits: the model's own forward, building them. A path "
                  "that does not reproduce the loaded model's head (logit scale, cap, bias, adapter) gives way to "
                  "one that does; auto: the first of liger, cce, torch that runs on a GPU, else trl"},
    )
    fixed_batch_shape: bool | None = field(
        default=None,
        metadata={"help": "pad every batch to per_device_train_batch_size x max_length tokens, so torch.compile "
                  "compiles once instead of once per shape; unset: on with torch_compile"},
    )
    eval_samples: int = field(
        default=3,
        metadata={"help": "held-out conversations the model answers at each evaluation and at the end of the run, "
                  "written to output_dir/samples.jsonl and samples.md; 0: none"},
    )


# TRL keys sftkit does not honour, with why and what to do instead: accepting them would train something else than
# the recipe says. Keys that are honoured only for some values are checked in _check_together.
REJECTED_KEYS = {
    "shuffle_dataset": "sftkit always trains in a seeded random order (seed, or data_seed), the same on every way "
                       "of preparing the rows and after a resume, and packs rows in that order; remove the key",
    "train_sampling_strategy": "sftkit decides the training order itself (a seeded shuffle by row, the same after a "
                               "resume); remove the key",
    "dataset_text_field": "sftkit reads text through the text adapter: set dataset_format: text and dataset_options: "
                          "{text_column: NAME}",
    "dataset_kwargs": "sftkit prepares the data itself (adapters, the row chain), so TRL's preparation options have "
                      "nothing to act on; remove the key",
    "ignore_bias_buffers": "TRL's DPO script option for models with boolean buffers; a sftkit run has none to ignore; "
                           "remove the key",
}

_COUNT, _SOME, _SIZE = Bound(0), Bound(1), Bound(0, low_open=True)  # 0 or more; 1 or more; a positive amount
_FRACTION, _BELOW_ONE = Bound(0, 1), Bound(0, 1, high_open=True)
_SEED = Bound(0, 2**32 - 1)  # numpy's seeds
# Every numeric key and the numbers it makes sense with, checked in one place (read_recipe); tests/test_bounds.py
# walks every numeric key of TRL's classes and sftkit's and fails on one missing here. Without these, TRL and
# transformers take many nonsense numbers: max_steps: 0 trains num_train_epochs, max_length: -5 trains,
# render_check_rows: -1 switches the render guard off, learning_rate: .nan trains on NaN.
BOUNDS: dict[str, Bound] = {
    "per_device_train_batch_size": _SOME, "per_device_eval_batch_size": _SOME, "gradient_accumulation_steps": _SOME,
    "eval_accumulation_steps": _SOME, "global_batch_size": _SOME,
    "max_steps": Bound(1, also=(-1,), meaning="-1 (train num_train_epochs)"), "num_train_epochs": _COUNT,
    "learning_rate": _SIZE, "warmup_steps": _COUNT, "weight_decay": _COUNT, "adam_beta1": _BELOW_ONE,
    "adam_beta2": _BELOW_ONE, "adam_epsilon": _COUNT, "max_grad_norm": _COUNT, "label_smoothing_factor": _BELOW_ONE,
    "neftune_noise_alpha": _COUNT, "router_aux_loss_coef": _COUNT, "grad_norm_limit": _SIZE,
    # Steps below 1 are a fraction of the run's steps.
    "logging_steps": _SIZE, "eval_steps": _SIZE, "save_steps": _SIZE, "eval_delay": _COUNT,
    "save_total_limit": _SOME, "torch_empty_cache_steps": _SOME,
    "seed": _SEED, "data_seed": _SEED,
    "dataloader_num_workers": _COUNT, "dataloader_prefetch_factor": _SOME, "dataset_num_proc": _SOME,
    "ddp_bucket_cap_mb": _SOME, "ddp_timeout": _SOME, "local_rank": Bound(-1),
    "max_length": _SOME, "pad_to_multiple_of": Bound(1, also=("auto",), meaning="'auto' (pads on Neuron only)"),
    "lora_r": _SOME, "lora_alpha": _SOME, "lora_dropout": _BELOW_ONE,
    "test_split_size": _COUNT,  # a fraction or a number of rows: checked further in _check_together
    "render_check_rows": _COUNT, "eval_samples": _COUNT, "max_invalid_fraction": _FRACTION,
}


@dataclass(frozen=True)
class CheckedRecipe:
    """A recipe as written, every key and value checked: what ``sftkit.setup.resolve`` turns into a Recipe."""

    values: dict[str, Any]  # every key the recipe set, after overrides, typed
    environment: dict[str, str]  # its env: mapping, not applied yet
    path: str  # the recipe's file, or <command line>
    entry_adapters: list[tuple[str, dict]]  # per datasets: entry, its dataset_format and dataset_options
    mixture_entries: list[dict[str, Any]]  # the datasets: entries as TRL's DatasetConfig takes them


@dataclass
class Recipe:
    """A validated recipe: TRL's argument objects, sftkit's, and the resolved keys to record."""

    script: ScriptArguments
    training: SFTConfig
    model: ModelConfig
    mixture: DatasetMixtureConfig
    sftkit: SftkitArguments
    values: dict[str, Any]  # every key the recipe set, after overrides, plus derived values
    path: str  # the recipe's file, or <command line>
    notes: list[str]  # what sftkit decided on the user's behalf, for the log
    batch: BatchGeometry  # rows per device, accumulation steps and processes, as resolved for this launch
    entry_adapters: list[tuple[str, dict]]  # per datasets: entry, its dataset_format and dataset_options
    chosen_levers: list[str] = field(default_factory=list)  # speed levers sftkit set for this machine, not the recipe


@functools.cache
def known_keys() -> dict[str, Key]:
    """Every key a recipe may set: TRL's (read without importing TRL, see sftkit.recipe_keys), then sftkit's own."""
    return {**keys_of((SftkitArguments,)), **trl_keys().keys}


# ---------------------------------------------------------------- reading the file


# A recipe is keys and values: data, chat templates and DeepSpeed configs live in files of their own. The bounds are
# far above any real recipe and far below what hurts: YAML aliases let 600 bytes expand to gigabytes, and the YAML
# reader takes seconds over a file of this size.
MAX_RECIPE_BYTES = 256 * 1024
MAX_RECIPE_VALUES = 100_000


def read_recipe_file(path: str) -> dict[str, Any]:
    """The recipe file's top-level mapping, read within bounds (size, encoding, values once aliases are expanded)."""
    file = Path(path)
    if not file.is_file():
        raise SftkitError(f"recipe {path}: no such file")
    with file.open("rb") as stream:
        raw = stream.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise SftkitError(f"recipe {path} is larger than {MAX_RECIPE_BYTES:,} bytes, too large for a recipe of keys "
                          "and values: put data, chat templates and DeepSpeed configs in files of their own and name "
                          "them by path")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SftkitError(f"recipe {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at position "
                          f"{error.start}): save it as UTF-8") from None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses a control character here, before any parsing
    except yaml.YAMLError as error:
        raise SftkitError(f"recipe {path}: not valid YAML:\n{error}") from None
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, path)
        values = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        raise SftkitError(f"recipe {path}: not valid YAML:\n{error}") from None
    except RecursionError:
        raise SftkitError(f"recipe {path}: its YAML nests deeper than a recipe can; write it as flat key: value "
                          "lines") from None
    finally:
        loader.dispose()
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SftkitError(f"recipe {path}: the top level must be a mapping of key: value, got {type(values).__name__}")
    return values


def _check_expansion(root: yaml.Node, path: str) -> None:
    """Refuse a document whose values, each alias (*name) counted where it is used, pass MAX_RECIPE_VALUES, or an
    alias inside its own anchor: walked once per node, so an alias bomb is measured without being built."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes being walked: the path from the root to here
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise SftkitError(f"recipe {path}: the YAML value at line {node.start_mark.line + 1} holds an alias of "
                              "itself, which never ends; write the value out")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children)
    if sizes[id(root)] > MAX_RECIPE_VALUES:
        raise SftkitError(f"recipe {path}: its YAML holds {sizes[id(root)]:,} values once each alias (*name) is "
                          f"counted where it is used, more than the {MAX_RECIPE_VALUES:,} a recipe may hold; write "
                          "the values out instead of nesting aliases")


def _closest(key: str, candidates: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


ENTRY_ADAPTER_KEYS = ("dataset_format", "dataset_options")


def _check_mixture(entries: list[dict[str, Any]], source: str) -> None:
    known = trl_keys().mixture_entry_keys | set(ENTRY_ADAPTER_KEYS)
    for position, entry in enumerate(entries):
        for key in entry:
            if key not in known:
                raise SftkitError(
                    f"{source}: datasets[{position}] has unknown key {key!r}{_closest(key, known)} "
                    f"(accepted: {', '.join(sorted(known))})"
                )
        if "path" not in entry:
            raise SftkitError(f"{source}: datasets[{position}] needs a 'path'")
        if not isinstance(entry.get("dataset_format", ""), str) or not isinstance(entry.get("dataset_options", {}), dict):
            raise SftkitError(
                f"{source}: datasets[{position}]: dataset_format must be a string and dataset_options a mapping"
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
    """Keys that only make sense together; ``source``: the recipe, and the command line's keys where it set some."""

    def fail(message: str) -> typing.NoReturn:
        raise SftkitError(f"{source}: {message}")

    if "mixture" in values and not any(entry.get("fraction") is not None for entry in values.get("datasets", [])):
        fail("mixture only takes effect on a datasets: mixture whose entries set fraction (each source's share of "
             "the trained tokens); add fraction to every entry, or remove mixture")
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
    if values.get("eval_packing") and not values.get("packing"):
        fail("eval_packing: true packs the held-out rows, but only a packed run's batches keep packed rows apart "
             "(positions restart at each row, no attention across rows): without packing, the rows of a held-out "
             "sequence would attend to each other and the tokens at their boundaries be scored. Add packing: true, "
             "or remove eval_packing")
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
    if values.get("dataset_streaming") or values.get("streaming"):
        _check_streaming(values, fail)


def _check_streaming(values: dict[str, Any], fail: Callable[[str], typing.NoReturn]) -> None:
    """A stream has no length: the run is bounded by max_steps, and what needs every row first cannot stream."""
    if values.get("max_steps", -1) <= 0:
        fail("streaming needs max_steps (a stream has no length to count epochs over); set max_steps")
    if values.get("packing"):
        fail("packing needs each row's length before step 1, which a stream does not give; remove packing, or "
             "remove dataset_streaming to prepare a packed share of the rows")
    if values.get("prepare", "auto") != "auto":
        fail(f"prepare: {values['prepare']} and streaming exclude each other (a stream's rows are prepared as they "
             "arrive); remove prepare")
    size = values.get("test_split_size")
    if size and size < 1:
        fail(f"test_split_size {size}: a stream has no length to take a fraction of; give a number of rows, held out "
             "from the start of each source")
    if values.get("datasets") and values.get("dataset_streaming") and not values.get("streaming"):
        fail("a datasets: mixture streams with streaming: true (dataset_streaming is for dataset_name)")


# ---------------------------------------------------------------- resolving: decisions and the batch


def setting(values: Mapping[str, Any], key: str) -> Any:
    """A recipe key's value: as the recipe sets it, else its class's default (TRL's, for TRL's keys)."""
    if key in values:
        return values[key]
    return known_keys()[key].default_value()


@dataclass
class Decisions:
    """One recipe being resolved: the recipe its errors name, and what was decided on the user's behalf (``notes``,
    logged when the run starts). Each step of resolving takes this one object instead of a path and a list."""

    recipe_path: str  # the recipe's file, or <command line>
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def error(self, message: str) -> SftkitError:
        """An error in the recipe, named the way every recipe error names it."""
        return SftkitError(f"recipe {self.recipe_path}: {message}")


@dataclass(frozen=True)
class BatchGeometry:
    """The rows one optimizer step trains and how they are split: ``per_device`` rows a micro-step on each of
    ``processes`` processes, ``accumulation`` micro-steps a step. Resolving, resuming, the launcher's check and
    Kubernetes rendering all read the batch here, so they cannot disagree about it."""

    per_device: int
    accumulation: int
    processes: int
    global_batch: int | None = None  # the recipe's global_batch_size, where accumulation was derived from it

    @property
    def rows_per_pass(self) -> int:
        """Rows one micro-step trains, all processes together."""
        return self.per_device * self.processes

    @property
    def rows_per_step(self) -> int:
        """Rows (or packed sequences) one optimizer step trains, all processes together."""
        return self.rows_per_pass * self.accumulation

    def derivation(self) -> str | None:
        """How the accumulation steps came from global_batch_size, for the log; None where the recipe set them."""
        if self.global_batch is None:
            return None
        return (f"global_batch_size {self.global_batch} = {self.per_device} per device x {self.processes} "
                f"process(es) x {self.accumulation} accumulation step(s)")

    @classmethod
    def recorded(cls, values: Mapping[str, Any], processes: int) -> BatchGeometry:
        """The batch of a resolved recipe's values (the record, its accumulation steps already derived)."""
        return cls(setting(values, "per_device_train_batch_size"), setting(values, "gradient_accumulation_steps"),
                   processes, values.get("global_batch_size"))


def number_of_processes() -> int:
    """Processes in this launch, from the variables every launcher (accelerate, torchrun, Kubeflow) sets."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def batch_geometry(values: Mapping[str, Any], processes: int, decisions: Decisions) -> BatchGeometry:
    """The batch a recipe's values mean on ``processes`` processes. Where the recipe sets global_batch_size,
    global = per_device x processes x accumulation derives the accumulation steps; a global batch that does not
    divide is an error with the nearest valid values."""
    per_device = setting(values, "per_device_train_batch_size")
    global_batch = values.get("global_batch_size")
    if global_batch is None:
        return BatchGeometry(per_device, setting(values, "gradient_accumulation_steps"), processes)
    rows_per_pass = per_device * processes
    if global_batch <= 0 or global_batch % rows_per_pass:
        lower = max(rows_per_pass, global_batch // rows_per_pass * rows_per_pass)
        upper = (global_batch // rows_per_pass + 1) * rows_per_pass
        per_device_options = [size for size in range(1, global_batch + 1) if global_batch % (size * processes) == 0]
        suggestion = f"global_batch_size: {lower} or {upper}"
        if per_device_options:
            suggestion += f", or per_device_train_batch_size one of {per_device_options[-6:]}"
        raise decisions.error(
            f"global_batch_size {global_batch} is not a multiple of per_device_train_batch_size {per_device} x "
            f"{processes} process(es) = {rows_per_pass}. Use {suggestion}."
        )
    return BatchGeometry(per_device, global_batch // rows_per_pass, processes, global_batch)


# ---------------------------------------------------------------- putting it together


def environment_variables(environment: Any, where: str) -> dict[str, str]:
    """The ``env:`` mapping as the variables it sets, each name and value one the environment can hold (no ``=`` in
    a name, no NUL byte anywhere), so that setting them cannot fail half-way."""
    if environment is None:
        return {}
    if not isinstance(environment, dict):
        raise SftkitError(f"{where}: env must be a mapping of VARIABLE: value")
    variables = {}
    for name, value in environment.items():
        name = str(name)
        if not name or "=" in name or "\0" in name:
            raise SftkitError(f"{where}: env: {_shown(name)} is not a variable name (a name is not empty and holds no "
                              "'=' and no NUL byte); rename it")
        if value is None or isinstance(value, (dict, list)):
            raise SftkitError(f"{where}: env: {name} must be text or a number, got {_shown(value)} (write {name}: '' "
                              "for an empty value)")
        if "\0" in str(value):
            raise SftkitError(f"{where}: env: {name} holds a NUL byte, which no environment variable can; remove it")
        variables[name] = str(value)
    return variables


def _shown(value: Any) -> str:
    """A value as an error quotes it: as typed when typed on the command line, else as YAML reads it; cut short."""
    text = str(value) if isinstance(value, CommandLineValue) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_recipe(path: str | None, overrides: dict[str, Any] | None = None) -> CheckedRecipe:
    """Read a recipe file with command-line overrides on top, and check every key, value and combination."""
    recipe_path = path or "<command line>"
    overrides = overrides or {}
    values = {**(read_recipe_file(path) if path else {}), **overrides}

    def where(key: str) -> str:  # a key typed on the command line is not the file's to blame
        return "command line" if key in overrides else f"recipe {recipe_path}"

    environment = environment_variables(values.pop("env", None), where("env"))
    known = known_keys()
    for key in values:
        if key in REJECTED_KEYS:
            raise SftkitError(f"{where(key)}: {key}: {REJECTED_KEYS[key]}")
        if key not in known:
            raise SftkitError(f"{where(key)}: unknown key {key!r}{_closest(key, known)}")
    for key, value in list(values.items()):
        annotation = known[key].annotation
        if key == "resume_from_checkpoint" and isinstance(value, bool):
            continue  # true: the latest checkpoint, found when the recipe is resolved
        try:
            values[key] = coerce(value, annotation)
        except Mismatch:
            hint = " (quote it: '0625', not 0625, which YAML reads as a number)" if annotation in (str, str | None) else ""
            raise SftkitError(f"{where(key)}: {key} must be {type_name(annotation)}, got {_shown(value)}{hint}") from None
        bound = BOUNDS.get(key)
        if bound is not None and values[key] is not None and not bound.admits(values[key]):
            finite = "a finite number " if isinstance(values[key], float) and not math.isfinite(values[key]) else ""
            raise SftkitError(f"{where(key)}: {key} must be {finite}{bound.describe()}, got {_shown(value)}")
    source = f"recipe {recipe_path}" + (f" with {', '.join(f'--{key}' for key in overrides)} from the command line"
                                        if overrides and path else "")
    _check_mixture(values.get("datasets", []), source)
    _check_together(values, source)
    entry_adapters, entries = _split_entry_adapters(values)
    return CheckedRecipe(values, environment, recipe_path, entry_adapters, entries)
