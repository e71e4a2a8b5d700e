"""Helpers the tests share: writing recipes and data files, rows in Infinity-Instruct's schema."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "embedded:tiny-qwen2"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_recipe(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def sharegpt_row(index: int, *turns: tuple[str, str]) -> dict:
    """A row in BAAI/Infinity-Instruct's exact schema."""
    return {
        "id": index,
        "conversations": [{"from": speaker, "value": text} for speaker, text in turns],
        "label": {"ability_en": ["math"], "ability_zh": ["数学"], "cate_ability_en": [], "cate_ability_zh": []},
        "langdetect": "en",
        "source": "tests",
    }
