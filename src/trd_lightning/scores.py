"""What a teacher's scoring pass gives the loss, at each of a micro-batch's N target positions.

- ``DenseScores``: the teacher's last hidden states and its LM head (a teacher in the trainer's process). The
  divergence computes its logits chunk by chunk, so every divergence over the full vocabulary applies.
- ``SparseScores``: the teacher's top-k token ids and log-probabilities, and the log-probability of the target
  token itself (a teacher served by an inference engine, which sends no more). Top-k divergences and the
  sampled-token estimators apply; the full vocabulary does not.

Both give the target token's log-probability and the teacher's probability mass on a set of tokens (the
diagnostics' pivot tokens) in the same shape, so nothing downstream asks which kind it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """fp32 logits of an LM head over these hidden states: the one place a [N, V] block is made, a chunk at a time."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.float()


@torch.no_grad()
def token_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """A model's log-probability of each target and its log-normaliser at each of N positions, a chunk at a time."""
    logprobs, lse = (torch.empty(len(targets), dtype=torch.float32, device=hidden.device) for _ in range(2))
    for start in range(0, len(targets), chunk_size):
        rows = slice(start, start + chunk_size)
        logits = head_logits(hidden[rows], weight, bias)
        lse[rows] = logits.logsumexp(-1)
        logprobs[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
    return logprobs, lse


@torch.no_grad()
def pivot_mass(hidden: Tensor, weight: Tensor, bias: Tensor | None, lse: Tensor, token_ids: Sequence[int]) -> Tensor:
    """The total probability on ``token_ids`` at each position: [N] (their logits only, over the given normalisers)."""
    if not token_ids:
        return torch.zeros(len(lse), dtype=torch.float32, device=lse.device)
    index = torch.as_tensor(list(token_ids), device=weight.device)
    return (head_logits(hidden, weight[index], None if bias is None else bias[index]) - lse[:, None]).exp().sum(-1)


@dataclass
class DenseScores:
    """The teacher's whole distribution at each target position, as hidden states and the head that makes logits."""

    hidden: Tensor  # [N, H_t]: last hidden states at the positions that predict each target token
    weight: Tensor  # [V, H_t]: the LM head
    bias: Tensor | None = None  # [V]: the head's bias, if it has one
    kind: ClassVar[str] = "dense"

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def target_logprobs(self, targets: Tensor, chunk_size: int = 256) -> tuple[Tensor, Tensor | None]:
        """log q(target) at temperature 1, and the log-normaliser at each position (for ``pivot_mass``)."""
        return token_stats(self.hidden, self.weight, self.bias, targets, chunk_size)

    def pivot_mass(self, token_ids: Sequence[int], lse: Tensor | None) -> Tensor:
        """The teacher's total probability on ``token_ids`` at each position: [N]."""
        return pivot_mass(self.hidden, self.weight, self.bias, lse, token_ids)


@dataclass
class SparseScores:
    """The teacher's top-k at each target position, by descending log-probability, and the target's own."""

    ids: Tensor  # [N, k] long: the teacher's k most likely tokens
    logprobs: Tensor  # [N, k] float32: their log-probabilities at temperature 1 (normalised over the whole vocabulary)
    target_logprob: Tensor  # [N] float32: log q(target token), whether or not it is in the top-k
    kind: ClassVar[str] = "sparse"

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]

    def select(self, rows) -> SparseScores:
        return SparseScores(self.ids[rows], self.logprobs[rows], self.target_logprob[rows])

    def to(self, device) -> SparseScores:
        return SparseScores(self.ids.to(device), self.logprobs.to(device), self.target_logprob.to(device))

    def target_logprobs(self, targets: Tensor, chunk_size: int = 256) -> tuple[Tensor, Tensor | None]:
        return self.target_logprob, None

    def pivot_mass(self, token_ids: Sequence[int], lse: Tensor | None = None) -> Tensor:
        """The mass on ``token_ids`` among the top-k: a lower bound (what lies outside the top-k is not sent)."""
        if not token_ids:
            return torch.zeros(len(self), dtype=torch.float32, device=self.ids.device)
        wanted = torch.isin(self.ids, torch.as_tensor(list(token_ids), device=self.ids.device))
        return (self.logprobs.exp() * wanted).sum(-1)

    @classmethod
    def cat(cls, parts: Sequence[SparseScores]) -> SparseScores:
        """Several rows' scores, one after another (row-major target order)."""
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in ("ids", "logprobs", "target_logprob")))

    @classmethod
    @torch.no_grad()
    def from_logits(cls, logits: Tensor, targets: Tensor, top_k: int) -> SparseScores:
        """What a server sends for a teacher with these [N, V] logits: its top-k and the targets' log-probabilities."""
        logprobs = logits.float().log_softmax(-1)
        top, ids = logprobs.topk(top_k, dim=-1)
        return cls(ids, top, logprobs.gather(-1, targets[:, None]).squeeze(-1))


TeacherScores = DenseScores | SparseScores


@dataclass(frozen=True)
class DecodedScores:
    """A teacher's scores of tokens it generated, taken from the decode itself (the unprocessed distribution at each
    step, which is the one a scoring pass would compute in the same context): valid for exactly these
    ``token_ids`` after exactly this ``context``, and used for nothing else (``fits``)."""

    context: tuple[int, ...]
    token_ids: tuple[int, ...]
    scores: SparseScores  # [len(token_ids), k]

    def fits(self, context: Sequence[int], token_ids: Sequence[int]) -> bool:
        return len(token_ids) == len(self.token_ids) and tuple(token_ids) == self.token_ids and tuple(context) == self.context
