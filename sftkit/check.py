"""``sftkit check``: everything training would do before its first step, printed, without loading weights."""

from __future__ import annotations

from sftkit.data import prepare_data
from sftkit.model import load_tokenizer
from sftkit.recipe import Recipe
from sftkit.render_guard import training_template, trained_token_count


def check(recipe: Recipe, shown_rows: int) -> str:
    """Validate recipe and data (raising SftkitError on a problem) and describe what would train."""
    tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    described = data.describe()
    lines = [f"recipe         {recipe.source}"]
    lines += [f"note           {note}" for note in recipe.notes]
    adapter = described["adapter"]
    lines.append(f"adapter        {adapter['name']} from {adapter['distribution']} {adapter['version']}: {adapter['chosen']}")
    lines.append(f"train rows     {data.train.num_rows:,}")
    lines.append(f"eval rows      {described['data']['eval_rows']:,} ({data.eval_origin})")
    lines.append(f"render guard   {data.rows_checked} sampled examples: every turn rendered, every one trains")
    template = training_template(tokenizer, recipe.training) if "messages" in data.train.column_names else None
    for index in range(min(shown_rows, data.train.num_rows)):
        record = data.train[index]
        trained = trained_token_count(record, tokenizer, recipe.training, template)
        if "messages" in record:
            text = tokenizer.apply_chat_template(record["messages"], chat_template=template, tokenize=False)
        else:
            text = record.get("text") or record["prompt"] + record["completion"]
        lines.append(f"\n--- train row {index}: {trained} trained tokens ---\n{text}")
    lines.append("\ntraining would start: ok")
    return "\n".join(lines)
