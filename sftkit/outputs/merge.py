"""``sftkit merge``: a LoRA adapter merged into its base model and saved as a full model that loads with
``AutoModelForCausalLM`` alone: safetensors weights, the tokenizer with its chat template, and a generation config
whose end tokens include the chat template's end of turn."""

from __future__ import annotations

from pathlib import Path

from sftkit.errors import SftkitError
from sftkit.outputs.trained import ADAPTER_CONFIG, MODEL_CONFIG, find_trained, open_trained
from sftkit.train.model import stop_on_end_of_turn


def merge(adapter: str, output: str) -> Path:
    """Merge the adapter in ``adapter`` into its base and save the model in ``output``, a new directory."""
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SftkitError(f"{output} already exists and is not an empty directory; name a new one (sftkit merge "
                          "writes over nothing)")
    if not find_trained(adapter)[1]:
        raise SftkitError(f"{adapter} holds a full model ({MODEL_CONFIG}, no {ADAPTER_CONFIG}): there is no LoRA "
                          "adapter to merge, and the model loads as it is")
    trained = open_trained(adapter)
    model = trained.model.merge_and_unload()
    stop_on_end_of_turn(model.generation_config, trained.tokenizer)
    model.save_pretrained(out)
    trained.tokenizer.save_pretrained(out)
    return out
