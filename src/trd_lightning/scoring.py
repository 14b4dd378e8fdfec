"""Scoring passes without autograd, in the step's micro-batches: the teacher's log-probabilities of targets after
their contexts (for refiners and diagnostics), and the student's of its own samples (for the stale-weights guard).

Every rank runs the same passes (a sharded forward is a collective), so they go through the same planner as the
training forwards; what the teacher keeps gathered for one micro-batch is released before the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trd_lightning.micro_batches import MicroBatcher
from trd_lightning.models import evaluating, last_hidden_at, output_head
from trd_lightning.rollout.base import STUDENT
from trd_lightning.scores import TeacherScores, token_stats
from trd_lightning.teachers import Teacher
from trd_lightning.teachers.local import TEACHER


@dataclass
class Scorer:
    """``packs(role)``: whether that model's micro-batches are packed; ``chunk_size``: positions per logits block."""

    teacher: Teacher
    student: nn.Module
    batcher: MicroBatcher
    packs: Callable[[str], bool]
    chunk_size: int

    def teacher_logprobs(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                         ) -> Iterator[tuple[list[int], Tensor, TeacherScores, Tensor | None]]:
        """Per micro-batch: (rows, the teacher's log-probability of each of their target tokens in row order, its
        scores, its log-normalisers or None); ``rows`` empty for a filler pass."""
        for rows, inputs in self.batcher.inputs(contexts, targets, self.packs(TEACHER)):
            scores = self.teacher.score(inputs)
            logprobs, lse = scores.target_logprobs(inputs.input_ids[inputs.target_mask].to(self.batcher.device), self.chunk_size)
            yield rows, logprobs, scores, lse
            self.teacher.release()

    def teacher_mean_logprobs(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[float]:
        """The teacher's mean log-probability per token of each target after its context (-inf for an empty target)."""
        means = [float("-inf")] * len(targets)
        for rows, logprobs, _, _ in self.teacher_logprobs(contexts, targets):
            for r, values in zip(rows, logprobs.split([len(targets[r]) for r in rows])):
                if len(values):
                    means[r] = float(values.mean())
        return means

    @torch.no_grad()
    def student_logprobs(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> Tensor:
        """The student's log-probabilities (temperature 1, eval mode) of every target token, concatenated in row order."""
        weight, bias = output_head(self.student)
        found: list[Tensor] = [torch.empty(0, dtype=torch.float32)] * len(targets)
        with evaluating(self.student):
            for rows, inputs in self.batcher.inputs(contexts, targets, self.packs(STUDENT)):
                hidden = last_hidden_at(self.student, inputs.to(self.batcher.device))
                logprobs, _ = token_stats(hidden, weight, bias, inputs.input_ids[inputs.target_mask].to(self.batcher.device), self.chunk_size)
                for row, values in zip(rows, logprobs.split([len(targets[r]) for r in rows])):
                    found[row] = values
        return torch.cat(found) if found else torch.empty(0, dtype=torch.float32)
