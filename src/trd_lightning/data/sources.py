"""Where a dataset's rows come from: a local JSONL, parquet or CSV file, a folder written by ``datasets``'
``save_to_disk``, a folder of data files (a dataset repository downloaded from the Hugging Face hub), or a hub
dataset id already in the local hub cache, read offline (nothing is downloaded at run time).

Every row comes back as a dict with ``_line``: its line in a JSONL file, else its 1-based row number, so errors
name ``file:row``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from trd_lightning.models import resolve_path


class DataError(ValueError):
    """Bad or missing data, named by file and row."""


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SAVED = ("dataset_dict.json", "state.json")  # what save_to_disk writes, for a DatasetDict and for a Dataset


def read_rows(path: str, split: str | None = None, config: str | None = None) -> list[dict]:
    """The rows of one dataset. ``split`` picks one split of a dataset that has several (a saved ``DatasetDict``, a
    hub dataset); ``config`` a hub dataset's configuration (its ``name`` in ``datasets.load_dataset``)."""
    source = locate(path)
    if source.is_file():
        if source.suffix in (".jsonl", ".json"):
            return read_jsonl(source, path)
        if source.suffix not in (".parquet", ".csv"):
            raise DataError(f"data file {path!r} must be .jsonl, .parquet or .csv, a save_to_disk folder, or a hub dataset id")
        return numbered(load("load_dataset", source.suffix[1:], data_files=str(source), split="train"))
    if any((source / name).is_file() for name in SAVED):
        return numbered(pick_split(load("load_from_disk", str(source)), path, split))
    return numbered(pick_split(load("load_dataset", str(source), name=config), path, split))


def locate(path: str, what: str = "data") -> Path:
    """A local file or folder (``demo:``/``pkg:`` names included), else a hub dataset id's local snapshot; else a
    ``DataError`` saying what is missing."""
    try:
        return resolve_path(path, what)
    except FileNotFoundError as error:
        if not HUB_ID.match(path) or path.startswith((".", "/", "~")):
            raise DataError(str(error)) from None
        return cached_hub_dataset(path)


def cached_hub_dataset(repo_id: str) -> Path:
    """The local snapshot of a hub dataset repository, or a ``DataError`` saying how to get it there."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except LocalEntryNotFoundError:
        raise DataError(
            f"data path {repo_id!r} is not a local file or folder, nor a hub dataset in the local cache ({constants.HF_HUB_CACHE}); "
            f"nothing is downloaded at run time: fetch it where there is network (`hf download --repo-type dataset {repo_id}`) "
            "and share the cache, or give a local path"
        ) from None


def load(function: str, *args, **kwargs):
    """``datasets.<function>``, quietly (no progress bars for a few thousand rows), its errors as ``DataError``."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return getattr(datasets, function)(*args, **kwargs)
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"data {args[-1] if args else ''}: {error}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()


def pick_split(data, path: str, split: str | None):
    """One split of a ``DatasetDict``: the one named, or the only one."""
    import datasets

    if not isinstance(data, datasets.DatasetDict):
        return data
    if split is None and len(data) == 1:
        return next(iter(data.values()))
    if split not in data:
        named = f"no split {split!r}" if split is not None else "several splits"
        raise DataError(f"data {path!r} has {named}: {sorted(data)}; name one with {{path: {path}, split: ...}}")
    return data[split]


def numbered(data) -> list[dict]:
    return [{**row, "_line": number} for number, row in enumerate(data, start=1)]


def read_jsonl(file: Path, path: str) -> list[dict]:
    """Rows of a JSONL file; an error names the line, and a line that is not UTF-8 is said to be so."""
    records = []
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: the line is not valid UTF-8 ({error.reason} at byte {error.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(record).__name__}")
            record["_line"] = number
            records.append(record)
    return records
