"""Load: the raw rows of a run, from the Hub, a local directory, files or a glob, split into train and eval."""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
from trl import get_dataset

from sftkit import embedded
from sftkit.errors import SftkitError
from sftkit.recipe import Recipe

logger = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class RawSplits:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    eval_origin: str  # where the eval rows came from, for the log and the run record


def _builder_for(files: list[str], name: str) -> str:
    suffixes = {Path(file).suffix.lower() for file in files}
    builders = {BUILDERS.get(suffix) for suffix in suffixes}
    if None in builders or len(builders) != 1:
        raise SftkitError(
            f"dataset_name {name}: cannot read files with suffix {', '.join(sorted(suffixes))}; "
            f"sftkit reads one kind at a time of {', '.join(BUILDERS)}"
        )
    return builders.pop()


def load_raw(name: str, config: str | None) -> datasets.DatasetDict:
    """A Hub dataset name, a local directory, a file, or a glob of files, as a DatasetDict."""
    path = embedded.resolve(name)
    files = sorted(glob.glob(path)) if any(char in path for char in "*?[") else []
    if Path(path).is_file():
        files = [path]
    try:
        if files:
            return datasets.load_dataset(_builder_for(files, name), data_files={"train": files})
        if Path(path).is_dir():
            return datasets.load_dataset(path, name=config)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise SftkitError(f"dataset_name {name}: could not read it: {error}") from None
    if any(char in path for char in "*?["):
        raise SftkitError(f"dataset_name {name}: the glob matches no files")
    if path.startswith((".", "/", "~")) or Path(path).suffix in BUILDERS:
        raise SftkitError(f"dataset_name {name}: no such file or directory")
    try:
        return datasets.load_dataset(path, name=config)
    except Exception as error:  # network, authentication, unknown name or config: all end here
        raise SftkitError(
            f"dataset_name {name}: could not load it from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Check the name and dataset_config and your network, or point dataset_name at a local file or directory."
        ) from None


def load_splits(recipe: Recipe) -> RawSplits:
    """Train rows, and eval rows: the dataset's own test split, else a seeded held-out part of train."""
    script, mixture = recipe.script, recipe.mixture
    if mixture.datasets:
        dataset_dict = get_dataset(mixture)
        name = "datasets"
    else:
        dataset_dict = load_raw(script.dataset_name, script.dataset_config)
        name = script.dataset_name
    if script.dataset_train_split not in dataset_dict:
        raise SftkitError(
            f"dataset_name {name}: no split {script.dataset_train_split!r}; it has {', '.join(dataset_dict)}. "
            "Set dataset_train_split to one of them."
        )
    train = dataset_dict[script.dataset_train_split]
    if script.dataset_test_split in dataset_dict:
        return RawSplits(train, dataset_dict[script.dataset_test_split], f"split {script.dataset_test_split!r}")
    size = mixture.test_split_size
    if not size:
        return RawSplits(train, None, "none")
    size = int(size) if size >= 1 else size
    held_out = train.train_test_split(test_size=size, seed=recipe.training.seed, shuffle=True)
    origin = f"{held_out['test'].num_rows} rows held out of {name} (test_split_size {size}, seed {recipe.training.seed})"
    return RawSplits(held_out["train"], held_out["test"], origin)
