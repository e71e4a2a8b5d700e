"""A trained model directory, as ``sftkit chat`` and ``sftkit merge`` open it: a full model, or a LoRA adapter
applied to the base model its ``adapter_config.json`` names."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sftkit import embedded
from sftkit.errors import SftkitError

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass
class Trained:
    model: Any  # a PreTrainedModel, or a peft PeftModel for an adapter
    tokenizer: PreTrainedTokenizerBase
    base: str | None  # an adapter's base model; None for a full model

    def describe(self, name: str) -> str:
        return f"{name} (a LoRA adapter on {self.base})" if self.base else name


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_trained(name: str) -> tuple[Path, bool]:
    """The directory ``name`` names, and whether it holds a LoRA adapter (else a full model)."""
    directory = Path(embedded.resolve(name))
    if not directory.is_dir():
        raise SftkitError(f"{name}: no such directory; name the output_dir of a run, or a checkpoint-* folder in it")
    if (directory / ADAPTER_CONFIG).is_file():
        return directory, True
    if (directory / MODEL_CONFIG).is_file():
        return directory, False
    checkpoints = sorted(directory.glob("checkpoint-*"), key=_checkpoint_step)
    latest = f"; its latest checkpoint is {checkpoints[-1]}" if checkpoints else ""
    raise SftkitError(f"{name} holds no model: no {MODEL_CONFIG} (a full model) and no {ADAPTER_CONFIG} (a LoRA "
                      f"adapter){latest}. Name the output_dir of a finished run, or a checkpoint-* folder in it.")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _unreadable(name: str, error: Exception) -> str:
    """Why the weights in ``name`` cannot be loaded, and what to do."""
    if "weights_only" in str(error) or type(error).__name__ == "UnpicklingError":
        return (f"{name}: its weights are a pickle file, which loads only by running the code it holds, so it is not "
                "loaded. Convert them to safetensors where you trust their source, or name a directory that holds "
                "model.safetensors (every sftkit run writes one)")
    return (f"{name}: its weights cannot be read ({_first_line(error)}): a file cut short by an interrupted copy or "
            "save, or not a model's weights. Copy it again, or name a checkpoint-* folder of the run")


def _adapter_base(directory: Path) -> str:
    """The base model the adapter's config names, checked to be there when it is a path."""
    config = directory / ADAPTER_CONFIG
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    fix = f"set base_model_name_or_path in {config} to the base model's directory (or Hub id)"
    if not base:
        raise SftkitError(f"{directory} is a LoRA adapter whose {ADAPTER_CONFIG} names no base model; {fix}")
    if (base.startswith(("/", ".", "~")) or Path(base).is_absolute()) and not Path(base).expanduser().is_dir():
        raise SftkitError(f"{directory} is a LoRA adapter on {base}, which is not there: copy the base model "
                          f"there, or {fix}")
    return base


def open_trained(name: str) -> Trained:
    """The model in ``name`` (an adapter applied to its base) and its tokenizer, in the dtype they were saved in."""
    directory, is_adapter = find_trained(name)
    base = _adapter_base(directory) if is_adapter else None
    try:
        model = AutoModelForCausalLM.from_pretrained(base or directory, dtype="auto")
    except Exception as error:  # noqa: BLE001 - whatever stops the weights loading, the user needs the file named
        if base is None:
            raise SftkitError(_unreadable(name, error)) from None
        raise SftkitError(f"{directory} is a LoRA adapter on {base}, which cannot be loaded ({_first_line(error)}); "
                          f"make it available, or set base_model_name_or_path in {directory / ADAPTER_CONFIG} to "
                          "where the base model is") from None
    if base is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise SftkitError(f"{directory} is a LoRA adapter, and applying it needs peft: pip install "
                              "'sftkit[peft]'") from None
        try:
            model = PeftModel.from_pretrained(model, directory)
        except Exception as error:  # noqa: BLE001 - a cut or foreign adapter file: named, not a traceback
            raise SftkitError(_unreadable(str(directory), error)) from None
    # The run saved its tokenizer beside the adapter; an adapter saved without one uses its base's.
    source = directory if (directory / TOKENIZER_CONFIG).is_file() or base is None else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise SftkitError(f"{source}: no tokenizer can be loaded from it ({_first_line(error)}); a run saves its "
                          "tokenizer beside the model") from None
    return Trained(model.eval(), tokenizer, base)
