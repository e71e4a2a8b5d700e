"""Loss curves as a picture: train loss, held-out loss and learning rate against step, and the losses against
tokens seen. A run draws ``output_dir/loss.png`` at every save and at the end (``sftkit.outputs.callbacks``, so a crashed run
has one too); ``sftkit plot`` draws several runs on one figure, each labelled by what differs between their run records.

matplotlib draws on its Agg canvas (no display, no backend switched for the process); a run without matplotlib
says so once and trains on.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sftkit.errors import SftkitError
from sftkit.train.run_record import RECORD_NAME

LOSS_PLOT = "loss.png"
STATE_FILE = "trainer_state.json"
INSTALL = "pip install 'sftkit[plot]'"
# Recipe keys that differ between any two runs without making them different runs.
NOT_LABELS = ("output_dir", "run_name", "logging_dir", "resume_from_checkpoint")


@dataclass(frozen=True)
class RunHistory:
    label: str
    history: list[dict[str, Any]]  # the trainer's log history: one entry a logging step or evaluation


@dataclass(frozen=True)
class Series:
    steps: list[int]
    values: list[float]
    tokens: list[float | None]  # tokens seen by then, where logged


def series(history: list[dict[str, Any]], key: str, tokens_key: str | None = None) -> Series:
    """``key`` at each step it was logged (the last value when a step logged it twice)."""
    by_step = {entry["step"]: (entry[key], entry.get(tokens_key)) for entry in history if key in entry}
    steps = sorted(by_step)
    return Series(steps, [by_step[step][0] for step in steps], [by_step[step][1] for step in steps])


def describe(run: RunHistory) -> str:
    """One line: the steps and how the losses moved (the picture's description, readable without opening it)."""
    train, held_out = series(run.history, "loss"), series(run.history, "eval_loss")
    if not train.steps and not held_out.steps:
        return f"{run.label}: no loss logged yet"
    parts = []
    if train.steps:
        parts.append(f"steps {train.steps[0]}-{train.steps[-1]}, train loss {train.values[0]:.4f} -> "
                     f"{train.values[-1]:.4f}")
    if held_out.steps:
        parts.append(f"held-out loss {held_out.values[0]:.4f} -> {held_out.values[-1]:.4f} at steps "
                     f"{held_out.steps[0]}-{held_out.steps[-1]}")
    return f"{run.label}: " + ", ".join(parts)


def draw(runs: list[RunHistory], path: Path, title: str) -> None:
    """The figure of ``runs``, written to ``path`` in one move (a reader never sees half a picture)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(16, 5), layout="constrained")
    figure.suptitle(title)
    by_step, by_tokens, rate = figure.subplots(1, 3)
    held_out_style = {"linestyle": "--", "marker": "o", "markersize": 3}
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        train = series(run.history, "loss", "num_tokens")
        held_out = series(run.history, "eval_loss", "eval_num_tokens")
        for curve, style in ((train, {}), (held_out, held_out_style)):
            by_step.plot(curve.steps, curve.values, color=colour, **style)
            points = [(tokens, value) for tokens, value in zip(curve.tokens, curve.values, strict=True)
                      if tokens is not None]
            by_tokens.plot([tokens for tokens, _ in points], [value for _, value in points], color=colour, **style)
        learning_rate = series(run.history, "learning_rate")
        rate.plot(learning_rate.steps, learning_rate.values, color=colour)
    by_step.set(title="loss against step", xlabel="step", ylabel="loss")
    by_tokens.set(title="loss against tokens seen", xlabel="tokens seen", ylabel="loss")
    rate.set(title="learning rate", xlabel="step", ylabel="learning rate")
    for axes in (by_step, by_tokens, rate):
        axes.grid(alpha=0.3)
    handles = [Line2D([], [], color="black", label="train loss"),
               Line2D([], [], color="black", label="held-out loss", **held_out_style)]
    if len(runs) > 1:
        handles += [Line2D([], [], color=f"C{index % 10}", linewidth=4, label=run.label)
                    for index, run in enumerate(runs)]
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png", dpi=100, metadata={
        "Title": title, "Description": "\n".join(describe(run) for run in runs)})
    os.replace(partial, path)


def drawable(run: RunHistory) -> bool:
    """Whether the run has logged a loss to draw."""
    return bool(series(run.history, "loss").steps or series(run.history, "eval_loss").steps)


def matplotlib_installed() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


# ---------------------------------------------------------------- sftkit plot


def _history(directory: Path) -> list[dict[str, Any]]:
    """The log history of the run in ``directory``: its own, or its latest checkpoint's if that is further along
    (a run that stopped early)."""
    candidates = [directory / STATE_FILE, *directory.glob(f"checkpoint-*/{STATE_FILE}")]
    states = [json.loads(path.read_text()) for path in candidates if path.is_file()]
    if not states:
        raise SftkitError(f"{directory}: no {STATE_FILE}, in it or in a checkpoint-* folder, so no history to plot. "
                          "Name a run's output_dir: a run writes its history at each save and at the end.")
    return max(states, key=lambda state: state.get("global_step", 0))["log_history"]


def _recipe(directory: Path) -> dict[str, Any] | None:
    path = directory / RECORD_NAME
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("recipe") or {}


def _value(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def labels(directories: list[str], recipes: list[dict[str, Any] | None]) -> list[str]:
    """Each run's label: the recipe keys whose values differ between the runs (output_dir and the like aside; a key
    a recipe left out reads "default"); the directories as given when nothing differs or a run has no record."""
    if len(recipes) < 2 or any(recipe is None for recipe in recipes):
        return list(directories)
    keys = sorted({key for recipe in recipes for key in recipe} - set(NOT_LABELS))
    differing = [key for key in keys
                 if len({json.dumps(recipe.get(key, "default"), default=str, sort_keys=True) for recipe in recipes}) > 1]
    if not differing:
        return list(directories)
    shown, more = differing[:4], f", +{len(differing) - 4} more" if len(differing) > 4 else ""
    return [", ".join(f"{key}={_value(recipe.get(key, 'default'))}" for key in shown) + more for recipe in recipes]


def plot_runs(directories: list[str], output: str) -> list[RunHistory]:
    """Draw the runs in ``directories`` on one figure at ``output``; the runs as drawn."""
    if not matplotlib_installed():
        raise SftkitError(f"sftkit plot draws with matplotlib, which is not installed: {INSTALL}")
    paths = [Path(directory) for directory in directories]
    for path in paths:
        if not path.is_dir():
            raise SftkitError(f"{path}: no such directory; name the output_dir of a run")
    histories = [_history(path) for path in paths]
    runs = [RunHistory(label, history) for label, history
            in zip(labels(directories, [_recipe(path) for path in paths]), histories, strict=True)]
    if not any(drawable(run) for run in runs):
        raise SftkitError(f"nothing to draw: {' and '.join(directories)} logged no loss yet (a run logs its loss every "
                          "logging_steps steps and at its last step)")
    draw(runs, Path(output), f"loss curves of {len(runs)} runs" if len(runs) > 1 else f"loss curves of {directories[0]}")
    return runs
