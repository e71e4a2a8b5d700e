"""The run record: ``output_dir/sftkit_run.yaml``, enough to know later exactly what a run was."""

from __future__ import annotations

import datetime
import importlib.metadata
from pathlib import Path
from typing import Any

import yaml

from sftkit.redaction import redact

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


def _plain(value: Any) -> Any:
    """YAML-safe copy: enums and library objects become their text."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "value", str(value))


def write_run_record(output_dir: str, recipe_values: dict[str, Any], details: dict[str, Any]) -> Path:
    """Write the resolved recipe (a valid recipe on its own), the adapter, the data and the versions."""
    path = Path(output_dir) / RECORD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": _plain(recipe_values),
        **_plain(details),
        "versions": package_versions(),
    }
    path.write_text(redact(yaml.safe_dump(record, sort_keys=False, allow_unicode=True)))
    return path


def add_to_run_record(output_dir: str, section: str, values: dict[str, Any]) -> None:
    """Add what is known only at the end (rows drawn, steps, losses) to the record written before step 1."""
    path = Path(output_dir) / RECORD_NAME
    record = yaml.safe_load(path.read_text())
    record[section] = _plain(values)
    path.write_text(redact(yaml.safe_dump(record, sort_keys=False, allow_unicode=True)))
