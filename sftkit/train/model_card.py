"""The model card, ``output_dir/README.md``: what the model was fine-tuned from, on what, with which recipe and sftkit.

TRL's card names the base model only when it is a Hub id it can read off the loaded config, so a run from a local
directory (or sftkit's embedded model) said "a fine-tuned version of [None]". The recipe knows: it is the card's
source, written as the run record writes it (secrets redacted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sftkit import __version__
from sftkit.redaction import redacted
from sftkit.train.run_record import plain

CARD_NAME = "README.md"


def _datasets(values: dict[str, Any]) -> list[str]:
    if values.get("datasets"):
        return [str(entry.get("path")) for entry in values["datasets"]]
    return [str(values["dataset_name"])] if values.get("dataset_name") else []


def _hub_id(name: str) -> bool:
    """A Hub repository id (``owner/name``), not a local path or sftkit's embedded asset."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and ":" not in name and not Path(name).exists()


def model_card(values: dict[str, Any], output_dir: str) -> str:
    """The card of a model fine-tuned as the recipe ``values`` say, saved in ``output_dir``."""
    base = str(values.get("model_name_or_path"))
    datasets = _datasets(values)
    front = {"library_name": "transformers", "tags": ["sftkit", "trl", "sft"]}
    if _hub_id(base):
        front["base_model"] = base
    if hub_datasets := [dataset for dataset in datasets if _hub_id(dataset)]:
        front["datasets"] = hub_datasets
    adapter = " (a LoRA adapter on it)" if values.get("use_peft") else ""
    load = (f"load it with peft (`AutoPeftModelForCausalLM.from_pretrained`), or merge it into its base first "
            f"(`sftkit merge {output_dir} -o MERGED`)" if values.get("use_peft") else
            "load it with transformers (`AutoModelForCausalLM.from_pretrained`)")
    recipe = yaml.safe_dump(redacted(plain(values)), sort_keys=False, allow_unicode=True)
    base, datasets = redacted(base), redacted(datasets)  # a dataset given as a URL with credentials, say
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {Path(output_dir).name}\n\n"
        f"A fine-tuned version of `{base}`{adapter}, trained on {', '.join(f'`{d}`' for d in datasets) or 'its data'} "
        f"by supervised fine-tuning with sftkit {__version__} (TRL's SFTTrainer).\n\n"
        f"## Use\n\n```bash\nsftkit chat {output_dir}\n```\n\n"
        f"or {load}; its chat template and a generation config that stops at the end of the assistant's turn are "
        "saved with it.\n\n"
        f"## Recipe\n\nThe recipe it was trained with, as sftkit resolved it (`sftkit_run.yaml` beside the model holds "
        f"it too, with the data and the versions):\n\n```yaml\n{recipe}```\n")


def write_model_card(values: dict[str, Any], output_dir: str) -> Path:
    path = Path(output_dir) / CARD_NAME
    path.write_text(model_card(values, output_dir))
    return path
