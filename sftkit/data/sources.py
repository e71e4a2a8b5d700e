"""Load: the raw rows of a run, from the Hub, a local directory, files or a glob; one source or a mixture."""

from __future__ import annotations

import codecs
import glob
import itertools
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import datasets.data_files
import xxhash

from sftkit import embedded
from sftkit.data.cache import cache_root
from sftkit.errors import SftkitError
from sftkit.recipe import Recipe

logger = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
UNREADABLE = "sftkit_unreadable"  # the column of a row that is not UTF-8 text: why (sftkit.data.rows refuses it)
NOT_UTF8 = "not UTF-8"
HEAD_ROWS = 64  # a stream's first rows, read to choose and check its adapter
STREAMED_EVAL_ROWS = 2000  # the most rows of a streamed dataset's own test split held in memory for evaluation


@dataclass(frozen=True)
class Source:
    """One dataset of the run as loaded, with the adapter settings that read it. Loaded once and never changed: the
    rows a split takes of it (a mixture's draw, a held-out part) are the plan's (``sftkit.data.plan``)."""

    name: str
    train: datasets.Dataset  # every loaded row; a stream's first rows (to choose and check its adapter)
    eval: datasets.Dataset | None  # the dataset's own test split, when it has one
    dataset_format: str
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    fingerprint: str = ""  # what the rows are: local files by their content, Hub datasets by their revision
    fraction: float | None = None  # its share of a mixture's trained tokens, as the recipe asks (sftkit.data.mixture)
    stream: datasets.IterableDataset | None = None  # streamed: every row, read as iterated


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
        digest.update(os.path.basename(path).encode() + b"\0" + _file_facts(path)[0].encode())
    return digest.hexdigest()


def _file_facts(path: str) -> tuple[str, bool]:
    """One file's digest, and whether it is UTF-8 text throughout, found in one read once per version of the file
    (gigabytes take seconds to read): kept under the file's identity, its inode, size, and modification and change
    times. No edit, copy or restore keeps the change time, so a file whose content changed is read again."""
    status = os.stat(path)
    identity = (f"{os.path.abspath(path)}|{status.st_dev}|{status.st_ino}|{status.st_size}|{status.st_mtime_ns}|"
                f"{status.st_ctime_ns}")
    kept = cache_root().parent / "digests" / xxhash.xxh3_128_hexdigest(identity.encode())
    if kept.is_file() and len(facts := kept.read_text().split()) == 2:
        return facts[0], facts[1] == "utf-8"
    digest, decoder, text = xxhash.xxh3_128(), codecs.getincrementaldecoder("utf-8")(), True
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
            if text:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    text = False
    kept.parent.mkdir(parents=True, exist_ok=True)
    partial = kept.with_name(f"{kept.name}.{os.getpid()}")
    partial.write_text(f"{digest.hexdigest()} {'utf-8' if text else 'bytes'}")
    partial.replace(kept)
    return digest.hexdigest(), text


def _unreadable(where: str, error: UnicodeDecodeError) -> str:
    return (f"{where} is not UTF-8 text (byte {error.object[error.start]:#04x} at position {error.start}); save the "
            "file as UTF-8")


def readable(files: list[str]) -> list[str]:
    """The files to load: each JSON file that is not UTF-8 text throughout replaced by a copy (made once, kept in the
    cache) in which every row that is not stands as a row of its own holding only ``UNREADABLE``, the reason, so
    that it becomes an invalid row where it was, and the others load as they are. (A row's bytes that are not
    UTF-8 would otherwise stop the run wherever the data path first reads its batch.)"""
    out = []
    for path in files:
        digest, text = _file_facts(path)
        if text or Path(path).suffix.lower() not in (".json", ".jsonl"):
            out.append(path)
            continue
        copy = cache_root().parent / "readable" / f"{digest}.jsonl"
        if not copy.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            partial = copy.with_name(f"{copy.name}.{os.getpid()}")
            with partial.open("w", encoding="utf-8") as out_file:
                for line in _readable_rows(path):
                    out_file.write(line + "\n")
            partial.replace(copy)
        logger.warning("dataset %s: rows that are not UTF-8 text are invalid rows (reason %r)", path, NOT_UTF8)
        out.append(str(copy))
    return out


def _readable_rows(path: str) -> Iterator[str]:
    """The rows of a JSON Lines file (or of a JSON array), as JSON lines, a row that is not UTF-8 text replaced."""
    name = Path(path).name
    if Path(path).suffix.lower() == ".jsonl":
        with open(path, "rb") as file:
            for number, line in enumerate(file, start=1):
                try:
                    yield line.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as error:
                    yield json.dumps({UNREADABLE: _unreadable(f"line {number} of {name}", error)})
        return
    raw = Path(path).read_bytes()
    for position, row in enumerate(json.loads(raw.decode("utf-8", errors="surrogateescape"))):
        encoded = json.dumps(row, ensure_ascii=False)
        try:
            encoded.encode("utf-8")
            yield encoded
        except UnicodeEncodeError:
            bad = encoded.encode("utf-8", errors="surrogateescape")
            try:
                bad.decode("utf-8")
            except UnicodeDecodeError as error:
                yield json.dumps({UNREADABLE: _unreadable(f"row {position} of {name}", error)})


