"""``sftkit export``: a run or checkpoint (a LoRA run merged into its base first) written for a consumer, checked
against the trained model, and described in ``OUT/export_report.md``: the files, each check with its numbers,
and the command that runs the model.

- ``gguf``: ``OUT/NAME-TYPE.gguf`` for llama.cpp (and anything built on it).
- ``ollama``: the same file and ``OUT/Modelfile``, with the ``ollama create`` line.
- ``vllm``: ``OUT`` is a Hugging Face folder, with the ``vllm serve`` line and a request that reproduces an
  answer of ``samples.md``.

The files are written first and kept whatever the checks say; a check that fails stops the command with an error
that names it, so an export that would answer differently is never taken for a good one.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftkit.errors import SftkitError
from sftkit.export import checks as proof
from sftkit.export.checks import Check, Prompt
from sftkit.outputs.generation import answer
from sftkit.outputs.samples import SAMPLES_JSONL, SAMPLES_MARKDOWN
from sftkit.outputs.trained import find_trained, open_trained
from sftkit.train.model import stop_on_end_of_turn

TARGETS = ("gguf", "ollama", "vllm")
TYPES = ("f32", "f16", "bf16", "q8_0")
REPORT = "export_report.md"
INSTALL = 'pip install "sftkit[export]"'
# Asked when a run has no samples.jsonl to take held-out prompts from.
PROBES = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Name a capital city."}],
          [{"role": "system", "content": "You are a concise assistant."},
           {"role": "user", "content": "Say hello in one word."}]]
DEFAULT_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass
class Exported:
    output: Path
    target: str
    type_name: str
    files: list[str] = field(default_factory=list)  # one line a file: its name and what it holds
    checks: list[Check] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked here, and why
    report: Path | None = None


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SftkitError(f"writing GGUF needs the gguf package (llama.cpp's GGUF writer): {INSTALL}")


def _refuse_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise SftkitError(f"{output} already exists and is not an empty directory; name a new one (sftkit export "
                          "writes over nothing)")


def model_name(directory: Path) -> str:
    """A name for the model in Ollama and vLLM: the run's directory (and checkpoint), in the letters Ollama takes."""
    parts = [directory.parent.name, directory.name] if directory.name.startswith("checkpoint-") else [directory.name]
    return re.sub(r"[^a-z0-9._-]+", "-", "-".join(parts).lower()).strip("-._") or "model"


def _weights_step(directory: Path) -> int | None:
    if match := re.fullmatch(r"checkpoint-(\d+)", directory.name):
        return int(match.group(1))
    state = directory / "trainer_state.json"
    try:
        return int(json.loads(state.read_text())["global_step"]) if state.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None


def held_out(directory: Path) -> tuple[list[Prompt], str]:
    """The run's held-out prompts (from samples.jsonl, beside the model or in the run holding the checkpoint) with
    the answers the model gave at the step of these weights, and where they came from."""
    step = _weights_step(directory)
    for folder in (directory, directory.parent):
        path = folder / SAMPLES_JSONL
        if not path.is_file():
            continue
        try:
            samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            rows: dict[Any, Prompt] = {}
            for sample in samples:
                at_step = sample["step"] == step
                if sample["row"] not in rows or at_step:
                    rows[sample["row"]] = Prompt(sample["prompt"], sample["reference"], sample["row"],
                                                 sample["step"] if at_step else None,
                                                 sample["answer"] if at_step else None)
        except (ValueError, KeyError, TypeError):
            continue  # a file cut short or from another program: the probes below stand in
        if rows:
            listed = ", ".join(str(row) for row in rows)
            return list(rows.values()), f"{len(rows)} held-out prompts of {path} (rows {listed})"
    return [Prompt(messages, None) for messages in PROBES], (
        f"{len(PROBES)} probe prompts (no {SAMPLES_JSONL} in {directory}: the run answered no held-out prompts)")


def _max_new_tokens(tokenizer: Any, prompts: list[Prompt]) -> int:
    """As sample answers are bounded: twice the longest reference answer, plus 16."""
    references = [prompt.reference for prompt in prompts if prompt.reference]
    if not references:
        return 32
    return 2 * max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in references) + 16


