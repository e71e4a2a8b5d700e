"""Proof that an exported model is the trained model, read back by programs sftkit did not write.

Each check compares what a consumer makes of the export with what the trained model does in sftkit, on held-out
prompts (those of the run's ``samples.jsonl``): the prompt the chat template renders, the token ids it becomes,
the logits over whole conversations, the greedy answer and the token it stops at. A GGUF file is read by
transformers' GGUF reader (``from_pretrained(..., gguf_file=...)``, which builds the tokenizer and the model from
the file alone) and, where ``llama-cpp-python`` is installed, by llama.cpp itself; a Hugging Face folder is read by
transformers as vLLM reads it. Everything is computed in float32 on the CPU, the trained model included, so that
the only difference left is the one the export's type makes.

Logits must agree to an absolute ``EXACT`` (1e-5) where the export holds the trained weights exactly (f32, or the
type the model was saved in) and, for a type that rounds them, to ``TOLERANCE``: a bound on the largest difference
relative to the largest logit, with room over what was measured on the quickstart's model and on Llama models of
random weights (docs/outputs.md gives the numbers). llama.cpp sums in its own order, so it is allowed
``LLAMA_CPP_EXACT`` of the largest logit at least. Greedy answers must be the same where the weights are exact;
with a type that rounds them a near tie may turn, which the check reports and lets pass.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from sftkit.data.templates import render
from sftkit.outputs.generation import Answer, answer, end_tokens

EXACT = 1e-5  # float32 logits of the same weights, computed by another program
# The largest |logit difference| over the largest |logit|, for types that round the weights (docs/outputs.md).
TOLERANCE = {"f16": 3e-3, "bf16": 2e-2, "q8_0": 6e-2}
# llama.cpp's float32 kernels sum in another order than torch's: the same weights give logits this close, relative
# to the largest |logit| (the quickstart's differ by 4e-6 in 12).
LLAMA_CPP_EXACT = 1e-4


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str  # what was compared, and the numbers


@dataclass(frozen=True)
class Prompt:
    """A held-out conversation up to its last reply, and what the data and the trained model said next."""
    messages: list[dict[str, Any]]
    reference: str | None  # the reply the data has; the logits are compared over the conversation with it
    row: int | None = None  # the dataset row it was held out from
    step: int | None = None  # the training step of ``answer``
    answer: str | None = None  # the trained model's answer in samples.jsonl, at ``step``


def conversation(prompt: Prompt) -> list[dict[str, Any]]:
    tail = [{"role": "assistant", "content": prompt.reference}] if prompt.reference else []
    return [*prompt.messages, *tail]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' loading bars and notes are not the export's to show."""
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's own tqdm bar
            yield
    finally:
        transformers_logging.set_verbosity(level)
        transformers_logging.enable_progress_bar()


def float32(model: Any) -> Any:
    """The model in float32 (a copy when it is in another dtype), in eval mode."""
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).to(torch.float32)
    return model.eval()


def tolerance(type_name: str, trained_dtype: torch.dtype) -> tuple[float, bool]:
    """The bound on logit differences for an export in ``type_name``, and whether it is relative."""
    lossless = type_name == "f32" or {"bf16": torch.bfloat16, "f16": torch.float16}.get(type_name) == trained_dtype
    return (EXACT, False) if lossless else (TOLERANCE[type_name], True)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].to(torch.float32)


def compare_logits(trained: Any, other: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                   bound: tuple[float, bool], reader: str) -> Check:
    """The largest difference between the two models' logits over every position of every whole conversation."""
    worst, largest, positions, same_top = 0.0, 0.0, 0, 0
    for prompt in prompts:
        ids = _ids(tokenizer, render(tokenizer, conversation(prompt), None))
        expected, got = _logits(trained, ids), _logits(other, ids)
        worst = max(worst, (expected - got).abs().max().item())
        largest = max(largest, expected.abs().max().item())
        positions += len(ids)
        same_top += int((expected.argmax(-1) == got.argmax(-1)).sum())
    limit, relative = bound
    allowed = limit * largest if relative else limit
    how = f"{limit:g} x the largest |logit| {largest:.3g} = {allowed:.3g}" if relative else f"{limit:g}"
    return Check(f"logits ({reader})", worst <= allowed,
                 f"largest |difference| {worst:.3g} over {positions} positions of {len(prompts)} conversations "
                 f"(allowed: {how}); the same top token at {same_top} of {positions}")


