"""Load: the raw rows of a run, from the Hub, a local directory, files or a glob; one source or a mixture."""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import xxhash

from sftkit import embedded
from sftkit.data.cache import cache_root
from sftkit.errors import SftkitError
from sftkit.recipe import Recipe

logger = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Source:
    """One dataset of the run, with the adapter settings that read it."""

    name: str
    train: datasets.Dataset
    eval: datasets.Dataset | None  # the dataset's own test split, when it has one
    dataset_format: str
    dataset_options: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""  # what the rows are: local files by their content, Hub datasets by their revision

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = f"{self.train._fingerprint}|{self.eval._fingerprint if self.eval is not None else ''}"


def _builder_for(files: list[str], name: str) -> str:
    suffixes = {Path(file).suffix.lower() for file in files}
    builders = {BUILDERS.get(suffix) for suffix in suffixes}
    if None in builders or len(builders) != 1:
        raise SftkitError(
            f"dataset {name}: cannot read files with suffix {', '.join(sorted(suffixes))}; "
            f"sftkit reads one kind at a time of {', '.join(BUILDERS)}"
        )
    return builders.pop()


def content_digest(paths: list[str]) -> str:
    """What local files hold, by their bytes: a copy that keeps the modification time (cp -p, rsync -t, tar) but
    changes the content is other data."""
    digest = xxhash.xxh3_128()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _local_files(folder: Path) -> list[str]:
    return sorted(str(path) for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))


def load_raw(name: str, config: str | None, **hub_arguments: Any) -> tuple[datasets.DatasetDict, str | None]:
    """A Hub dataset name, a local directory, a file, or a glob of files, as a DatasetDict, and for local data the
    digest of its content (``datasets`` converts local files once into a cache keyed by their digest, never by
    their modification time)."""
    path = embedded.resolve(name)
    is_glob = any(char in path for char in "*?[")
    files = [path] if Path(path).is_file() else sorted(glob.glob(path)) if is_glob else []
    try:
        if files:
            digest = content_digest(files)
            return datasets.load_dataset(_builder_for(files, name), data_files={"train": files},
                                         cache_dir=str(cache_root().parent / "sources" / digest)), digest
        if Path(path).is_dir():
            digest = content_digest(_local_files(Path(path)))
            return datasets.load_dataset(path, name=config, cache_dir=str(cache_root().parent / "sources" / digest),
                                         **hub_arguments), digest
    except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise SftkitError(f"dataset {name}: could not read it: {error}") from None
    if is_glob:
        raise SftkitError(f"dataset {name}: the glob matches no files")
    if path.startswith((".", "/", "~")) or Path(path).suffix in BUILDERS:
        raise SftkitError(f"dataset {name}: no such file or directory")
    try:
        return datasets.load_dataset(path, name=config, **hub_arguments), None
    except Exception as error:  # noqa: BLE001 - network, authentication, unknown name or config: all end here
        raise SftkitError(
            f"dataset {name}: could not load it from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Check the name and dataset_config and your network, or point dataset_name at a local file or directory."
        ) from None


def _split(dataset_dict: datasets.DatasetDict, split: str, name: str, key: str) -> datasets.Dataset:
    if split not in dataset_dict:
        raise SftkitError(f"dataset {name}: no split {split!r}; it has {', '.join(dataset_dict)}. Set {key}.")
    return dataset_dict[split]


def _mixture(recipe: Recipe) -> list[Source]:
    """TRL's ``datasets:`` list, each entry with its own format and options, in TRL's proportions."""
    sources = []
    for entry, (dataset_format, options) in zip(recipe.mixture.datasets, recipe.entry_adapters, strict=True):
        hub_arguments = {"data_dir": entry.data_dir, "data_files": entry.data_files}
        loaded, digest = load_raw(entry.path, entry.name, **{k: v for k, v in hub_arguments.items() if v is not None})
        train = _split(loaded, entry.split, entry.path, "split in its datasets entry")
        if entry.columns is not None:
            train = train.select_columns(entry.columns)
        fingerprint = f"{digest}|{entry.split}|{entry.columns}" if digest else ""
        sources.append(Source(entry.path, train, None, dataset_format, options, fingerprint))
    fractions = [entry.fraction for entry in recipe.mixture.datasets]
    if any(fraction is not None for fraction in fractions):
        if None in fractions:
            raise SftkitError("datasets: set fraction on every entry of the mixture, or on none")
        weights = [fraction / sum(fractions) for fraction in fractions]
        total = min(source.train.num_rows / weight for source, weight in zip(sources, weights) if weight > 0)
        for source, weight in zip(sources, weights):
            source.train = source.train.select(range(round(weight * total)))
            source.fingerprint += f"|first {source.train.num_rows} rows"
    return sources


def load_sources(recipe: Recipe) -> list[Source]:
    """The run's raw datasets: ``dataset_name`` (with its own test split, if any) or the ``datasets:`` mixture."""
    if recipe.mixture.datasets:
        return _mixture(recipe)
    script = recipe.script
    loaded, digest = load_raw(script.dataset_name, script.dataset_config)
    train = _split(loaded, script.dataset_train_split, script.dataset_name, "dataset_train_split")
    evaluation = loaded.get(script.dataset_test_split)
    sftkit = recipe.sftkit
    fingerprint = f"{digest}|{script.dataset_train_split}|{script.dataset_test_split}" if digest else ""
    return [Source(script.dataset_name, train, evaluation, sftkit.dataset_format, sftkit.dataset_options, fingerprint)]