def _greedy(model: Any) -> bool:
    return not getattr(model.generation_config, "do_sample", False)


def _stop_texts(model: Any, tokenizer: Any) -> list[str]:
    return list(dict.fromkeys(tokenizer.convert_ids_to_tokens(token) for token in proof.end_tokens(model, tokenizer)))


def _size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def export(source: str, target: str, output: str, type_name: str | None = None, progress: bool = True) -> Exported:
    """Export the model in ``source`` for ``target`` into the new directory ``output``, check it, and report."""
    if target not in TARGETS:
        raise SftkitError(f"--to {target}: sftkit export writes {', '.join(TARGETS)}")
    if type_name is not None and type_name not in TYPES:
        raise SftkitError(f"--type {type_name}: sftkit export writes {', '.join(TYPES)}")
    out = Path(output)
    _refuse_output(out)
    if target != "vllm":
        _require_gguf()
    directory, _ = find_trained(source)
    trained = open_trained(source)
    model, tokenizer = trained.model, trained.tokenizer
    if trained.base is not None:
        model = model.merge_and_unload()  # as sftkit merge does: the consumers load a full model
    stop_on_end_of_turn(model.generation_config, tokenizer)
    if not tokenizer.chat_template:
        raise SftkitError(f"{source}: its tokenizer has no chat template, so no consumer could render a "
                          "conversation as training did; train with chat_template_path set to give it one")
    trained_dtype = next(model.parameters()).dtype
    type_name = type_name or DEFAULT_TYPES.get(trained_dtype, "f32")
    if target == "vllm" and type_name == "q8_0":
        raise SftkitError("--type q8_0 is a GGUF quantisation; --to vllm writes f32, f16 or bf16 (vLLM quantises a "
                          "folder itself: vllm serve --quantization fp8)")
    if target != "vllm":
        from sftkit.export.gguf_file import architecture, vocabulary

        architecture(model.config)  # refused before anything is written
        vocabulary(tokenizer, model.config)
    name = model_name(directory)
    prompts, prompts_from = held_out(directory)
    reference = proof.float32(model)
    max_new_tokens = _max_new_tokens(tokenizer, prompts)
    expected = proof.answers(reference, tokenizer, prompts, max_new_tokens)
    exported = Exported(out, target, type_name)
    out.mkdir(parents=True, exist_ok=True)
    described = trained.describe(str(directory)) + (", merged" if trained.base else "")
    if target == "vllm":
        _export_vllm(exported, model, tokenizer, reference, prompts, expected, max_new_tokens, trained_dtype, name)
    else:
        _export_gguf(exported, model, tokenizer, reference, prompts, expected, max_new_tokens, trained_dtype, name,
                     progress)
    exported.report = out / REPORT
    exported.report.write_text(report(exported, described, prompts_from))
    if failures := proof.failed(exported.checks):
        raise SftkitError(f"the export in {out} does not answer as the trained model does: "
                          + "; ".join(f"{check.name}: {check.detail}" for check in failures)
                          + f" (the files and {REPORT} are kept for a look)")
    return exported