def compare_tokenizers(trained: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                       reader: str) -> Check:
    """The other tokenizer has the same special tokens, its chat template renders each prompt as sftkit does, and
    it tokenizes to the same ids."""
    problems, tokens = [], 0
    for special in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(other, special) != getattr(trained, special):
            problems.append(f"its {special} is {getattr(other, special)!r} where the trained tokenizer's is "
                            f"{getattr(trained, special)!r}")
    for index, prompt in enumerate(prompts):
        for messages, generation_prompt in ((prompt.messages, True), (conversation(prompt), False)):
            text = render(trained, messages, None, generation_prompt=generation_prompt)
            if other.chat_template is None:
                problems.append("it has no chat template")
            elif render(other, messages, None, generation_prompt=generation_prompt) != text:
                problems.append(f"prompt {index}: its chat template renders another text")
            expected, got = _ids(trained, text), _ids(other, text)
            tokens += len(expected)
            if expected != got:
                at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
                problems.append(f"prompt {index}: token {at} is {got[at:at + 1]} where the trained tokenizer has "
                                f"{expected[at:at + 1]}")
    if problems:
        return Check(f"prompts and token ids ({reader})", False, "; ".join(dict.fromkeys(problems)))
    return Check(f"prompts and token ids ({reader})", True,
                 f"the same special tokens; {2 * len(prompts)} renderings ({len(prompts)} prompts, alone and with "
                 f"their reply) render the same text from the chat template it carries and tokenize to the same "
                 f"{tokens} ids")


def answers(model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
            max_new_tokens: int) -> list[Answer]:
    """Each prompt answered alone, greedily, as ``sftkit chat`` answers."""
    return [answer(model, tokenizer, [prompt.messages], max_new_tokens)[0] for prompt in prompts]


def describe_end(tokenizer: PreTrainedTokenizerBase, reply: Answer) -> str:
    return "max_new_tokens" if reply.end_token is None else tokenizer.convert_ids_to_tokens(reply.end_token)


def compare_answers(expected: Sequence[Answer], got: Sequence[Answer], tokenizer: PreTrainedTokenizerBase,
                    reader: str, required: bool) -> Check:
    """The same greedy answers, each stopping at the same token after the same number of tokens."""
    same = [a.text == b.text and a.new_tokens == b.new_tokens and a.end_token == b.end_token
            for a, b in zip(expected, got, strict=True)]
    ends = sorted({describe_end(tokenizer, reply) for reply in got})
    detail = (f"{sum(same)} of {len(same)} greedy answers the same as sftkit chat's, token for token, stopping at "
              f"{', '.join(ends)}")
    if not all(same):
        first = same.index(False)
        detail += (f"; prompt {first}: {got[first].text!r} ({got[first].new_tokens} tokens, "
                   f"{describe_end(tokenizer, got[first])}) where sftkit chat says {expected[first].text!r} "
                   f"({expected[first].new_tokens} tokens, {describe_end(tokenizer, expected[first])})")
        if not required:
            detail += " (a type that rounds the weights may turn a near tie)"
    return Check(f"greedy answers ({reader})", all(same) or not required, detail)


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The file's key-value metadata, arrays of strings as lists of strings."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    values = {}
    for key, field in reader.fields.items():
        try:
            values[key] = field.contents()
        except (ValueError, TypeError):  # a value the reader cannot turn into Python is none of these checks'
            continue
    return values


def check_metadata(path: Path, tokenizer: PreTrainedTokenizerBase, model: Any) -> list[Check]:
    """The chat template and the stop tokens the file carries are the trained tokenizer's."""
    from sftkit.export.gguf_file import vocabulary

    metadata = gguf_metadata(path)
    expected = vocabulary(tokenizer, model.config)
    template = metadata.get("tokenizer.chat_template")
    if template is None:
        template_check = Check("chat template in the file", False,
                               f"{path.name} has no tokenizer.chat_template: a consumer would fall back to a "
                               "template of its own and send the model prompts it was not trained on")
    elif template != expected.chat_template:
        template_check = Check("chat template in the file", False,
                               f"{path.name}'s tokenizer.chat_template is not the one the model was trained with")
    else:
        template_check = Check("chat template in the file", True,
                               f"tokenizer.chat_template is the trained tokenizer's ({len(template)} characters)")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    problems = []
    for key, want, what in (("tokenizer.ggml.eos_token_id", expected.eos, "the tokenizer's EOS"),
                            ("tokenizer.ggml.eot_token_id", expected.eot, "the chat template's end of turn")):
        got = metadata.get(key)
        if got != want:
            name = repr(tokens[got]) if isinstance(got, int) and got < len(tokens) else "nothing"
            wanted = f"{want} ({tokenizer.convert_ids_to_tokens(want)!r})" if want is not None else "none"
            problems.append(f"{key} is {got} ({name}) where {what} is {wanted}")
    ends = end_tokens(model, tokenizer)
    declared = {metadata.get("tokenizer.ggml.eos_token_id"), metadata.get("tokenizer.ggml.eot_token_id")}
    if expected.eot is not None and expected.eot not in declared:
        problems.append(f"the end of turn {tokenizer.convert_ids_to_tokens(expected.eot)!r} that every trained reply "
                        "ends with is not a stop token of the file")
    if problems:
        stop_check = Check("stop tokens in the file", False, "; ".join(problems))
    else:
        names = ", ".join(f"{tokenizer.convert_ids_to_tokens(token)!r} ({token})" for token in ends)
        stop_check = Check("stop tokens in the file", True,
                           f"EOS {expected.eos} and EOT {expected.eot}, as sftkit chat stops at {names}")
    return [template_check, stop_check]


