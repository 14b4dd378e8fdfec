"""Prefix-failure diagnostics: why a run behaves as it does.

Along a trajectory (the student's rollout y_o, or the refined y_r), from the teacher's and the
student's log-probabilities of its tokens:
- perplexity of each model on it;
- the first position where the teacher gives the token a probability under a threshold (a
  "disagreement"), as a fraction of the length, and the share of the loss that comes after it;
- the teacher's probability mass on "epistemic pivot" tokens (Wait, Actually, However, ...),
  which rises where the teacher would rather interject than continue.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchmetrics import Metric

if TYPE_CHECKING:
    from trd_lightning.refiners import Targets
    from trd_lightning.rollout import Rollouts
    from trd_lightning.scoring import Scorer

DEFAULT_PIVOTS = ("Wait", "Actually", "However", "Hmm", "Alternatively", "Hold")


def pivot_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The single-token spellings (bare and with a leading space) of each pivot word."""
    ids, missing = set(), []
    for word in words:
        found = [tokenizer(form, add_special_tokens=False)["input_ids"] for form in (word, " " + word)]
        singles = {encoded[0] for encoded in found if len(encoded) == 1}
        ids |= singles
        if not singles:
            missing.append(word)
    if missing and words:
        warnings.warn(f"pivot words with no single-token spelling are not counted: {missing}", stacklevel=2)
    return sorted(ids)


def diagnose_rewrites(scorer: Scorer, scoring_contexts: Sequence[Sequence[int]], plain_contexts: Sequence[Sequence[int]],
                      rollouts: Rollouts, targets: Targets, pivot_ids: Sequence[int]) -> tuple[dict[str, list[float]], dict[str, list[Tensor]]]:
    """Extra teacher passes on a rewriting step: the teacher along each y_o in its scoring context (log-probabilities
    and pivot mass per token), and each rewrite's mean log-probability per token in the refine prompt it was written
    in and in the student's plain prompt (the problem alone). A rewrite likely only with the privileged context in
    view is suspect: an answer copied into a flawed derivation reads that way. Every rank runs the same passes.
    Returns per-row values and per-token tensors by name, for the step's record."""
    rows: dict[str, list[float]] = defaultdict(list)
    tokens: dict[str, list[Tensor]] = defaultdict(list)
    for kept, logprobs, scores, lse in scorer.teacher_logprobs(scoring_contexts, rollouts.token_ids):
        if kept:
            rows["diag_y_o_length"].extend(len(rollouts.token_ids[r]) for r in kept)
            tokens["diag_y_o_teacher_logprob"].append(logprobs)
            tokens["diag_y_o_pivot_mass"].append(scores.pivot_mass(pivot_ids, lse))
    for name, contexts in (("y_r_logprob_refine", targets.teacher_contexts), ("y_r_logprob_plain", plain_contexts)):
        means = scorer.teacher_mean_logprobs(contexts, targets.token_ids)
        rows[name] = [mean if refined else math.nan for mean, refined in zip(means, targets.refined)]
    return rows, tokens


def first_disagreement(teacher_logprobs: Tensor, lengths: Tensor, threshold: float) -> Tensor:
    """Per sequence, the index of the first token whose teacher probability is under ``threshold``; -1 if none."""
    below = teacher_logprobs < torch.log(torch.tensor(threshold, dtype=teacher_logprobs.dtype))
    firsts = []
    for flags in below.split(lengths.tolist()):
        hits = flags.nonzero()
        firsts.append(int(hits[0]) if len(hits) else -1)
    return torch.tensor(firsts, dtype=torch.long)


def trajectory_stats(
    lengths: Tensor,
    teacher_logprobs: Tensor,
    threshold: float,
    student_logprobs: Tensor | None = None,
    per_token_loss: Tensor | None = None,
    pivots: Tensor | None = None,
) -> dict[str, float]:
    """Diagnostics of a batch of trajectories whose N tokens are concatenated (``lengths`` per sequence)."""
    lengths = lengths.cpu()
    keep = lengths > 0
    out = {"teacher_ppl": float(torch.exp(-teacher_logprobs.mean()))}
    if student_logprobs is not None:
        out["student_ppl"] = float(torch.exp(-student_logprobs.mean()))
    if pivots is not None:
        out["pivot_permille"] = float(pivots.mean()) * 1000
    firsts = first_disagreement(teacher_logprobs.cpu(), lengths, threshold)
    hit = (firsts >= 0) & keep
    out["disagreement_rate"] = float(hit.sum() / keep.sum().clamp(min=1))
    if hit.any():
        out["first_disagreement"] = float((firsts[hit] / lengths[hit]).mean())
        if per_token_loss is not None:
            shares = []
            for first, values in zip(firsts.tolist(), per_token_loss.cpu().split(lengths.tolist())):
                total = float(values.sum())
                if first >= 0 and total > 0:
                    shares.append(float(values[first:].sum()) / total)
            if shares:
                out["loss_after_disagreement"] = sum(shares) / len(shares)
    return out


class PositionProfile(Metric):
    """Mean of a per-token value in ``bins`` bins of relative position (t / length); sums, so DDP-exact."""

    full_state_update = False

    def __init__(self, bins: int = 10):
        super().__init__()
        self.bins = bins
        self.add_state("sums", default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor, lengths: Tensor) -> None:
        lengths = lengths.to(values.device)
        relative = torch.cat([torch.arange(n, device=values.device) / n for n in lengths.tolist() if n > 0]) if len(values) else values
        index = (relative * self.bins).long().clamp(max=self.bins - 1)
        sums = torch.zeros(self.bins, dtype=torch.float64, device=values.device).index_add_(0, index, values.double())
        counts = torch.zeros(self.bins, dtype=torch.float64, device=values.device).index_add_(0, index, torch.ones_like(values, dtype=torch.float64))
        self.sums = self.sums + sums
        self.counts = self.counts + counts

    def compute(self) -> Tensor:
        return self.sums / self.counts.clamp(min=1)
