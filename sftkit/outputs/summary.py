"""The end-of-run summary: what was trained, how fast, how the loss moved, what was written where, and one sample
answer."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sftkit.data.account import SourceAccount, account_lines
from sftkit.outputs.callbacks import summary_lines
from sftkit.train.trainer import SftkitTrainer


def _losses(log_history: list[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    values = [entry[key] for entry in log_history if key in entry]
    return (values[0], values[-1]) if values else (None, None)


def summarise(trainer: SftkitTrainer, totals: dict[str, int], written: dict[str, str], on_demand: bool,
              accounts: list[SourceAccount], noted: Counter) -> str:
    """A few lines for the terminal; ``totals`` are the trainer's counts summed over every process; ``noted``, what
    preparation noted of the train rows (a lazy run's: of its sample); a mixture adds each source's account of the
    train rows and its held-out loss."""
    seen, trained = totals["tokens_fed"], totals["tokens_trained"]
    history = trainer.state.log_history
    runtime = next((entry["train_runtime"] for entry in reversed(history) if "train_runtime" in entry), None)
    first, last = _losses(history, "loss")
    eval_first, eval_last = _losses(history, "eval_loss")
    lines = [f"steps          {trainer.state.global_step}"]
    lines.append(f"tokens         {trained:,} trained of {seen:,} fed")
    if on_demand:
        lines.append(f"rows           {totals['rows_drawn']:,} drawn and prepared on demand, "
                     f"{totals['rows_invalid']:,} invalid")
    over = " (in the sample prepared before step 1)" if on_demand else ""
    lines += [f"{'noted' if index == 0 else '':<14} {count:,} {note}{over}"
              for index, (note, count) in enumerate(noted.most_common())]
    if runtime:
        lines.append(f"throughput     {seen / runtime:,.0f} tokens/s over {runtime:.1f} s")
    if first is not None:
        lines.append(f"train loss     {first:.4f} (first logged) -> {last:.4f} (last logged)")
    if eval_first is not None:
        lines.append(f"held-out loss  {eval_first:.4f} (first eval) -> {eval_last:.4f} (last eval)")
    width = max(map(len, trainer.eval_by_source), default=0)
    for name in trainer.eval_by_source:
        source_first, source_last = _losses(history, f"eval_{name}_loss")
        if source_first is not None:
            lines.append(f"  {name:<{width}}  {source_first:.4f} -> {source_last:.4f}")
    if len({account.source for account in accounts}) > 1:
        lines.append("sources        " + "\n               ".join(
            account_lines([account for account in accounts if account.split == "train"])))
    lines += [f"{label:<14} {path}" for label, path in written.items()]
    lines += summary_lines(trainer)  # loss.png, the sample answers and one of them
    return "\n".join(lines)
