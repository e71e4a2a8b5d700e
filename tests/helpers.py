"""Helpers the tests share: writing recipes and data files, rows in Infinity-Instruct's schema."""

from __future__ import annotations

import json
import os
import sys
import sysconfig
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


class RecordingStream:
    """A text stream that keeps each write apart: text streamed as it is generated arrives in several."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.writes)


def python_without(folder: Path, *packages: str) -> dict[str, str]:
    """The environment of a Python that has every package of this one but ``packages``: ``python3`` on its PATH
    runs with only a site directory of links to the others (and this checkout) on its path."""
    site, bin_dir = folder / "site-without", folder / "bin-without"
    site.mkdir()
    for entry in os.scandir(sysconfig.get_paths()["purelib"]):
        if not entry.name.endswith(".pth") and not any(entry.name.startswith(package) for package in packages):
            (site / entry.name).symlink_to(entry.path)
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # -S: only PYTHONPATH's packages
    (bin_dir / "python3").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": f"{ROOT}:{site}"}
