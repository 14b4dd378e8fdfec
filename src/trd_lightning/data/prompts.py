"""Prompt data: problems (with an answer and, for OPSD, a reference solution) from JSONL, parquet or CSV files, a
``save_to_disk`` folder or a hub dataset in the local cache (``data.sources``), rendered with the student's prompt
template and the tokenizer's chat template."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from trd_lightning.data.sources import DataError, locate, read_rows
from trd_lightning.distributed import distributed
from trd_lightning.templates import PROBLEM, SOLUTION, Template
from trd_lightning.views import ChatPrompts, PromptTooLongError


@dataclass
class PromptBatch:
    """A batch of problems, each with its student prompt's token ids."""

    index: list[int]
    problem: list[str]
    answer: list[str | None]
    solution: list[str | None]
    prompt_ids: list[list[int]]
    padding: list[bool] = field(default_factory=list)  # evaluation filler that keeps ranks in step; never scored

    def __len__(self) -> int:
        return len(self.index)

    def prompts_of(self, prompt_index: Sequence[int]) -> list[list[int]]:
        """The student prompt of each row (a rollout's, by its ``prompt_index``)."""
        return [self.prompt_ids[i] for i in prompt_index]


class PromptDataset(Dataset):
    """Tokenized problems. Positions past the end (asked for by ``EvenShardSampler``) return a copy of an
    item marked as padding."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)  # the items themselves, never the padding positions

    def __getitem__(self, i: int) -> dict:
        if i < len(self.items):
            return self.items[i]
        return {**self.items[i % len(self.items)], "padding": True}


class EvenShardSampler(DistributedSampler):
    """Evaluation under DDP/FSDP: each rank takes every world-size-th problem, all ranks the same number
    (sharded models gather weights in every forward, so every rank must run as many); the positions past
    the end are padding, which no metric counts."""

    def __init__(self, dataset: Dataset):
        super().__init__(dataset, shuffle=False, drop_last=False)

    def __iter__(self):
        return iter(range(self.rank, self.num_samples * self.num_replicas, self.num_replicas))


def collate(items: list[dict]) -> PromptBatch:
    return PromptBatch(
        index=[it["index"] for it in items],
        problem=[it["problem"] for it in items],
        answer=[it["answer"] for it in items],
        solution=[it["solution"] for it in items],
        prompt_ids=[it["prompt_ids"] for it in items],
        padding=[it.get("padding", False) for it in items],
    )


class PromptDataModule(LightningDataModule):
    """Problems for distillation and evaluation.

    ``problem_field``, ``answer_field`` and ``solution_field`` say where each comes from in a row: a column name,
    or a path into a column that holds JSON or nested data (``solutions[0]``: the first element of the
    ``solutions`` list).

    Args:
        train_path: the training problems: a ``.jsonl``, ``.parquet`` or ``.csv`` file, a folder written by ``datasets``'
            ``save_to_disk`` or holding data files, or a hub dataset id (``owner/name``) already in the local hub cache,
            read offline; as a mapping, ``{path: ..., split: ..., config: ...}`` picks a split (and a hub dataset's
            configuration) and may override the fields as ``val_path``'s mappings do. Null: none (evaluation only).
        val_path: the validation problems: one such file, or several as ``{name: path}``; metrics are then
            reported per dataset, as ``val/<name>/...``. A dataset in its own schema gives a mapping instead
            of the path: ``{path: ..., problem_field: ..., answer_field: ..., solution_field: ...,
            starter_field: ..., prompt_template: ...}``, each key overriding the module's setting (and ``split``,
            ``config``: which split and configuration of a saved or hub dataset). Null: no validation.
        test_path: the test problems, given as ``val_path`` is (metrics as ``test/<name>/...``).
        problem_field: where a row's problem is (a column, or a path into one).
        answer_field: where a row's reference answer is (a column, or a path into one). It may also map names to
            columns (``{tests: input_output}``; a list of columns gives a list of values): the answer is then that
            JSON object, which is how code rows carry their tests (``trd_lightning.code_tests``).
        solution_field: where a row's reference solution is (a column, or a path into one); null when the data has
            none (OPSD and reference-based refining need them).
        starter_field: a column with code the solution must start from (a signature, a class skeleton); when
            the row has one, the student's problem text ends with it in a code block.
        prompt_template: the student's user message (a built-in name, a file, or text with ``{problem}``).
        system_prompt: a system message put before each student prompt; null: none.
        max_prompt_tokens: a longer student prompt is an error at setup, naming the row.
        batch_size: prompts per process per optimizer step (a batch is one step: its rollouts are sampled in
            one engine call; ``model.max_tokens_per_micro_batch`` bounds what one forward pass holds).
        eval_batch_size: prompts per process per evaluation batch (default: ``batch_size``).
        shuffle: draw training problems in a random order (seeded); off, in file order (under DDP, process r
            takes problems r, r + world_size, ...).
        num_workers: DataLoader worker processes; 0 loads in the main process.
        tokenizer: the student's tokenizer; the CLI passes the model's own.
    """

    def __init__(
        self,
        train_path: str | dict | None = None,
        val_path: str | dict[str, str | dict] | None = None,
        test_path: str | dict[str, str | dict] | None = None,
        problem_field: str = "problem",
        answer_field: str | dict[str, str | list[str]] = "answer",
        solution_field: str | None = "solution",
        starter_field: str | None = None,
        prompt_template: str = "math_student",
        system_prompt: str | None = None,
        max_prompt_tokens: int = 1024,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
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
        self.paths, self.overrides = {}, {}
        for split, path in (("train", train_path), ("val", val_path), ("test", test_path)):
            self.paths[split] = {}
            for name, spec in named_paths(path, split).items():
                self.paths[split][name], self.overrides[(split, name)] = dataset_spec(spec, f"{split}_path {name!r}")
        if isinstance(answer_field, dict) and not answer_field:
            raise ValueError("data answer_field is an empty mapping; map at least one name to a column")
        self.fields = {PROBLEM: problem_field, "answer": answer_field, SOLUTION: solution_field}
        self.starter_field = starter_field
        self.template = Template(prompt_template, "data prompt_template").require(PROBLEM)
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.tokenizer = tokenizer
        self.datasets: dict[tuple[str, str], PromptDataset] = {}

    @property
    def has_solutions(self) -> bool:
        return self.dataset_fields("train", "train")[SOLUTION] is not None

    def dataset_fields(self, split: str, name: str) -> dict:
        """Where problem, answer and solution come from in this dataset (its overrides, else the module's)."""
        overrides = self.overrides.get((split, name), {})
        return {key: overrides.get(f"{key}_field", column) for key, column in self.fields.items()}

    def dataset_names(self, split: str) -> list[str]:
        return list(self.paths[split])

    def prepare(self, split: str, name: str | None = None) -> PromptDataset:
        """Read, check and tokenize one dataset of a split (once)."""
        name = name or split
        if (split, name) in self.datasets:
            return self.datasets[(split, name)]
        if name not in self.paths[split]:
            if not self.paths[split]:
                raise DataError(f"no {split}_path is set on the data module")
            raise DataError(f"no {split} dataset named {name!r}; there are {list(self.paths[split])}")
        path = self.paths[split][name]
        if self.tokenizer is None:
            raise DataError("the data module needs the student's tokenizer (the CLI links it; pass `tokenizer=` in code)")
        prompts = ChatPrompts(self.tokenizer, self.system_prompt)
        overrides = self.overrides.get((split, name), {})
        fields = self.dataset_fields(split, name)
        starter_field = overrides.get("starter_field", self.starter_field)
        template = self.template
        if "prompt_template" in overrides:
            template = Template(overrides["prompt_template"], f"{split}_path {name!r} prompt_template").require(PROBLEM)
        records = read_rows(path, overrides.get("split"), overrides.get("config"))
        if not records:
            raise DataError(f"{split} data {path!r} is empty: it needs at least one problem")
        items = []
        for i, record in enumerate(records):
            where = f"{path}:{record['_line']}"
            item = {"index": i, "source": where}
            for key, column in fields.items():
                if column is None:
                    item[key] = None
                elif isinstance(column, dict):
                    item[key] = json.dumps({slot: ([field_value(record, c, where, key) for c in columns] if isinstance(columns, list)
                                                   else field_value(record, columns, where, key)) for slot, columns in column.items()})
                else:
                    value = field_value(record, column, where, key)
                    item[key] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            starter = lookup(record, starter_field) if starter_field else None
            if isinstance(starter, str) and starter.strip():
                item[PROBLEM] = STARTER.format(problem=item[PROBLEM], starter=starter.strip("\n"))
            try:
                item["prompt_ids"] = prompts.encode(template, self.max_prompt_tokens, problem=item[PROBLEM])
            except PromptTooLongError as error:
                raise DataError(f"{where}: {error} (`max_prompt_tokens` on the data module)") from None
            items.append(item)
        self.datasets[(split, name)] = PromptDataset(items)
        return self.datasets[(split, name)]

    def setup(self, stage: str) -> None:
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}[stage]
        for split in splits:  # every file of the stage is there, before any is read
            for name in self.dataset_names(split):
                self.check_path(split, name)
        for split in splits:
            if split == "val" and not self.paths["val"]:
                continue
            for name in self.dataset_names(split) or [split]:
                self.prepare(split, name)

    def setting(self, split: str, name: str) -> str:
        """Where a config sets this dataset's path."""
        return f"data.init_args.{split}_path" + ("" if name == split else f".{name}")

    def check_path(self, split: str, name: str) -> None:
        """The dataset's file is there; else a ``DataError`` naming the setting and the path."""
        path = self.paths[split][name]
        try:
            locate(path, f"{split} data")
        except DataError as error:
            raise DataError(f"{self.setting(split, name)}: {error}") from None

    def train_dataloader(self) -> StatefulDataLoader:
        # Stateful: Lightning checkpoints its position (and shuffle generator), so a resumed run goes on mid-epoch.
        dataset = self.prepare("train")
        if not distributed():
            return StatefulDataLoader(dataset, batch_size=self.batch_size, shuffle=self.shuffle, collate_fn=collate, num_workers=self.num_workers)
        # Under DDP/FSDP a stateful distributed sampler of our own: Lightning keeps it (it replaces only plain samplers,
        # with one whose position a checkpoint does not hold), seeded as Lightning seeds its own.
        sampler = StatefulDistributedSampler(dataset, shuffle=self.shuffle, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        return StatefulDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate, num_workers=self.num_workers)

    def eval_dataloaders(self, split: str) -> DataLoader | list[DataLoader]:
        loaders = []
        for name in self.dataset_names(split):
            dataset = self.prepare(split, name)
            sampler = EvenShardSampler(dataset) if distributed() else None
            loaders.append(DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=collate, num_workers=self.num_workers))
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.eval_dataloaders("val") if self.paths["val"] else []

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.eval_dataloaders("test")


