"""A trained model as one GGUF file, written with the ``gguf`` package (the writer llama.cpp maintains): the weights
under llama.cpp's tensor names, the hyperparameters under its keys, and everything a program that reads only the
file needs to talk to the model as ``sftkit chat`` does: the vocabulary and merges of the byte-level BPE tokenizer,
how it splits text before merging, the special tokens, the chat template, and the stop tokens (EOS, and the
chat template's end of turn as EOT).

Qwen2 and Llama models convert. llama.cpp computes rotary embeddings of Llama on the two halves of each head
interleaved, so Llama's q and k projections are permuted as llama.cpp's own converter permutes them (and
transformers' GGUF reader permutes back). Norms and other vectors stay float32 in every type, as llama.cpp
expects; a matrix whose rows do not divide into q8_0's blocks of 32 is written in f16, as llama.cpp's converter
writes it, and counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Quant
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sftkit.data.templates import end_of_turn_token_id, rendering_tokenizer
from sftkit.errors import SftkitError

# --type: the type of the matrices; the file type llama.cpp records for it.
TYPES = {"f32": (Quant.F32, gguf.LlamaFileType.ALL_F32), "f16": (Quant.F16, gguf.LlamaFileType.MOSTLY_F16),
         "bf16": (Quant.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Quant.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}


@dataclass(frozen=True)
class Architecture:
    arch: gguf.MODEL_ARCH
    rope_interleaved: bool  # llama.cpp wants q and k permuted to its rotary layout (Llama)
    refused_keys: tuple[str, ...]  # config keys that, when true, describe a model this file cannot hold


# Keyed by the config's model_type.
ARCHITECTURES = {
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, rope_interleaved=False, refused_keys=("use_sliding_window",)),
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, rope_interleaved=True, refused_keys=("attention_bias", "mlp_bias")),
}

# How a byte-level BPE tokenizer splits text before it merges (its tokenizer.json's Split regex), by the name
# llama.cpp and transformers' GGUF reader give that split (``tokenizer.ggml.pre``).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}


def convertible() -> str:
    return ", ".join(f"{name} ({gguf.MODEL_ARCH_NAMES[spec.arch]})" for name, spec in ARCHITECTURES.items())


def architecture(config: Any) -> Architecture:
    """The architecture ``config`` describes, or an error naming it and the ones that convert."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SftkitError(f"the model is a {model_type} model ({', '.join(config.architectures or [])}), which "
                          f"sftkit export cannot write as GGUF; it converts model types {convertible()}. "
                          "--to vllm writes any model as a Hugging Face folder")
    spec = ARCHITECTURES[model_type]
    if refused := [key for key in spec.refused_keys if getattr(config, key, False)]:
        raise SftkitError(f"the {model_type} model sets {', '.join(refused)} in its config.json, which the GGUF "
                          f"{gguf.MODEL_ARCH_NAMES[spec.arch]} architecture does not describe; --to vllm writes it "
                          "as a Hugging Face folder")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise SftkitError(f"the model's rotary embedding is scaled (rope_type {rope['rope_type']!r} in config.json); "
                          "sftkit export writes GGUF for unscaled rotary embeddings only; --to vllm writes it as a "
                          "Hugging Face folder")
    return spec


