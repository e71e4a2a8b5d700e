"""The row chain: one raw row of a source -> canonical record -> token ids and labels, or why it cannot train.

Every way through the data uses it: eager preparation (in batched passes), lazy preparation (a row at a
time, as the trainer draws it), a packed run's share, ``sftkit check`` and ``sftkit.testing``. The steps:

1. the adapter converts the raw row (``Adapter.convert``) into a canonical record;
2. the record is checked (roles, content, tool calls, a trained turn at the end);
3. the chat template renders it (conversations) and the tokenizer tokenizes it;
4. labels are masked from the trained spans, and the length policy (``max_length``, ``long_rows``) applied;
   what a reader should know about a row that trains (turns left untrained, reasoning the template does not
   render, a cut to ``max_length``) is noted with it.

Whatever code that is not sftkit's raises on a row (an adapter's bug, a template's ``raise_exception``, a
tokenizer) becomes that row's ``RowError``, with a reason and the original message, and follows the
bad-row policy like any other invalid row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from sftkit.contract import Adapter, RowError
from sftkit.data.adapt import check_record
from sftkit.data.tokenization import TokenizeSettings, tokenize_records
from sftkit.errors import SftkitError

ADAPTER_FAILED = "rejected by adapter"
PREPARED = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),  # before truncation; 0 for rows that did not tokenize
        "invalid": datasets.Value("string"),  # the reason, for a row that cannot train
        "problem": datasets.Value("string"),  # what exactly is wrong with it
        "notes": datasets.Sequence(datasets.Value("string")),  # what is worth knowing about a row that trains
    }
)


def to_record(adapter: Adapter, options: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    """Steps 1 and 2: the canonical record of a raw row; RowError when the row cannot be one."""
    try:
        record = adapter.convert(row, options)
    except (RowError, SftkitError):
        raise
    except Exception as error:  # noqa: BLE001 - the adapter is a plugin's code: its failure is this row's
        raise RowError(f"adapter {adapter.name!r} failed on this row: {type(error).__name__}: {error}",
                       reason=ADAPTER_FAILED) from None
    check_record(record)
    return record


@dataclass(frozen=True)
class RowChain:
    """The chain for one source: its adapter and options, the tokenizer that renders rows, the token settings."""

    adapter: Adapter
    options: Mapping[str, Any]
    tokenizer: PreTrainedTokenizerBase
    settings: TokenizeSettings

    def record(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Steps 1 and 2 (``to_record``) with this source's adapter and options, on the declared columns."""
        declared = self.adapter.columns(self.options).all
        return to_record(self.adapter, self.options, {column: row.get(column) for column in declared})

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any] | RowError]:
        """Every step for each of ``rows``: ``{input_ids, labels, length, notes}``, or the RowError saying why not."""
        records: list[dict[str, Any] | RowError] = []
        for row in rows:
            try:
                records.append(self.record(row))
            except RowError as error:
                records.append(error)
        return tokenize_records(records, self.tokenizer, self.settings)


def as_columns(results: Sequence[dict[str, Any] | RowError]) -> dict[str, list]:
    """The chain's results as the columns of ``PREPARED``."""
    out: dict[str, list] = {name: [] for name in PREPARED}
    for result in results:
        error = result if isinstance(result, RowError) else None
        out["input_ids"].append([] if error else result["input_ids"])
        out["labels"].append([] if error else result["labels"])
        out["length"].append(getattr(error, "length", 0) if error else result["length"])
        out["invalid"].append(error.reason if error else None)
        out["problem"].append(str(error) if error else None)
        out["notes"].append([] if error else result["notes"])
    return out


def prepare_rows(rows: datasets.Dataset, chain: RowChain, split: str, fingerprint: str,
                 num_proc: int | None = None) -> datasets.Dataset:
    """The chain over every row of ``rows``, in batched passes; a row that cannot train is marked, not raised.

    ``fingerprint`` names the result for ``datasets``: sftkit's own cache key decides when rows are prepared
    again, so ``datasets`` never hands back a result of other code (it fingerprints a function by its closure,
    not by the code it calls).
    """
    declared = chain.adapter.columns(chain.options).all
    present = [column for column in declared if column in rows.column_names]
    rows = rows.select_columns(present)  # never take unread columns through an expensive pass

    def prepare(batch: dict[str, list]) -> dict[str, list]:
        count = len(batch[present[0]])
        # Every declared column, a missing optional one as None: the adapter reads what it declared, nothing else.
        return as_columns(chain([{column: batch[column][i] if column in batch else None for column in declared}
                                 for i in range(count)]))

    return rows.map(prepare, batched=True, remove_columns=present, features=PREPARED, num_proc=num_proc,
                    load_from_cache_file=False, new_fingerprint=fingerprint,
                    desc=f"Preparing {split} rows ({chain.adapter.name})")