STARTER = "{problem}\n\nYour solution must start from this code:\n```python\n{starter}\n```"
_STEP = re.compile(r"\.([^.\[\]]+)|\[(-?\d+)\]")


MISSING = object()  # ``find``'s answer for a field that is not there (a field that is null is None)


def lookup(record: dict, path: str):
    """A row's value at ``path``: a column, or a column followed by ``[index]`` / ``.key`` steps into its
    data (a column holding JSON text is decoded first). None when absent."""
    value = find(record, path)
    return None if value is MISSING else value


def find(record: dict, path: str):
    """As ``lookup``, but ``MISSING`` when the field is absent, None when it is there and null."""
    if path in record:
        return record[path]
    head = re.match(r"[^.\[\]]+", path)
    if head is None or head[0] not in record:
        return MISSING
    value, rest = record[head[0]], path[head.end():]
    steps = list(_STEP.finditer(rest))
    if "".join(step[0] for step in steps) != rest:
        return MISSING  # not a path this reads: reported as a missing field
    for step in steps:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return MISSING
        key, index = step.groups()
        try:
            value = value[int(index)] if index is not None else value[key]
        except (IndexError, KeyError, TypeError):
            return MISSING
    return value


def field_value(record: dict, path: str, where: str, key: str):
    value = find(record, path)
    fix = "; set `solution_field: null` if the data has no reference solutions" if key == SOLUTION else ""
    if value is MISSING:
        present = ", ".join(k for k in record if k != "_line")
        raise DataError(f"{where}: missing the field {path!r} (set by `{key}_field`); the row has: {present}{fix}")
    if value is None:
        raise DataError(f"{where}: the field {path!r} (set by `{key}_field`) is null; give the row its {key}, or drop the row{fix}")
    return value


DATASET_KEYS = ("path", "split", "config", "problem_field", "answer_field", "solution_field", "starter_field", "prompt_template")


def dataset_spec(spec: str | dict, where: str) -> tuple[str, dict]:
    """A dataset's path and its field overrides."""
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, dict) or "path" not in spec:
        raise DataError(f"{where} must be a path or a mapping with a `path` (got {spec!r})")
    unknown = sorted(set(spec) - set(DATASET_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; a dataset may set {list(DATASET_KEYS)}")
    overrides = {k: v for k, v in spec.items() if k != "path"}
    return spec["path"], overrides


def named_paths(path: str | dict | None, split: str) -> dict:
    """``{name: path}`` for a split: a single path is named after the split."""
    if path is None:
        return {}
    if isinstance(path, str) or (isinstance(path, dict) and isinstance(path.get("path"), str) and set(path) <= set(DATASET_KEYS)):
        return {split: path}  # one dataset, unnamed
    if not path:
        raise DataError(f"{split}_path is an empty mapping; give at least one dataset or null")
    return dict(path)
