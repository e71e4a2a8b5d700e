"""A model folder for vLLM: the full model (a LoRA run merged into its base) as safetensors in the export's type,
the tokenizer with its chat template in ``chat_template.jinja``, and a ``generation_config.json`` whose end tokens
include the chat template's end of turn, which vLLM stops at by default (``--generation-config auto``). The
report gives the ``vllm serve`` line and the OpenAI-style request that reproduces an answer of ``samples.md``.
"""

from __future__ import annotations

import copy
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from sftkit.errors import SftkitError
from sftkit.train.model import stop_on_end_of_turn

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
PORT = 8000


def write_folder(model: Any, tokenizer: PreTrainedTokenizerBase, folder: Path, type_name: str) -> None:
    if type_name not in DTYPES:
        raise SftkitError(f"--type {type_name} is a GGUF quantisation; --to vllm writes {', '.join(DTYPES)} "
                          "(vLLM quantises a folder itself: vllm serve --quantization fp8)")
    if next(model.parameters()).dtype != DTYPES[type_name]:
        model = copy.deepcopy(model).to(DTYPES[type_name])  # the trained model stays as it is, for the checks
    model.config.dtype = DTYPES[type_name]
    stop_on_end_of_turn(model.generation_config, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def serve_command(folder: Path, name: str, type_name: str) -> str:
    """vLLM serving the folder in its own type (vLLM's default computes a float32 model in float16)."""
    dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[type_name]
    return " ".join(["vllm", "serve", shlex.quote(str(folder)), "--served-model-name", shlex.quote(name),
                     "--dtype", dtype, "--generation-config", "auto", "--port", str(PORT)])


def request(name: str, messages: Sequence[Mapping[str, Any]], max_tokens: int, greedy: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": name, "messages": [dict(message) for message in messages],
                            "max_tokens": max_tokens}
    if greedy:
        body["temperature"] = 0
    return body


def curl(body: Mapping[str, Any]) -> str:
    return (f"curl -s http://localhost:{PORT}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(body, ensure_ascii=False))}")
