"""Data through ``datasets``: parquet and CSV files, a ``save_to_disk`` folder and a hub dataset in the local cache,
read offline, give the same problems as JSONL, and what cannot be read is said in one line."""

from __future__ import annotations

import json

import datasets
import pytest

from trd_lightning.data import DataError, PromptDataModule
from trd_lightning.data.sources import read_rows

ROWS = [{"q": "1+2", "a": "3", "s": "1+2=3;a:3"}, {"q": "2*4", "a": "8", "s": "2*4=8;a:8"}, {"q": "5-1", "a": "4", "s": "5-1=4;a:4"}]


def problems(path, tokenizer, **spec) -> list[str]:
    dm = PromptDataModule(train_path={"path": str(path), **spec} if spec else str(path), problem_field="q", answer_field="a",
                          solution_field="s", prompt_template="demo_student", batch_size=8, shuffle=False, tokenizer=tokenizer)
    dm.setup("fit")
    return next(iter(dm.train_dataloader())).problem


@pytest.fixture
def saved(tmp_path):
    """A DatasetDict written by save_to_disk: train (the rows) and test (one other)."""
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list([{"q": "9+9", "a": "8", "s": "9+9=8;a:8"}])}).save_to_disk(str(folder))
    return folder


def test_every_format_gives_the_jsonl_problems(tmp_path, tokenizer, saved):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(ROWS).to_csv(str(tmp_path / "d.csv"), index=False)
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    expected = [r["q"] for r in ROWS]
    assert problems(tmp_path / "d.jsonl", tokenizer) == expected
    assert problems(tmp_path / "d.parquet", tokenizer) == expected
    assert problems(tmp_path / "d.csv", tokenizer) == expected
    assert problems(single, tokenizer) == expected  # a saved Dataset: its only rows
    assert problems(saved, tokenizer, split="train") == expected
    assert problems(saved, tokenizer, split="test") == ["9+9"]


def test_a_hub_dataset_in_the_local_cache_is_read_offline(tmp_path, tokenizer, monkeypatch):
    """The layout `hf download --repo-type dataset someone/chains` leaves in the hub cache; nothing is fetched."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "datasets--someone--chains"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    datasets.Dataset.from_list(ROWS).to_parquet(str(data / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(ROWS[:1]).to_parquet(str(data / "test-00000-of-00001.parquet"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert problems("someone/chains", tokenizer, split="train") == [r["q"] for r in ROWS]
    assert [row["q"] for row in read_rows("someone/chains", split="test")] == ["1+2"]
    with pytest.raises(DataError, match=r"'someone/absent' is not a local file or folder, nor a hub dataset in the local cache.*hf download"):
        read_rows("someone/absent")


def test_what_cannot_be_read_is_said(tmp_path, tokenizer, saved):
    with pytest.raises(DataError, match=r"has several splits: \['test', 'train'\]; name one with \{path: .*, split: \.\.\.\}"):
        read_rows(str(saved))
    with pytest.raises(DataError, match=r"has no split 'validation'"):
        read_rows(str(saved), split="validation")
    (tmp_path / "d.txt").write_text("1+2")
    with pytest.raises(DataError, match=r"must be \.jsonl, \.parquet or \.csv"):
        read_rows(str(tmp_path / "d.txt"))
    with pytest.raises(DataError, match=r"data.init_args.train_path: train data path '/nope/d.parquet' does not exist"):
        problems("/nope/d.parquet", tokenizer)


def test_rows_are_named_by_file_and_row(tmp_path, tokenizer):
    datasets.Dataset.from_list([ROWS[0], {"q": None, "a": "1", "s": "x"}]).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet:2: the field 'q' .* is null"):
        problems(tmp_path / "d.parquet", tokenizer)
