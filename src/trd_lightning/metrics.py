"""Evaluation metrics: Avg@n and the unbiased Pass@k, as torchmetrics that reduce correctly under DDP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator 1 - C(n-c, k) / C(n, k) of the chance that k of n samples hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i), a product that stays in floating-point range.
    ratio = 1.0
    for i in range(n - c + 1, n + 1):
        ratio *= 1.0 - k / i
    return 1.0 - ratio


PER_SAMPLE = ("tests_passed", "steps_valid")


def check_pass_k(n: int, ks: Sequence[int]) -> None:
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"pass@k needs 1 <= k <= n for every k (n={n}, ks={list(ks)})")


class SampledAccuracy(Metric):
    """Over problems with n verified samples each: Avg@n (mean share correct) and Pass@k per k; and the per-sample
    means a verifier can add (``PER_SAMPLE``): ``tests_passed``, the fraction of a row's tests a sample passed
    (code), and ``steps_valid``, the share of samples whose every step is right (tasks whose steps can be checked).

    States are sums and a count, so the DDP reduction (a sum) gives the exact global mean.
    """

    full_state_update = False

    def __init__(self, n: int, ks: Sequence[int] = (1,)):
        super().__init__()
        check_pass_k(n, ks)
        self.n, self.ks = n, list(ks)
        self.add_state("avg_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pass_sum", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        for name in PER_SAMPLE:
            self.add_state(f"{name}_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct_per_problem: Sequence[int], **per_sample: Sequence[float] | None) -> None:
        counts = [int(c) for c in correct_per_problem]
        if any(not 0 <= c <= self.n for c in counts):
            raise ValueError(f"a problem's correct count must be in [0, {self.n}] (got {counts})")
        device = self.pass_sum.device
        passes = torch.tensor([[pass_at_k(self.n, c, k) for k in self.ks] for c in counts], dtype=torch.float64, device=device)
        # Out of place: a reset inside validation (inference mode) leaves inference tensors behind.
        self.avg_sum = self.avg_sum + sum(counts) / self.n
        self.pass_sum = self.pass_sum + passes.sum(0)
        self.problems = self.problems + len(counts)
        for name, values in per_sample.items():
            if name not in PER_SAMPLE:
                raise ValueError(f"unknown per-sample value {name!r}; known: {list(PER_SAMPLE)}")
            if values is not None:
                setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + float(sum(values)))
                setattr(self, f"{name}_count", getattr(self, f"{name}_count") + len(values))

    def compute(self) -> dict[str, torch.Tensor]:
        """Avg@n, Pass@k per k, and the number of problems, over every process."""
        count = self.problems.clamp(min=1)
        out = {"problems": self.problems.clone(), f"avg@{self.n}": (self.avg_sum / count).float()}
        for i, k in enumerate(self.ks):
            out[f"pass@{k}"] = (self.pass_sum[i] / count).float()
        for name in PER_SAMPLE:
            if getattr(self, f"{name}_count") > 0:  # the same on every process: the states are already reduced
                out[name] = (getattr(self, f"{name}_sum") / getattr(self, f"{name}_count")).float()
        return out