def load_gguf(path: Path) -> tuple[Any, PreTrainedTokenizerBase]:
    """The model and tokenizer transformers builds from the GGUF file alone."""
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def check_gguf(path: Path, trained: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
               type_name: str, trained_dtype: torch.dtype, expected: Sequence[Answer],
               max_new_tokens: int) -> list[Check]:
    """The file's metadata, and transformers' reading of it, against the trained model (in float32)."""
    checks = check_metadata(path, tokenizer, trained)
    reader = "transformers' GGUF reader"
    try:
        model, file_tokenizer = load_gguf(path)
    except Exception as error:  # noqa: BLE001 - a file the consumer cannot read is the finding, not a crash
        return [*checks, Check(f"the file loads ({reader})", False, _first_line(error))]
    checks.append(compare_tokenizers(tokenizer, file_tokenizer, prompts, reader))
    bound = tolerance(type_name, trained_dtype)
    checks.append(compare_logits(trained, model, tokenizer, prompts, bound, reader))
    # The file's own tokenizer and chat template render the prompts and decide where the answer ends.
    checks.append(compare_answers(expected, answers(model, file_tokenizer, prompts, max_new_tokens), tokenizer,
                                  reader, required=not bound[1]))
    return checks


def check_folder(folder: Path, trained: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                 type_name: str, trained_dtype: torch.dtype, expected: Sequence[Answer],
                 max_new_tokens: int) -> tuple[list[Check], Any, PreTrainedTokenizerBase]:
    """The Hugging Face folder as vLLM loads it (transformers' config, weights, tokenizer, generation config)."""
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        folder_tokenizer = AutoTokenizer.from_pretrained(folder)
    reader = "transformers, from the folder"
    checks = [compare_tokenizers(tokenizer, folder_tokenizer, prompts, reader)]
    template_file = folder / "chat_template.jinja"
    checks.append(Check("chat template file", template_file.is_file() and template_file.read_text()
                        == tokenizer.chat_template, f"{template_file.name}: the trained tokenizer's chat template"))
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    ends = end_tokens(trained, tokenizer)
    missing = [token for token in ends if token not in eos]
    names = ", ".join(f"{tokenizer.convert_ids_to_tokens(token)!r} ({token})" for token in ends)
    checks.append(Check("stop tokens in generation_config.json", not missing,
                        f"eos_token_id {eos}: sftkit chat stops at {names}" + (
                            f"; missing {missing}" if missing else "")))
    bound = tolerance(type_name, trained_dtype)
    checks.append(compare_logits(trained, model, tokenizer, prompts, bound, reader))
    checks.append(compare_answers(expected, answers(model, folder_tokenizer, prompts, max_new_tokens), tokenizer,
                                  reader, required=not bound[1]))
    return checks, model, folder_tokenizer


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _first_difference(expected: list[int], got: list[int]) -> int:
    return next((at for at, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))


