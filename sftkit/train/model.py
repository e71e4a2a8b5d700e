"""What is trained: the tokenizer, how the model is loaded, and the token that ends an assistant turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from sftkit import embedded
from sftkit.data.templates import end_of_turn_token_id, rendering_tokenizer
from sftkit.errors import SftkitError
from sftkit.recipe import Recipe


def model_path(recipe: Recipe) -> str:
    return embedded.resolve(recipe.model.model_name_or_path)


def _tokenizer_from(name: str, recipe: Recipe, key: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(embedded.resolve(name), revision=recipe.model.model_revision,
                                             trust_remote_code=recipe.training.trust_remote_code)
    except (OSError, ValueError) as error:
        raise SftkitError(
            f"{key} {name}: could not load its tokenizer ({error}). Check the name, your network or Hub login, or "
            "point it at a local directory."
        ) from None


def settle_tokenizer(recipe: Recipe) -> tuple[PreTrainedTokenizerBase, list[int]]:
    """The run's tokenizer with the recipe's ``eos_token`` and ``chat_template_path`` applied, before any row is
    prepared, and the ids of the tokens the template's tokenizer added.

    TRL applies both when the trainer is built, after sftkit has prepared the rows; applying them here, in TRL's
    order and TRL's way, makes every row (eager, lazy, packed) and the saved tokenizer agree. The trainer gets a
    copy, so nothing it does later changes the tokenizer the rows are prepared with.
    """
    tokenizer = _tokenizer_from(recipe.model.model_name_or_path, recipe, "model_name_or_path")
    eos_token, template_path = recipe.training.eos_token, recipe.training.chat_template_path
    if eos_token is not None:
        if eos_token not in tokenizer.get_vocab():
            raise SftkitError(f"eos_token {eos_token!r} is not a token of the tokenizer of "
                              f"{recipe.model.model_name_or_path}; name one of its tokens (its EOS is "
                              f"{tokenizer.eos_token!r})")
        tokenizer.eos_token = eos_token
    added: list[int] = []
    if template_path is None:
        return tokenizer, added
    if Path(template_path).is_file():
        if not template_path.endswith((".jinja", ".j2")):
            raise SftkitError(f"chat_template_path {template_path}: a template file ends in .jinja or .j2; or give a "
                              "tokenizer directory or a Hub model id whose template to use")
        tokenizer.chat_template = Path(template_path).read_text()
        return tokenizer, added
    donor = _tokenizer_from(template_path, recipe, "chat_template_path")  # as TRL's clone_chat_template does
    tokenizer.chat_template = donor.get_chat_template()
    new = [token for token in donor.added_tokens_decoder.values() if token.content not in tokenizer.get_vocab()]
    tokenizer.add_tokens(new)
    added = [tokenizer.convert_tokens_to_ids(token.content) for token in new]
    tokenizer.eos_token = donor.eos_token
    return tokenizer, added


def load_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The run's settled tokenizer (see ``settle_tokenizer``); no weights are loaded."""
    return settle_tokenizer(recipe)[0]


def parameter_count(config: Any) -> int:
    """The parameters of a causal LM built from ``config``, counted on the meta device (no memory, no weights).

    Under ZeRO-3 transformers would partition the model with ``deepspeed.zero.Init`` and then initialise it,
    which meta tensors cannot; ``set_zero3_state`` tells it that partitioning is already taken care of.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import set_zero3_state

    with torch.device("meta"), set_zero3_state():
        return sum(parameter.numel() for parameter in AutoModelForCausalLM.from_config(config).parameters())


def model_init_kwargs(recipe: Recipe) -> dict[str, Any]:
    """How SFTTrainer loads the weights, as TRL's sft.py builds it, with the recipe's own kwargs on top."""
    kwargs = {
        "revision": recipe.model.model_revision,
        "trust_remote_code": recipe.training.trust_remote_code,
        "attn_implementation": recipe.model.attn_implementation,
        "dtype": recipe.model.dtype,
    }
    return {**kwargs, **(recipe.training.model_init_kwargs or {})}


def stop_on_end_of_turn(generation_config: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Add the end-of-turn token to the end tokens, so the tuned model stops after its answer: the one training
    trains after each reply, with the template training rows are rendered with (``rendering_tokenizer``)."""
    token_id = end_of_turn_token_id(rendering_tokenizer(tokenizer)[0])
    if token_id is None:
        return None
    current = generation_config.eos_token_id
    ends = [] if current is None else [current] if isinstance(current, int) else list(current)
    if token_id not in ends:
        ends.append(token_id)
    generation_config.eos_token_id = ends
    return token_id
