"""Prompt data: problems (with an answer and, for OPSD, a reference solution) from JSONL or parquet,
rendered with the student's prompt template and the tokenizer's chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from trd_lightning.models import resolve_path
from trd_lightning.rollout.base import Rollouts
from trd_lightning.templates import PROBLEM, SOLUTION, Template
from trd_lightning.views import ChatPrompts, PromptTooLongError


class DataError(ValueError):
    pass


@dataclass
class PromptBatch:
    """A batch of problems; the rollout callback attaches the student's ``rollouts``."""

    index: list[int]
    problem: list[str]
    answer: list[str | None]
    solution: list[str | None]
    prompt_ids: list[list[int]]
    rollouts: Rollouts | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.index)


def read_records(path: str) -> list[dict]:
    """Rows of a ``.jsonl`` or ``.parquet`` file. JSONL errors name the line."""
    file = resolve_path(path, "data")
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(file).to_pylist()
    if file.suffix not in (".jsonl", ".json"):
        raise DataError(f"data file {path!r} must be .jsonl or .parquet")
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


class PromptDataset(Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(items: list[dict]) -> PromptBatch:
    return PromptBatch(
        index=[it["index"] for it in items],
        problem=[it["problem"] for it in items],
        answer=[it["answer"] for it in items],
        solution=[it["solution"] for it in items],
        prompt_ids=[it["prompt_ids"] for it in items],
    )


class PromptDataModule(LightningDataModule):
    """Problems for distillation and evaluation.

    Args:
        train_path / val_path / test_path: local ``.jsonl`` or ``.parquet`` files.
        problem_field / answer_field / solution_field: column names; set ``solution_field: null``
            when the data has no reference solutions (OPSD and reference-based refining need them).
        prompt_template: the student's user message (a built-in name, a file, or text with ``{problem}``).
        max_prompt_tokens: a longer student prompt is an error at setup, naming the row.
        tokenizer: the student's tokenizer; the CLI passes the model's own.
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        problem_field: str = "problem",
        answer_field: str = "answer",
        solution_field: str | None = "solution",
        prompt_template: str = "math_student",
        system_prompt: str | None = None,
        max_prompt_tokens: int = 1024,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        tokenizer=None,
    ):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data batch_size must be > 0 (got {batch_size})")
        if eval_batch_size is not None and eval_batch_size <= 0:
            raise ValueError(f"data eval_batch_size must be > 0 (got {eval_batch_size})")
        if max_prompt_tokens <= 0:
            raise ValueError(f"data max_prompt_tokens must be > 0 (got {max_prompt_tokens})")
        self.paths = {"train": train_path, "val": val_path, "test": test_path}
        self.fields = {PROBLEM: problem_field, "answer": answer_field, SOLUTION: solution_field}
        self.template = Template(prompt_template, "data prompt_template").require(PROBLEM)
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.tokenizer = tokenizer
        self.datasets: dict[str, PromptDataset] = {}

    @property
    def has_solutions(self) -> bool:
        return self.fields[SOLUTION] is not None

    def prepare(self, split: str) -> PromptDataset:
        """Read, check and tokenize one split (once)."""
        if split in self.datasets:
            return self.datasets[split]
        path = self.paths[split]
        if path is None:
            raise DataError(f"no {split}_path is set on the data module")
        if self.tokenizer is None:
            raise DataError("the data module needs the student's tokenizer (the CLI links it; pass `tokenizer=` in code)")
        prompts = ChatPrompts(self.tokenizer, self.system_prompt)
        records = read_records(path)
        if not records:
            raise DataError(f"{split} data {path!r} is empty: it needs at least one problem")
        items = []
        for i, record in enumerate(records):
            where = f"{path}:{record['_line']}" if "_line" in record else f"{path} row {i}"
            item = {"index": i}
            for key, column in self.fields.items():
                if column is None:
                    item[key] = None
                    continue
                if column not in record or record[column] is None:
                    present = ", ".join(k for k in record if k != "_line")
                    raise DataError(
                        f"{where}: missing the field {column!r} (set by `{key}_field`); the row has: {present}"
                        + ("; set `solution_field: null` if the data has no reference solutions" if key == SOLUTION else "")
                    )
                item[key] = str(record[column])
            try:
                item["prompt_ids"] = prompts.encode(self.template, self.max_prompt_tokens, problem=item[PROBLEM])
            except PromptTooLongError as error:
                raise DataError(f"{where}: {error} (`max_prompt_tokens` on the data module)") from None
            items.append(item)
        self.datasets[split] = PromptDataset(items)
        return self.datasets[split]

    def setup(self, stage: str) -> None:
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}[stage]
        for split in splits:
            if self.paths[split] is not None or split != "val":
                self.prepare(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.prepare(split),
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if self.paths["val"] else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