def _export_gguf(exported: Exported, model: Any, tokenizer: Any, reference: Any, prompts: list[Prompt],
                 expected: list[Any], max_new_tokens: int, trained_dtype: torch.dtype, name: str,
                 progress: bool) -> None:
    from sftkit.export.gguf_file import write_gguf
    from sftkit.export.ollama import MODELFILE, modelfile

    out, type_name = exported.output, exported.type_name
    path = out / f"{name}-{type_name}.gguf"
    made = None
    if exported.target == "ollama":  # a chat template Ollama cannot be given is refused before anything is written
        made = modelfile(tokenizer, path.name, _stop_texts(model, tokenizer), _greedy(model),
                         [prompt.messages for prompt in prompts])
    written = write_gguf(model, tokenizer, path, type_name, name, progress)
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(written.types.items()))
    line = f"{path.name} ({_size(path)}): {sum(written.types.values())} tensors ({kinds})"
    if written.in_f16:
        line += (f"; {len(written.in_f16)} matrices are f16, their rows not a whole number of q8_0's blocks of 32 "
                 "values")
    exported.files.append(line)
    exported.checks += proof.check_gguf(path, reference, tokenizer, prompts, type_name, trained_dtype, expected,
                                        max_new_tokens)
    if proof.llama_cpp_available():
        exported.checks += proof.check_llama_cpp(path, reference, tokenizer, prompts, expected, max_new_tokens,
                                                 type_name, trained_dtype)
    else:
        exported.notes.append("llama.cpp's own checks did not run: llama-cpp-python is not installed here "
                              "(scripts/check_llamacpp.py builds it from source and runs them)")
    asked = next((prompt for prompt in prompts if prompt.messages[-1]["role"] == "user"), prompts[0])
    if made is None:
        sampling = ", temperature=0" if _greedy(model) else ""
        code = (f"from llama_cpp import Llama; llm = Llama({json.dumps(str(path))}, verbose=False); "
                f"print(llm.create_chat_completion({json.dumps(asked.messages, ensure_ascii=False)}{sampling})"
                '["choices"][0]["message"]["content"])')
        exported.commands += [f"llama-server -m {shlex.quote(str(path))} --jinja", f"python -c {shlex.quote(code)}"]
        return
    (out / MODELFILE).write_text(made.text)
    exported.files.append(f"{MODELFILE}: FROM ./{path.name}, the chat template as its TEMPLATE"
                          + (", the template's own system message as SYSTEM" if made.wrappers.default_system else "")
                          + f", {len(_stop_texts(model, tokenizer))} stop parameters")
    exported.checks.append(Check("Modelfile TEMPLATE", True, f"rendered as Ollama renders it, it gives the chat "
                                 f"template's text for {made.proved_on} conversations (the held-out prompts and a "
                                 "probe of three turns)"))
    exported.commands += [f"cd {shlex.quote(str(out))} && ollama create {name} -f {MODELFILE}",
                          f"ollama run {name} {shlex.quote(asked.messages[-1]['content'])}"]


def _export_vllm(exported: Exported, model: Any, tokenizer: Any, reference: Any, prompts: list[Prompt],
                 expected: list[Any], max_new_tokens: int, trained_dtype: torch.dtype, name: str) -> None:
    from sftkit.export import vllm

    out, type_name = exported.output, exported.type_name
    vllm.write_folder(model, tokenizer, out, type_name)
    exported.files += [f"{path.name} ({_size(path)})" for path in sorted(out.iterdir()) if path.name != REPORT]
    checks, folder_model, folder_tokenizer = proof.check_folder(out, reference, tokenizer, prompts, type_name,
                                                                trained_dtype, expected, max_new_tokens)
    exported.checks += checks
    sample = next((prompt for prompt in prompts if prompt.answer is not None), None)
    asked = sample or prompts[0]
    if sample is not None:
        [reply] = answer(folder_model, folder_tokenizer, [sample.messages], max_new_tokens)
        exported.checks.append(proof.sample_request(sample, reply))
    body = vllm.request(name, asked.messages, max_new_tokens, _greedy(model))
    (out / "request.json").write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    exported.files.append("request.json: the OpenAI-style request below")
    exported.commands += [vllm.serve_command(out, name, type_name), vllm.curl(body)]
    if sample is not None:
        exported.commands.append(f"# answers {sample.answer!r}, as {SAMPLES_MARKDOWN} says for held-out row "
                                 f"{sample.row} at step {sample.step}")


def report(exported: Exported, source: str, prompts_from: str) -> str:
    lines = [f"# sftkit export: {exported.target}, {exported.type_name}", "",
             f"- model: {source}", f"- checked on: {prompts_from}, in float32 on the CPU", "", "## Files", ""]
    lines += [f"- {line}" for line in exported.files]
    lines += ["", "## Checks", ""]
    lines += [f"- {'passed' if check.passed else 'FAILED'}: {check.name}: {check.detail}" for check in exported.checks]
    lines += [f"- not run: {note}" for note in exported.notes]
    lines += ["", "## Run it", "", "```bash", *exported.commands, "```", ""]
    return "\n".join(lines)
