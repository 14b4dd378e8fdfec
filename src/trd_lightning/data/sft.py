"""Supervised fine-tuning data: (user message, response) pairs; the loss covers the response only.

Validation and test splits are prompt data (problems with answers), so SFT runs report the
same generation accuracy as distillation runs.
"""

from __future__ import annotations

from functools import partial

from torch.utils.data import DataLoader

from trd_lightning.data.prompts import DataError, PromptDataModule, PromptDataset
from trd_lightning.data.sources import read_rows
from trd_lightning.models import stop_token_ids
from trd_lightning.views import ChatPrompts, ModelInputs, pack


def collate_examples(items: list[dict], pad_id: int) -> ModelInputs:
    return pack([it["prompt_ids"] for it in items], [it["target_ids"] for it in items], pad_id)


class SFTDataModule(PromptDataModule):
    """``train_path`` holds rows with ``prompt_field`` (the user message) and ``response_field``.

    The other arguments are ``PromptDataModule``'s. The training examples are always shuffled and use neither
    ``prompt_template`` nor ``max_prompt_tokens``; those, and ``problem_field``, ``answer_field`` and
    ``solution_field``, apply to ``val_path`` and ``test_path``, which hold problems, as for distillation.

    Args:
        prompt_field: the column of a training row holding the user message, as the model sees it.
        response_field: the column of a training row holding the response the model learns.
        max_tokens: the longest training example (prompt + response, in tokens); a longer one is an error at setup.
    """

    def __init__(self, *args, prompt_field: str = "prompt", response_field: str = "response", max_tokens: int = 2048, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt_field, self.response_field, self.max_tokens = prompt_field, response_field, max_tokens

    def train_examples(self) -> list[tuple[str, str]]:
        path = self.paths["train"].get("train")
        records = read_rows(path) if path else []
        for record in records:
            for column in (self.prompt_field, self.response_field):
                if column not in record:
                    raise DataError(f"{path}:{record.get('_line', '?')}: missing the field {column!r}")
        return [(str(r[self.prompt_field]), str(r[self.response_field])) for r in records]

    def prepare(self, split: str, name: str | None = None) -> PromptDataset:
        if split != "train":
            return super().prepare(split, name)
        if ("train", "train") not in self.datasets:
            examples = self.train_examples()
            if not examples:
                raise DataError("SFT training data is empty: it needs at least one (prompt, response) pair")
            prompts, stop_ids = ChatPrompts(self.tokenizer, self.system_prompt), stop_token_ids(self.tokenizer)
            items = []
            for i, (message, response) in enumerate(examples):
                prompt, target = prompts.chat_ids(message), prompts.response_ids(message, response, stop_ids)
                if len(prompt) + len(target) > self.max_tokens:
                    raise DataError(f"SFT example {i} is {len(prompt) + len(target)} tokens, over max_tokens={self.max_tokens}")
                items.append({"prompt_ids": prompt, "target_ids": target})
            self.datasets[("train", "train")] = PromptDataset(items)
        return self.datasets[("train", "train")]

    def train_dataloader(self) -> DataLoader:
        # A plain DataLoader: its shuffle order is what rebuilds the demo models bit for bit.
        return DataLoader(
            self.prepare("train"),
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=partial(collate_examples, pad_id=self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )
