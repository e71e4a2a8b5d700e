"""Sample answers: a few held-out conversations answered by the model at each evaluation and at the end of the run,
beside the reference answer, so that a person sees what the model says and how it changes as it trains.

They go to ``output_dir/samples.jsonl`` (one line an answer) and ``output_dir/samples.md`` (each prompt with its
reference and the answer at every step), rewritten each time; the final summary prints one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from sftkit.contract import is_conversation, record_shape
from sftkit.data.prepared import PreparedData
from sftkit.errors import SftkitError
from sftkit.outputs.generation import answer
from sftkit.recipe import Recipe

logger = logging.getLogger(__name__)

SAMPLES_JSONL = "samples.jsonl"
SAMPLES_MARKDOWN = "samples.md"
CUT = "max_new_tokens"  # what an answer stopped at when it was cut


@dataclass(frozen=True)
class HeldOutPrompt:
    row: int  # the row of the dataset it was held out from
    messages: list[dict[str, Any]]  # the conversation up to its last reply
    tools: list | None
    reference: str  # the last reply, as the data has it


def _reply_text(message: dict[str, Any]) -> str:
    calls = message.get("tool_calls")
    return message["content"] or (json.dumps(calls, ensure_ascii=False) if calls else "")


def _held_out_prompt(row: int, record: dict[str, Any]) -> HeldOutPrompt | None:
    """A conversation cut before its last reply; None for a record that is not a conversation."""
    if not is_conversation(record):
        return None
    if record_shape(record) == "messages":
        messages = record["messages"]
        return HeldOutPrompt(row, messages[:-1], record.get("tools"), _reply_text(messages[-1]))
    if isinstance(record["completion"], list):
        reference = "\n".join(_reply_text(message) for message in record["completion"])
        return HeldOutPrompt(row, record["prompt"], record.get("tools"), reference)
    return None


def held_out_prompts(data: PreparedData, count: int) -> tuple[list[HeldOutPrompt], str | None]:
    """The first ``count`` (at least 1) valid held-out rows that are conversations, as prompts; or why there are
    none."""
    if count < 1:
        raise SftkitError(f"eval_samples must be 0 (no sample answers) or more, got {count}")
    if data.eval is None:
        return [], "no held-out rows: set test_split_size (or dataset_test_split) to have some"
    prompts: list[HeldOutPrompt] = []
    rows = data.eval.rows
    for position, (row, invalid) in enumerate(zip(rows["row"], rows["invalid"], strict=True)):
        if len(prompts) == count:
            break
        if invalid is None and (prompt := _held_out_prompt(row, data.eval.record(position))) is not None:
            prompts.append(prompt)
    if not prompts:
        return [], "the held-out rows are not conversations (text, or prompt and completion as plain text)"
    return prompts, None


@dataclass(frozen=True)
class Sample:
    step: int
    row: int
    prompt: list[dict[str, Any]]
    reference: str
    answer: str
    stopped_at: str  # the end token it stopped at (the end of turn), or max_new_tokens when it was cut


def _quoted(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.splitlines() or [""])


def _markdown(samples: list[Sample], max_new_tokens: int) -> str:
    about = ("Held-out prompts answered by the model with its chat template and generation config, at each "
             f"evaluation and at the end of training (each answer at most {max_new_tokens} new tokens).")
    lines = ["# Sample answers", "", about, ""]
    for row in dict.fromkeys(sample.row for sample in samples):
        answers = [sample for sample in samples if sample.row == row]
        lines += [f"## Held-out row {row}", ""]
        lines += [f"**{message['role']}**\n\n{_quoted(message['content'])}\n" for message in answers[0].prompt]
        lines += [f"**reference answer**\n\n{_quoted(answers[0].reference)}\n"]
        for sample in answers:
            cut = " (cut at max_new_tokens)" if sample.stopped_at == CUT else ""
            lines += [f"**answer at step {sample.step}**{cut}\n\n{_quoted(sample.answer)}\n"]
    return "\n".join(lines)


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


class SampleAnswers(TrainerCallback):
    """Answers the held-out prompts at each evaluation and at the end of training, once a step, and writes them
    down from the main process. A model sharded over the processes (ZeRO-3, FSDP) answers on all of them
    together, as its forward passes need every process."""

    def __init__(self, prompts: list[HeldOutPrompt], output_dir: str, max_new_tokens: int, sharded: bool) -> None:
        self.prompts = prompts
        self.output_dir = Path(output_dir)
        self.max_new_tokens = max_new_tokens
        self.sharded = sharded
        self.samples: list[Sample] = []
        self.steps: set[int] = set()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.samples = self._written(before=state.global_step)  # a resumed run keeps the answers of its first part

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                    **kwargs: Any) -> None:
        self._answer(state, model, processing_class)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                     **kwargs: Any) -> None:
        self._answer(state, model, processing_class)

    def _answer(self, state: Any, model: Any, tokenizer: Any) -> None:
        step, main = state.global_step, state.is_world_process_zero
        if step in self.steps or not (main or self.sharded):
            return
        self.steps.add(step)
        answers = answer(model, tokenizer, [prompt.messages for prompt in self.prompts], self.max_new_tokens,
                         tools=[prompt.tools for prompt in self.prompts])
        if not main:
            return
        self.samples += [Sample(step, prompt.row, prompt.messages, prompt.reference, reply.text,
                                CUT if reply.end_token is None else tokenizer.convert_ids_to_tokens(reply.end_token))
                         for prompt, reply in zip(self.prompts, answers, strict=True)]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(asdict(sample), ensure_ascii=False) + "\n" for sample in self.samples)
        (self.output_dir / SAMPLES_JSONL).write_text(lines)
        (self.output_dir / SAMPLES_MARKDOWN).write_text(_markdown(self.samples, self.max_new_tokens))

    def _written(self, before: int) -> list[Sample]:
        path = self.output_dir / SAMPLES_JSONL
        if before == 0 or not path.is_file():
            return []
        samples = [Sample(**json.loads(line)) for line in path.read_text().splitlines() if line]
        return [sample for sample in samples if sample.step < before]

    def summary_lines(self) -> list[str]:
        """Where the answers are, and the last answer to the first prompt beside its reference."""
        if not self.samples:
            return []
        steps = sorted({sample.step for sample in self.samples})
        last = next(sample for sample in reversed(self.samples) if sample.row == self.prompts[0].row)
        shown = ", ".join(map(str, steps[:6])) + (f", ... {steps[-1]}" if len(steps) > 6 else "")
        where = f"{self.output_dir / SAMPLES_MARKDOWN} ({len(self.prompts)} held-out prompts, answered at steps {shown})"
        return [f"samples        {where}",
                f"sample         held-out row {last.row}, step {last.step}:",
                f"  prompt       {_one_line(last.prompt[-1]['content'])}",
                f"  reference    {_one_line(last.reference)}",
                f"  answer       {_one_line(last.answer)}"]


def sample_answers(recipe: Recipe, data: PreparedData, tokenizer: PreTrainedTokenizerBase) -> SampleAnswers | None:
    """The callback that answers ``eval_samples`` held-out prompts; None, with a note saying why, when there are none."""
    if recipe.sftkit.eval_samples == 0:
        return None
    prompts, why = held_out_prompts(data, recipe.sftkit.eval_samples)
    if not prompts:
        logger.info("sample answers: skipped: %s", why)
        return None
    # An answer may run to twice the longest reference: one cut there shows a model that has not learned to stop.
    longest = max(len(tokenizer(prompt.reference, add_special_tokens=False)["input_ids"]) for prompt in prompts)
    sharded = (is_deepspeed_zero3_enabled() or bool(recipe.training.fsdp)
               or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")
    return SampleAnswers(prompts, recipe.training.output_dir, 2 * longest + 16, sharded)
