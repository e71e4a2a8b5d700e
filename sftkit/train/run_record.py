"""The run record: ``output_dir/sftkit_run.yaml``, enough to know later exactly what a run was."""

from __future__ import annotations

import datetime
import importlib.metadata
from pathlib import Path
from typing import Any

import yaml

from sftkit.redaction import redacted

RECORD_NAME = "sftkit_run.yaml"
VERSIONED = ("sftkit", "trl", "transformers", "accelerate", "deepspeed", "datasets", "torch", "pluggy")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def plain(value: Any) -> Any:
    """YAML-safe copy: enums and library objects become their text."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "value", str(value))


def write_run_record(output_dir: str, recipe_values: dict[str, Any], details: dict[str, Any]) -> Path:
    """Write the resolved recipe (a valid recipe on its own, with its secrets redacted), the adapter, the data and the
    versions."""
    path = Path(output_dir) / RECORD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    record = redacted({
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": plain(recipe_values),
        **plain(details),
        "versions": package_versions(),
    })
    path.write_text(yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
    return path


def add_to_run_record(output_dir: str, section: str, values: dict[str, Any]) -> None:
    """Add what is known only at the end (rows drawn, steps, losses) to the record written before step 1."""
    path = Path(output_dir) / RECORD_NAME
    record = yaml.safe_load(path.read_text())
    record[section] = redacted(plain(values))
    path.write_text(yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
