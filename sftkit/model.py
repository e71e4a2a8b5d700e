"""What is trained: the tokenizer, how the model is loaded, and the token that ends an assistant turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from sftkit import embedded
from sftkit.errors import SftkitError
from sftkit.recipe import Recipe


def model_path(recipe: Recipe) -> str:
    return embedded.resolve(recipe.model.model_name_or_path)


def load_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The tokenizer the trainer will use, with the recipe's chat template file applied (weights not needed)."""
    name = recipe.model.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path(recipe),
            revision=recipe.model.model_revision,
            trust_remote_code=recipe.training.trust_remote_code,
        )
    except (OSError, ValueError) as error:
        raise SftkitError(
            f"model_name_or_path {name}: could not load its tokenizer ({error}). Check the name, your network or "
            "Hub login, or point model_name_or_path at a local directory."
        ) from None
    template_path = recipe.training.chat_template_path
    if template_path and Path(template_path).is_file():
        tokenizer.chat_template = Path(template_path).read_text()
    return tokenizer


def model_init_kwargs(recipe: Recipe) -> dict[str, Any]:
    """How SFTTrainer loads the weights, as TRL's sft.py builds it, with the recipe's own kwargs on top."""
    kwargs = {
        "revision": recipe.model.model_revision,
        "trust_remote_code": recipe.training.trust_remote_code,
        "attn_implementation": recipe.model.attn_implementation,
        "dtype": recipe.model.dtype,
    }
    return {**kwargs, **(recipe.training.model_init_kwargs or {})}


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template puts right after an assistant's text (ChatML's <|im_end|>)."""
    if not tokenizer.chat_template:
        return None
    marker = "sftkit-end-of-turn-probe"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    after = rendered.split(marker, 1)[-1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return ids[0] if ids and ids[0] in special else None


def stop_on_end_of_turn(generation_config: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Add the end-of-turn token to the end tokens, so the tuned model stops after its answer."""
    token_id = end_of_turn_token_id(tokenizer)
    if token_id is None:
        return None
    current = generation_config.eos_token_id
    ends = [] if current is None else [current] if isinstance(current, int) else list(current)
    if token_id not in ends:
        ends.append(token_id)
    generation_config.eos_token_id = ends
    return token_id