def check_llama_cpp(path: Path, trained: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                    expected: Sequence[Answer], max_new_tokens: int, type_name: str,
                    trained_dtype: torch.dtype) -> list[Check]:
    """llama.cpp (through llama-cpp-python) loads the file, renders each prompt with the chat template it finds
    there (llama-cpp-python's Jinja renderer), tokenizes it as the trained tokenizer does, gives the trained logits,
    and greedy-decodes what sftkit chat answers, stopping at the same token by its own end-of-generation rule."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    reader = "llama.cpp"
    # Half the cores: llama.cpp's threads wait for each other by spinning, which a busy machine makes slow. Its
    # caches in float32: the comparison is of the weights, not of an f16 cache.
    threads = max(1, (os.cpu_count() or 2) // 2)
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                                  logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                                  type_v=llama_cpp.GGML_TYPE_F32)
    except (ValueError, RuntimeError) as error:  # llama.cpp refuses the file: the finding, not a crash
        return [Check(f"the file loads ({reader})", False, f"{_first_line(error)} {log.getvalue()[-300:]}".strip())]
    template = llm.metadata.get("tokenizer.chat_template")
    formatter = template and Jinja2ChatFormatter(
        template=template, eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token=llm._model.token_get_text(llm.token_bos()))
    problems, tokens = [], 0
    for index, prompt in enumerate(prompts):
        text = render(tokenizer, prompt.messages, None, generation_prompt=True)
        if not formatter:
            problems.append("llama.cpp finds no chat template in the file")
        elif formatter(messages=prompt.messages).prompt != text:
            problems.append(f"prompt {index}: the file's chat template, rendered by llama-cpp-python, differs")
        want, got = _ids(tokenizer, text), llm.tokenize(text.encode(), add_bos=False, special=True)
        tokens += len(want)
        if got != want:
            problems.append(f"prompt {index}: llama.cpp's token {_first_difference(want, got)} differs")
    checks = [Check(f"prompts and token ids ({reader})", not problems, "; ".join(dict.fromkeys(problems)) or (
        f"{len(prompts)} prompts rendered from the file's chat template as sftkit renders them, tokenized to the same "
        f"{tokens} ids"))]

    worst, largest, positions = 0.0, 0.0, 0
    for prompt in prompts:
        ids = _ids(tokenizer, render(tokenizer, conversation(prompt), None))
        llm.reset()
        llm.eval(ids)
        want = _logits(trained, ids)
        worst = max(worst, (want - torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)).abs().max().item())
        largest = max(largest, want.abs().max().item())
        positions += len(ids)
    limit, relative = tolerance(type_name, trained_dtype)
    allowed = max(limit * largest if relative else limit, LLAMA_CPP_EXACT * largest)
    checks.append(Check(f"logits ({reader})", worst <= allowed,
                        f"largest |difference| {worst:.3g} over {positions} positions of {len(prompts)} conversations "
                        f"(allowed {allowed:.3g}: llama.cpp's kernels sum in their own order, so at least "
                        f"{LLAMA_CPP_EXACT:g} x the largest |logit| {largest:.3g})"))

    mismatches, ends = [], set()
    for index, (prompt, reply) in enumerate(zip(prompts, expected, strict=True)):
        ids = _ids(tokenizer, render(tokenizer, prompt.messages, None, generation_prompt=True))
        generated, end = [], None
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):  # llama.cpp's own end of generation
                end = token
                break
            generated.append(token)
            if len(generated) == max_new_tokens:
                break
        # llama.cpp's own reading of the tokens, as its users see the answer.
        got = Answer(llm.detokenize(generated).decode("utf-8", errors="replace").strip(),
                     len(generated) + (end is not None), end)
        ends.add(describe_end(tokenizer, got))
        if (got.text, got.new_tokens, got.end_token) != (reply.text, reply.new_tokens, reply.end_token):
            mismatches.append(f"prompt {index}: llama.cpp says {got.text!r} ({got.new_tokens} tokens, "
                              f"{describe_end(tokenizer, got)}), sftkit chat {reply.text!r} ({reply.new_tokens} "
                              f"tokens, {describe_end(tokenizer, reply)})")
    detail = (f"{len(prompts) - len(mismatches)} of {len(prompts)} greedy answers the same as sftkit chat's, token "
              f"for token, llama.cpp stopping at {', '.join(sorted(ends))}")
    if mismatches:
        detail += f"; {mismatches[0]}" + (" (a type that rounds the weights may turn a near tie)" if relative else "")
    checks.append(Check(f"greedy answers ({reader})", not mismatches or relative, detail))
    return checks


def sample_request(prompt: Prompt, reply: Answer) -> Check:
    """The answer the exported model gives to a line of samples.md is the one written there."""
    same = reply.text == prompt.answer
    return Check("a line of samples.md", same,
                 f"held-out row {prompt.row} at step {prompt.step}: {reply.text!r}"
                 + ("" if same else f" where samples.md says {prompt.answer!r}"))


def failed(checks: Sequence[Check]) -> list[Check]:
    return [check for check in checks if not check.passed]

