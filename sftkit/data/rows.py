"""The row chain: one raw row of a source -> canonical record -> token ids and labels, or why it cannot train.

Every way through the data uses it: eager preparation (in batched passes), lazy preparation (a row at a
time, as the trainer draws it), a packed run's share, ``sftkit check`` and ``sftkit.testing``. The steps:

1. the adapter converts the raw row, seen as its declared columns alone (``RowView``), into a canonical record;
2. the record is checked (a dict, roles, content, tool calls, a trained turn at the end);
3. the chat template renders it (conversations) and the tokenizer tokenizes it;
4. labels are masked from the trained spans, and the length policy (``max_length``, ``long_rows``) applied;
   what a reader should know about a row that trains (turns left untrained, reasoning the template does not
   render, a cut to ``max_length``) is noted with it.

Whatever code that is not sftkit's raises on a row (an adapter's bug, a template's ``raise_exception``, a
tokenizer) becomes that row's ``RowError``, with a reason and the original message, and follows the
bad-row policy like any other invalid row; under ``SFTKIT_DEBUG=1`` an adapter's exception stops the run
with its traceback instead. An adapter that reads a column it did not declare stops the run (``RowView``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from sftkit.contract import BROKEN_CONTRACT, DEBUG_ENV, Adapter, RowError, RowView, debugging
from sftkit.data.adapt import check_record, declared_columns
from sftkit.data.sources import NOT_UTF8, UNREADABLE
from sftkit.data.tokenization import TokenizeSettings, tokenize_records
from sftkit.errors import SftkitError
from sftkit.records import short

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


def to_record(adapter: Adapter, options: Any, row: Mapping[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """Steps 1 and 2: the canonical record of a raw row, which the adapter sees as its declared ``columns`` alone (a
    ``RowView``); RowError when the row cannot be one."""
    try:
        record = adapter.convert(RowView(adapter.name, columns, row), options)
    except (RowError, SftkitError):
        raise
    except Exception as error:  # the adapter is a plugin's code: its failure is this row's
        if debugging():
            raise  # its author asked to see the line that failed
        raise RowError(f"adapter {adapter.name!r} failed on this row: {type(error).__name__}: {error} "
                       f"({DEBUG_ENV}=1 shows where)", reason=ADAPTER_FAILED) from None
    if not isinstance(record, dict):
        raise RowError(f"adapter {adapter.name!r} broke the adapter contract: its convert() returned "
                       f"{short(record)}, where a record (a dict of messages, of prompt and completion, or of text) "
                       "or a raised sftkit.RowError is due", reason=BROKEN_CONTRACT)
    check_record(record, adapter.name)
    return record


@dataclass(frozen=True)
class RowChain:
    """The chain for one source: its adapter and options, the tokenizer that renders rows, the token settings."""

    adapter: Adapter
    options: Mapping[str, Any]
    tokenizer: PreTrainedTokenizerBase
    settings: TokenizeSettings

    @functools.cached_property
    def columns(self) -> tuple[str, ...]:
        """The columns the adapter declared for these options: all it is handed of a row."""
        return declared_columns(self.adapter, self.options).all

    @functools.cached_property
    def read(self) -> tuple[str, ...]:
        """What the chain reads of a raw row: the declared columns, and whether the row could be read at all."""
        return (*self.columns, UNREADABLE)

    def record(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Steps 1 and 2 (``to_record``) with this source's adapter and options, on the declared columns; a row that
        is not UTF-8 text (``sftkit.data.sources``) is invalid before the adapter sees it."""
        if problem := row.get(UNREADABLE):
            raise RowError(problem, reason=NOT_UTF8)
        return to_record(self.adapter, self.options, row, self.columns)

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
    present = [column for column in chain.read if column in rows.column_names]
    rows = rows.select_columns(present)  # never take unread columns through an expensive pass

    def prepare(batch: dict[str, list]) -> dict[str, list]:
        count = len(batch[present[0]])
        # The chain hands the adapter its declared columns alone, a missing optional one as None (RowView).
        return as_columns(chain([{column: batch[column][i] for column in present} for i in range(count)]))

    return rows.map(prepare, batched=True, remove_columns=present, features=PREPARED, num_proc=num_proc,
                    load_from_cache_file=False, new_fingerprint=fingerprint,
                    desc=f"Preparing {split} rows ({chain.adapter.name})")
