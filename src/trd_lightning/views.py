"""What each model sees: chat-templated contexts, and (context, target) token sequences.

Two guarantees live here and nowhere else:
- a context that is too long loses tail tokens of its reference solution or initial attempt,
  never of the problem statement;
- the student's and the teacher's sequences hold the *same* target token ids, and each
  target mask covers those ids and nothing else (not the context, not padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trd_lightning.templates import ATTEMPT, SOLUTION, Template

TRIM_MARK = " [...]"
TRIMMABLE = (ATTEMPT, SOLUTION)  # trimmed in this order of preference when equally long; never the problem


class PromptTooLongError(ValueError):
    pass


def trim_cap(lengths: list[int], excess: int) -> int:
    """The largest cap c such that cutting every length down to c removes at least ``excess`` tokens (0 if none does)."""
    for cap in range(max(lengths, default=0), 0, -1):
        if sum(max(0, n - cap) for n in lengths) >= excess:
            return cap
    return 0


class ChatPrompts:
    """Renders templates into chat-formatted prompt token ids, ending with the assistant header."""

    def __init__(self, tokenizer, system_prompt: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                "set `chat_template` on the model (a Jinja string, a file, or 'chatml' for the built-in one)"
            )
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_ids(self, user_message: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.messages(user_message), tokenize=False, add_generation_prompt=True)
        return self.text_ids(text)

    def response_ids(self, user_message: str, response: str, stop_ids: set[int]) -> list[int]:
        """The tokens the chat template puts after the prompt for an assistant ``response``, up to
        and including the first stop token: what a model must generate to answer that way."""
        messages = [{"role": "user", "content": user_message}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False, add_generation_prompt=False
        )
        if not full.startswith(prompt):
            raise ValueError("the chat template renders an assistant turn that does not extend the generation prompt")
        ids = self.text_ids(full[len(prompt):])
        stop = next((i for i, token in enumerate(ids) if token in stop_ids), None)
        if stop is None:
            raise ValueError("the chat template ends an assistant turn with no stop token")
        return ids[: stop + 1]

    def too_long(self, template: Template, problems: Sequence[str], max_tokens: int) -> list[tuple[int, int]]:
        """(index, length) of each problem whose prompt from ``template`` is over ``max_tokens`` even with every
        trimmable field (attempt, reference solution) cut to nothing: the least ``encode`` can make it, so these would
        fail there. A text of at most ``max_tokens`` bytes is not tokenized (a token holds at least one byte)."""
        empty = {field: "" for field in TRIMMABLE}
        texts = {i: self.tokenizer.apply_chat_template(self.messages(template.render(problem=problem, **empty)), tokenize=False,
                                                       add_generation_prompt=True) for i, problem in enumerate(problems)}
        longer = [i for i, text in texts.items() if len(text.encode("utf-8")) > max_tokens]
        lengths = self.tokenizer([texts[i] for i in longer], add_special_tokens=False)["input_ids"] if longer else []
        return [(i, len(ids)) for i, ids in zip(longer, lengths) if len(ids) > max_tokens]

    def messages(self, user_message: str) -> list[dict]:
        messages = [{"role": "user", "content": user_message}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def encode(self, template: Template, max_tokens: int, **fields: str | None) -> list[int]:
        """Token ids of ``template`` filled with ``fields``, at most ``max_tokens`` long.

        Over the limit, the longest trimmable field (attempt, reference solution) loses tail
        tokens until the prompt fits. If it cannot fit with those fields emptied, it fails.
        """
        fields = dict(fields)
        ids = self.chat_ids(template.render(**fields))
        if len(ids) <= max_tokens:
            return ids
        trimmable = [f for f in TRIMMABLE if f in template.fields]
        field_ids = {f: self.text_ids(fields[f]) for f in trimmable}
        mark = len(self.text_ids(TRIM_MARK))
        while len(ids) > max_tokens:
            if not any(field_ids.values()):
                raise PromptTooLongError(
                    f"a {template.role} prompt is {len(ids)} tokens, over the limit of {max_tokens}, and only "
                    f"{', '.join('{' + f + '}' for f in trimmable) or 'nothing'} may be trimmed (the problem never is); "
                    "raise the limit or drop the problem from the dataset"
                )
            # Trim the longest fields first, down to a common cap, so both keep their beginnings.
            cap = trim_cap([len(field_ids[f]) for f in trimmable], len(ids) - max_tokens + mark * len(trimmable))
            for f in trimmable:
                if len(field_ids[f]) > cap:
                    field_ids[f] = field_ids[f][:cap]
                    fields[f] = self.tokenizer.decode(field_ids[f]) + TRIM_MARK if cap else ""
            ids = self.chat_ids(template.render(**fields))
        return ids


@dataclass
class ModelInputs:
    """One model's batch and the mask of its target tokens: right-padded rows, or (``position_ids`` set) every
    sequence packed into one row, positions restarting at 0 per sequence and no attention mask, so that
    transformers keeps each sequence's attention inside it (block-diagonal for sdpa/eager, varlen kernels for
    flash-attention)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor | None  # [B, L]; None when packed
    target_mask: torch.Tensor  # [B, L] bool: True exactly at target tokens
    position_ids: torch.Tensor | None = None  # [1, L] when packed

    def predicting_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of the positions whose next-token distribution scores each target token,
        in row-major target order: the position just before each target token."""
        rows, cols = self.target_mask.nonzero(as_tuple=True)
        return rows, cols - 1

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        """Each sequence's (context, target) token ids, as ``pack`` was given them (for a teacher scored elsewhere)."""
        if self.position_ids is None:
            rows = [(ids[keep.bool()], target[keep.bool()]) for ids, keep, target in zip(self.input_ids, self.attention_mask, self.target_mask)]
        else:
            starts = [*(self.position_ids[0] == 0).nonzero().flatten().tolist(), self.input_ids.shape[1]]
            rows = [(self.input_ids[0, a:b], self.target_mask[0, a:b]) for a, b in zip(starts, starts[1:])]
        return [(ids[~target].tolist(), ids[target].tolist()) for ids, target in rows]

    @property
    def processed_tokens(self) -> int:
        """Token positions a forward pass computes, padding included."""
        return int(self.input_ids.numel())

    def to(self, device) -> ModelInputs:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ModelInputs(move(self.input_ids), move(self.attention_mask), move(self.target_mask), move(self.position_ids))