def _local_files(folder: Path) -> list[str]:
    return sorted(str(path) for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))


def load_raw(name: str, config: str | None, streaming: bool = False,
             **hub_arguments: Any) -> tuple[datasets.DatasetDict, str | None]:
    """A Hub dataset name, a local directory, a file, or a glob of files, as a DatasetDict, and for local data the
    digest of its content (``datasets`` converts local files once into a cache keyed by their digest, never by
    their modification time). ``streaming``: an IterableDatasetDict that reads the rows as they are iterated,
    converting and caching nothing (and no digest)."""
    path = embedded.resolve(name)
    is_glob = any(char in path for char in "*?[")
    files = [path] if Path(path).is_file() else sorted(glob.glob(path)) if is_glob else []
    loaded = readable(files)
    try:
        if streaming and (files or Path(path).is_dir()):
            if files:
                return datasets.load_dataset(_builder_for(files, name), data_files={"train": loaded},
                                             streaming=True), None
            return datasets.load_dataset(path, name=config, streaming=True, **hub_arguments), None
        if files:
            digest = content_digest(files)
            return datasets.load_dataset(_builder_for(files, name), data_files={"train": loaded},
                                         cache_dir=str(cache_root().parent / "sources" / digest)), digest
        if Path(path).is_dir():
            digest = content_digest(_local_files(Path(path)))
            return datasets.load_dataset(path, name=config, cache_dir=str(cache_root().parent / "sources" / digest),
                                         **hub_arguments), digest
    except datasets.data_files.EmptyDatasetError:
        raise SftkitError(f"dataset {name}: the directory holds no data files ({', '.join(BUILDERS)}); point "
                          "dataset_name at a file, a glob of files, or a directory that holds them") from None
    except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise SftkitError(f"dataset {name}: could not read it: {error}") from None
    if is_glob:
        raise SftkitError(f"dataset {name}: the glob matches no files")
    if path.startswith((".", "/", "~")) or Path(path).suffix in BUILDERS:
        raise SftkitError(f"dataset {name}: no such file or directory")
    try:
        return datasets.load_dataset(path, name=config, streaming=streaming, **hub_arguments), None
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
    """TRL's ``datasets:`` list, each entry with its own format, options and share (drawn in
    ``sftkit.data.mixture``, once the rows can be measured)."""
    sources = []
    for entry, (dataset_format, options) in zip(recipe.mixture.datasets, recipe.entry_adapters, strict=True):
        hub_arguments = {"data_dir": entry.data_dir, "data_files": entry.data_files}
        loaded, digest = load_raw(entry.path, entry.name, recipe.mixture.streaming,
                                  **{k: v for k, v in hub_arguments.items() if v is not None})
        train = _split(loaded, entry.split, entry.path, "split in its datasets entry")
        if entry.columns is not None:
            train = train.select_columns(entry.columns)
        fingerprint = f"{digest}|{entry.split}|{entry.columns}" if digest else ""
        sources.append(_source(entry.path, train, None, dataset_format, options, fingerprint, entry.fraction))
    return sources


def _head(rows: datasets.IterableDataset, count: int, name: str) -> datasets.Dataset:
    head = list(itertools.islice(iter(rows), count))
    if not head:
        raise SftkitError(f"dataset {name}: the stream holds no rows")
    return datasets.Dataset.from_list(head)


def _source(name: str, train: datasets.Dataset | datasets.IterableDataset,
            evaluation: datasets.Dataset | datasets.IterableDataset | None, dataset_format: str,
            options: Mapping[str, Any], fingerprint: str, fraction: float | None = None) -> Source:
    """The Source of loaded splits. A streamed one keeps its stream, with its first rows as a dataset (to choose and
    check the adapter) and its own test split, if it has one, read into memory (at most STREAMED_EVAL_ROWS rows)."""
    if isinstance(train, datasets.IterableDataset):
        head = _head(train, HEAD_ROWS, name)
        evaluation = _head(evaluation, STREAMED_EVAL_ROWS, name) if evaluation is not None else None
        return Source(name, head, evaluation, dataset_format, options,
                      fingerprint or f"stream {name} {head._fingerprint}", fraction, train)
    fingerprint = fingerprint or f"{train._fingerprint}|{evaluation._fingerprint if evaluation is not None else ''}"
    return Source(name, train, evaluation, dataset_format, options, fingerprint, fraction)


def load_sources(recipe: Recipe) -> list[Source]:
    """The run's raw datasets: ``dataset_name`` (with its own test split, if any) or the ``datasets:`` mixture."""
    if recipe.mixture.datasets:
        return _mixture(recipe)
    script = recipe.script
    loaded, digest = load_raw(script.dataset_name, script.dataset_config, script.dataset_streaming)
    train = _split(loaded, script.dataset_train_split, script.dataset_name, "dataset_train_split")
    evaluation = loaded.get(script.dataset_test_split)
    sftkit = recipe.sftkit
    fingerprint = f"{digest}|{script.dataset_train_split}|{script.dataset_test_split}" if digest else ""
    return [_source(script.dataset_name, train, evaluation, sftkit.dataset_format, sftkit.dataset_options,
                    fingerprint)]