def rope_parameters(config: Any) -> dict[str, Any]:
    parameters = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in parameters and getattr(config, "rope_theta", None) is not None:
        parameters = {**parameters, "rope_theta": config.rope_theta}
    return parameters


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class Vocabulary:
    """What the file says about the tokenizer, taken from the trained tokenizer."""
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int | None
    eos: int | None
    eot: int | None  # the chat template's end of turn: what each trained reply ends with
    pad: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _backend(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SftkitError(f"the tokenizer ({type(tokenizer).__name__}) has no tokenizer.json; sftkit export writes "
                          "byte-level BPE tokenizers (Qwen2, Llama 3) that have one")
    return json.loads(backend.to_str())


def _split(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for how the tokenizer splits text, or an error saying why it has none."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    kinds = [step.get("type") for step in steps]
    regexes = [step["pattern"].get("Regex") for step in steps if step.get("type") == "Split"]
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if kinds != ["Split", "ByteLevel"] or byte_level[0].get("use_regex", True) or regexes[0] not in SPLITS:
        raise SftkitError(
            "the tokenizer is not a byte-level BPE tokenizer that splits text as Qwen2 or Llama 3 do (its "
            f"pre-tokenizer: {json.dumps(pre_tokenizer)[:300]}); a GGUF consumer would split text differently and "
            "see other tokens, so sftkit export writes only those (tokenizer.ggml.pre qwen2 or llama-bpe)")
    return SPLITS[regexes[0]]


def vocabulary(tokenizer: PreTrainedTokenizerBase, config: Any) -> Vocabulary:
    backend = _backend(tokenizer)
    model = backend.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise SftkitError(f"the tokenizer is a {model.get('type')} tokenizer"
                          f"{' with byte fallback (SentencePiece)' if model.get('byte_fallback') else ''}; sftkit "
                          "export writes byte-level BPE tokenizers (Qwen2, Llama 3) only")
    pre = _split(backend.get("pre_tokenizer"))
    size = config.vocab_size
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= size:
        raise SftkitError(f"the tokenizer has token id {max(by_id)}, past the model's vocab_size {size} in "
                          "config.json: the model has no embedding for it")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(size):
        if index not in by_id:  # rows of the embedding no token uses (Qwen pads its vocabulary)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    # Only the tokenizer's own BOS: a config.json's bos_token_id (which llama.cpp's converter falls back to) may be
    # any token, and would become a special token the consumer drops from what the model says.
    return Vocabulary(
        pre=pre, tokens=tokens, types=[int(kind) for kind in types], merges=merges, bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id, eot=end_of_turn_token_id(rendering_tokenizer(tokenizer)[0]),
        pad=tokenizer.pad_token_id,
        add_bos=tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        add_eos=tokenizer.eos_token_id is not None and len(probe) > 1 and probe[-1] == tokenizer.eos_token_id,
        chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None)


@dataclass(frozen=True)
class Tensor:
    name: str  # llama.cpp's
    shape: tuple[int, ...]
    quant: Quant
    data: Callable[[], np.ndarray]  # the values as written, made when the tensor is written

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.quant]
        return int(np.prod(self.shape)) // block * size


@dataclass
class Written:
    path: Path
    types: dict[str, int] = field(default_factory=dict)  # tensors by the type they were written in
    in_f16: list[str] = field(default_factory=list)  # matrices q8_0 could not hold


def _interleave(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout of a q or k projection (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _values(tensor: torch.Tensor, quant: Quant) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        data = np.ascontiguousarray(tensor.detach().to(torch.float32).cpu().numpy())
        return data if quant == Quant.F32 else gguf.quants.quantize(data, quant)
    return make


def tensors(model: Any, spec: Architecture, quant: Quant) -> Iterator[Tensor]:
    """The model's weights as llama.cpp names and lays them out, each in the type it is written in."""
    config = model.config
    names = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    block = gguf.GGML_QUANT_SIZES[Quant.Q8_0][0]
    for name, weights in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the output projection from token_embd when there is no output.weight
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise SftkitError(f"the model has a tensor {name} that llama.cpp's {gguf.MODEL_ARCH_NAMES[spec.arch]} "
                              "architecture has no name for; sftkit export cannot write it as GGUF")
        if spec.rope_interleaved and name.endswith(("q_proj.weight", "q_proj.bias")):
            weights = _interleave(weights, config.num_attention_heads)
        elif spec.rope_interleaved and name.endswith(("k_proj.weight", "k_proj.bias")):
            weights = _interleave(weights, config.num_key_value_heads)
        chosen = quant
        if weights.dim() <= 1 or target.endswith("_norm.weight"):
            chosen = Quant.F32  # llama.cpp computes with vectors in float32 only
        elif quant == Quant.Q8_0 and weights.shape[-1] % block:
            chosen = Quant.F16  # as llama.cpp's converter does: a row must be whole blocks of 32
        yield Tensor(target, tuple(weights.shape), chosen, _values(weights, chosen))


def _hyperparameters(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_rope_freq_base(float(rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _tokenizer(writer: gguf.GGUFWriter, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for token_id, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                          (vocab.eot, writer.add_eot_token_id), (vocab.pad, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def write_gguf(model: Any, tokenizer: PreTrainedTokenizerBase, path: Path, type_name: str, name: str,
               progress: bool = True) -> Written:
    """Write ``model`` and ``tokenizer`` to the GGUF file ``path``, its matrices in ``type_name``."""
    spec = architecture(model.config)
    vocab = vocabulary(tokenizer, model.config)
    quant, file_type = TYPES[type_name]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[spec.arch])
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hyperparameters(writer, model.config)
    _tokenizer(writer, vocab)
    planned = list(tensors(model, spec, quant))
    written = Written(path)
    for tensor in planned:
        # The type is given as raw_dtype, so the shape stays the tensor's own whatever its bytes.
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.quant)
        written.types[tensor.quant.name.lower()] = written.types.get(tensor.quant.name.lower(), 0) + 1
        if quant == Quant.Q8_0 and tensor.quant == Quant.F16:
            written.in_f16.append(tensor.name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        with tqdm(total=sum(tensor.nbytes for tensor in planned), unit="B", unit_scale=True, desc=path.name,
                  disable=not progress) as bar:
            for tensor in planned:  # one tensor in memory at a time
                writer.write_tensor_data(tensor.data())
                bar.update(tensor.nbytes)
    finally:
        writer.close()
    return written
