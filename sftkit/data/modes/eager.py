"""Eager: every planned row before step 1, through the row chain in batched, parallel passes, cached on disk by a
key of everything that changes the result (used when the run reads the whole dataset). The render guard checks a
sample first."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import datasets
from transformers import PreTrainedTokenizerBase

from sftkit.data.adapt import options_record
from sftkit.data.cache import cached, code_digest, preparation_key
from sftkit.data.passes import planned_parts, prepared, processes, run_render_guard
from sftkit.data.plan import Plan, SplitPlan
from sftkit.data.prepared import Prepared, SplitRows
from sftkit.recipe import Recipe


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Everything of the tokenizer that changes a row's tokens: vocabulary, special tokens, template, whether
    plain text gets a BOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    probe = tokenizer("sftkit", add_special_tokens=True)["input_ids"]
    return hashlib.sha256(f"{text}|{specials}|{probe}|{tokenizer.chat_template}".encode()).hexdigest()


def prepare_splits(plan: Plan, splits: dict[str, SplitPlan], recipe: Recipe,
                   check_rows: int) -> tuple[dict[str, SplitRows], int, bool]:
    """The rows of ``splits`` through the cache, the render guard on ``check_rows`` of each first.

    Returns the prepared splits, how many conversations the render guard rendered, and whether the splits came
    from the cache (then it rendered none: they were rendered and passed before being saved, and the key covers
    the template).
    """
    chain = plan.sources[0].chain
    key = preparation_key(
        {
            "sources": [source.fingerprint for source in plan.sources],
            "adapters": [(c.installed.adapter.name, c.installed.distribution, c.installed.version,
                          options_record(c.options)) for c in plan.adapters],
            "tokenizer": _tokenizer_fingerprint(chain.tokenizer),
            "settings": asdict(chain.settings),
            "plan": {name: (split.source_split, None if split.ids is None else
                            hashlib.sha256(split.ids.tobytes()).hexdigest()) for name, split in splits.items()},
        },
        code=code_digest(type(choice.installed.adapter) for choice in plan.adapters),
    )
    num_proc = processes(recipe, plan)
    rendered = 0

    def build() -> dict[str, datasets.Dataset]:
        nonlocal rendered
        out = {}
        for name, split in splits.items():
            planned = planned_parts(plan, split)
            rendered += run_render_guard(planned, check_rows, name)
            out[name] = prepared(planned, name, key, num_proc)
        return out

    rows, from_cache = cached(key, build)
    return ({name: SplitRows(rows[name], plan.rows(splits[name].source_split)) for name in rows}, rendered,
            from_cache)


def prepare_eval(plan: Plan, recipe: Recipe) -> tuple[SplitRows | None, int, bool]:
    """The eval rows alone, for a way that prepares the train rows otherwise: (rows, rendered, from the cache)."""
    if plan.eval is None:
        return None, 0, False
    splits, rendered, from_cache = prepare_splits(plan, {"eval": plan.eval}, recipe, recipe.sftkit.render_check_rows)
    return splits["eval"], rendered, from_cache


def prepare(plan: Plan, recipe: Recipe) -> Prepared:
    """Every planned train and eval row, in one cache entry."""
    splits = {"train": plan.train, **({"eval": plan.eval} if plan.eval is not None else {})}
    rows, rendered, from_cache = prepare_splits(plan, splits, recipe, recipe.sftkit.render_check_rows)
    return Prepared(rows["train"], rows.get("eval"), rendered, from_cache)
