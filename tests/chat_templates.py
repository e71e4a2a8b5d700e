"""Tokenizers of the model families people fine-tune, offline: the embedded byte-level vocabulary with each family's
special tokens, BOS rule and chat template (as the family's tokenizer_config.json ships it, condensed)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from helpers import TINY_MODEL
from tokenizers import processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sftkit import embedded

ALTERNATE = ("{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}")

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}" + ALTERNATE +
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3 = (
    "{{- bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}" + ALTERNATE +
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}" + ALTERNATE +
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}"
)
VICUNA = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = 'A chat between a curious user and an artificial "
    "intelligence assistant.' %}{% set loop_messages = messages %}{% endif %}{{ system + ' ' }}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token + ' ' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
ALPACA = (  # marks no end of a reply
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
CHATQA = (  # Llama 3 ChatQA: plain "User:" / "Assistant:" lines, no end of turn either
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ 'System: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Mistral's tool-calling templates (v0.3 and later), condensed: each tool call is written with its id, which must be
# nine characters, and each tool result names the call it answers.
MISTRAL_TOOLS = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST]' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined %}{{ '[TOOL_CALLS][' }}"
    "{% for call in message['tool_calls'] %}{% if call['id'] is not defined or call['id'] | length != 9 %}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments'], 'id': call['id']} | tojson }}"
    "{% if not loop.last %}{{ ', ' }}{% endif %}{% endfor %}{{ ']' + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% elif message['role'] == 'tool' %}{{ '[TOOL_RESULTS]' + {'content': message['content'], "
    "'call_id': message['tool_call_id']} | tojson + '[/TOOL_RESULTS]' }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    template: str | None  # None: the embedded tokenizer's own (Qwen2.5's ChatML)
    bos: str | None
    eos: str
    specials: tuple[str, ...] = ()
    adds_bos: bool = False  # the tokenizer puts its BOS before plain text, as Llama's, Mistral's and Gemma's do
    system: bool = True  # the template renders a system turn
    reply: tuple[str, str] = ("", "")  # what the trained part of a reply is, around its text: (before, stop marker)


FAMILIES = {
    "chatml": Family(None, None, "<|endoftext|>", reply=("", "<|im_end|>")),
    "llama2": Family(LLAMA2, "<s>", "</s>", adds_bos=True, reply=(" ", " </s>")),
    "llama3": Family(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>"),
                     adds_bos=True, reply=("", "<|eot_id|>")),
    "mistral": Family(MISTRAL, "<s>", "</s>", adds_bos=True, system=False, reply=("", "</s>")),
    "gemma": Family(GEMMA, "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), adds_bos=True, system=False,
                    reply=("", "<end_of_turn>")),
    "phi3": Family(PHI3, "<s>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                   reply=("", "<|end|>")),
    "zephyr": Family(ZEPHYR, "<s>", "</s>", ("<|system|>", "<|user|>", "<|assistant|>"), reply=("\n", "</s>")),
    "vicuna": Family(VICUNA, "<s>", "</s>", reply=(" ", "</s>")),
    "alpaca": Family(ALPACA, None, "</s>", reply=("", "</s>")),
    "chatqa": Family(CHATQA, "<|begin_of_text|>", "<|end_of_text|>", adds_bos=True, reply=(" ", "<|end_of_text|>")),
    "mistral-tools": Family(MISTRAL_TOOLS, "<s>", "</s>", ("[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
                                                           "[/TOOL_RESULTS]"), adds_bos=True, system=False,
                            reply=("", "</s>")),
}


def family_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """The embedded vocabulary with the family's special tokens, BOS rule and chat template."""
    family = FAMILIES[name]
    base = AutoTokenizer.from_pretrained(embedded.resolve(TINY_MODEL))
    if family.template is None:
        return base
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer)
    named = {"eos_token": family.eos, "pad_token": family.eos, **({"bos_token": family.bos} if family.bos else {})}
    tokenizer.add_special_tokens({**named, "additional_special_tokens": list(family.specials)})
    if family.adds_bos:
        bos = tokenizer.convert_tokens_to_ids(family.bos)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos)])
    tokenizer.chat_template = family.template
    return tokenizer


SPECIAL = re.compile(r"<\|[^|<>\s]+\|>|<｜[^｜]+｜>|\[/?[A-Z_]+\]|<start_of_turn>|<end_of_turn>")


def template_tokenizer(template: str, bos: str | None, eos: str) -> PreTrainedTokenizerFast:
    """The embedded vocabulary with a real model's chat template, and as special tokens the markers the template
    writes (``<|im_end|>``, ``<｜Assistant｜>``, ``[INST]``, ...), its BOS and its EOS."""
    base = AutoTokenizer.from_pretrained(embedded.resolve(TINY_MODEL))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer)
    specials = sorted(set(SPECIAL.findall(template)) - {bos, eos})
    named = {"eos_token": eos, "pad_token": eos, **({"bos_token": bos} if bos else {})}
    tokenizer.add_special_tokens({**named, "additional_special_tokens": specials})
    tokenizer.chat_template = template
    return tokenizer
