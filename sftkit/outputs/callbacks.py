"""What a training run writes for people to look at, as trainer callbacks: the loss curves (``loss.png``) and the
sample answers (``samples.jsonl``, ``samples.md``); and their lines in the final summary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase, TrainerCallback

from sftkit.data.prepared import PreparedData
from sftkit.outputs.plot import INSTALL, LOSS_PLOT, RunHistory, draw, drawable, matplotlib_installed
from sftkit.outputs.samples import SampleAnswers, sample_answers
from sftkit.recipe import Recipe

logger = logging.getLogger(__name__)


def output_callbacks(recipe: Recipe, data: PreparedData, tokenizer: PreTrainedTokenizerBase) -> list[TrainerCallback]:
    """The callbacks that draw the loss curves and answer held-out prompts, those that can run here."""
    callbacks = [loss_curves(recipe.training.output_dir), sample_answers(recipe, data, tokenizer)]
    return [callback for callback in callbacks if callback is not None]


def summary_lines(trainer: Any) -> list[str]:
    """What the output callbacks wrote, for the final summary."""
    return [line for callback in trainer.callback_handler.callbacks
            if isinstance(callback, (LossCurves, SampleAnswers)) for line in callback.summary_lines()]


class LossCurves(TrainerCallback):
    """Redraws ``output_dir/loss.png`` at every save and at the end of the run, the final evaluation included."""

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / LOSS_PLOT
        self.label = Path(output_dir).name
        self.drawn = self.trained = False

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._draw(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trained = True
        self._draw(state)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trained:  # the evaluation after training: its loss belongs in the final picture
            self._draw(state)

    def _draw(self, state: Any) -> None:
        run = RunHistory(self.label, state.log_history)
        if state.is_world_process_zero and drawable(run):
            draw([run], self.path, f"loss curves of {self.label}")
            self.drawn = True

    def summary_lines(self) -> list[str]:
        return [f"loss curves    {self.path}" if self.drawn else "loss curves    nothing to draw: no loss was logged"]


def loss_curves(output_dir: str) -> LossCurves | None:
    """The callback that draws the run's loss curves; None, said once, without matplotlib."""
    if not matplotlib_installed():
        logger.info("loss curves: matplotlib is not installed, so no %s is drawn (%s; then sftkit plot %s draws "
                    "it from the saved history)", LOSS_PLOT, INSTALL, output_dir)
        return None
    return LossCurves(output_dir)
