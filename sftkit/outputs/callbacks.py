"""What a training run writes for people to look at, as trainer callbacks: the loss curves (``loss.png``) and the
sample answers (``samples.jsonl``, ``samples.md``); and their lines in the final summary."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase, TrainerCallback

from sftkit.data.prepared import PreparedData
from sftkit.outputs.plot import LossCurves, loss_curves
from sftkit.outputs.samples import SampleAnswers, sample_answers
from sftkit.recipe import Recipe


def output_callbacks(recipe: Recipe, data: PreparedData, tokenizer: PreTrainedTokenizerBase) -> list[TrainerCallback]:
    """The callbacks that draw the loss curves and answer held-out prompts, those that can run here."""
    callbacks = [loss_curves(recipe.training.output_dir), sample_answers(recipe, data, tokenizer)]
    return [callback for callback in callbacks if callback is not None]


def summary_lines(trainer: Any) -> list[str]:
    """What the output callbacks wrote, for the final summary."""
    return [line for callback in trainer.callback_handler.callbacks
            if isinstance(callback, (LossCurves, SampleAnswers)) for line in callback.summary_lines()]