@dataclass
class Views:
    student: ModelInputs
    teacher: ModelInputs
    target_ids: torch.Tensor  # [N]: every target token of the batch, row-major
    target_lengths: torch.Tensor  # [B]

    @property
    def num_target_tokens(self) -> int:
        return int(self.target_ids.numel())


def pack(contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int, packed: bool = False) -> ModelInputs:
    """``context + target`` sequences, right-padded one per row or (``packed``) concatenated into one row;
    the target mask marks the target tokens."""
    for row, context in enumerate(contexts):
        if not context:
            raise ValueError(f"row {row} has an empty context: the first target token would have no position to score it")
    sequences = [[*context, *target] for context, target in zip(contexts, targets)]
    if packed:
        input_ids = torch.tensor([token for sequence in sequences for token in sequence], dtype=torch.long)[None]
        position_ids = torch.cat([torch.arange(len(sequence)) for sequence in sequences])[None]
        target_mask = torch.tensor(
            [i >= len(context) for context, sequence in zip(contexts, sequences) for i in range(len(sequence))], dtype=torch.bool
        )[None]
        return ModelInputs(input_ids, None, target_mask, position_ids)
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    target_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (context, sequence) in enumerate(zip(contexts, sequences)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
        target_mask[row, len(context) : len(sequence)] = True
    return ModelInputs(input_ids, attention_mask, target_mask)


def build_views(
    student_contexts: Sequence[Sequence[int]],
    teacher_contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_id: int,
    packed: tuple[bool, bool] = (False, False),
) -> Views:
    """The student's and the teacher's sequences for the same targets; ``packed`` says, per model (student,
    teacher), whether its sequences go into one row without padding."""
    if not len(student_contexts) == len(teacher_contexts) == len(targets):
        raise ValueError(
            f"views need one context per target: {len(student_contexts)} student, "
            f"{len(teacher_contexts)} teacher, {len(targets)} targets"
        )
    student = pack(student_contexts, targets, pad_id, packed[0])
    teacher = pack(teacher_contexts, targets, pad_id, packed[1])
    target_ids = torch.tensor([token for target in targets for token in target], dtype=torch.long)
    # The invariant everything downstream relies on: both models score the same token ids, in order.
    assert torch.equal(student.input_ids[student.target_mask], target_ids), "student view lost target alignment"
    assert torch.equal(teacher.input_ids[teacher.target_mask], target_ids), "teacher view lost target alignment"
    lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    return Views(student, teacher, target_ids, lengths)
