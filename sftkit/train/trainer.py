"""TRL's SFTTrainer, counting what it trains on, computing the loss without logits, and applying the bad-row
policy (``sftkit.data.bad_rows``) to rows met mid-run.

Nothing here waits for the GPU between steps: token counts arrive with each batch as integers
(``sftkit.train.counting``), and the counters of several processes are summed only when they are logged.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import SFTTrainer

from sftkit.data.bad_rows import MidRunRows, RowPolicy, summed
from sftkit.data.on_demand import INVALID_KEY, ROWS_KEY
from sftkit.train.counting import TOKENS_FED, TOKENS_TRAINED
from sftkit.train.head_loss import LABEL_POSITIONS, add_head_loss


class SftkitTrainer(SFTTrainer):
    """SFTTrainer that counts the training tokens fed and trained, and the rows drawn and found invalid.

    ``head_loss``: a kernel of ``sftkit.train.head_loss`` that computes the training loss from the hidden states,
    or None for TRL's own fused head (which also logs entropy and token accuracy).
    """

    def __init__(self, *args: Any, on_invalid: str = "error", max_invalid_fraction: float = 0.0,
                 known_invalid: set[int] | None = None, head_loss: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_loss = head_loss
        if head_loss is not None:
            add_head_loss(self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model,
                          head_loss)
        self.tokens_fed = self.tokens_trained = 0
        self.rows = MidRunRows(known_invalid or set())
        self.policy_stop: str | None = None
        self.add_callback(RowPolicy(self, self.rows, on_invalid, max_invalid_fraction))

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        fed, trained = inputs.pop(TOKENS_FED, 0), inputs.pop(TOKENS_TRAINED, 0)
        positions = inputs.pop(LABEL_POSITIONS, None)
        invalid, drawn = inputs.pop(INVALID_KEY, []), inputs.pop(ROWS_KEY, None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.tokens_fed += fed
        self.tokens_trained += trained
        self.rows.count(invalid, drawn if drawn is not None else inputs["labels"].shape[0], self.state.global_step + 1)
        if self.head_loss is None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        summed_loss = model(**inputs, sftkit_head_loss=True, **{LABEL_POSITIONS: positions})
        # As TRL divides: by the tokens of the whole optimizer step (all processes, when averaged across them).
        tokens = num_items_in_batch if num_items_in_batch is not None else trained
        loss = summed_loss / torch.as_tensor(tokens, device=summed_loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Tokens seen, counted by the collators, summed over the processes only here, when logged."""
        self._total_train_tokens = summed(self.accelerator, self.tokens_fed)[0]
        self._metrics["train" if self.model.training else "eval"]["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)

    def totals(self) -> dict[str, int]:
        """Counts summed over every process (every process must call it)."""
        counts = {"tokens_fed": self.tokens_fed, "tokens_trained": self.tokens_trained,
                  "rows_drawn": self.rows.drawn, "rows_invalid": self.rows.invalid}
        return dict(zip(counts, summed(self.accelerator, *counts.values()), strict=True))
