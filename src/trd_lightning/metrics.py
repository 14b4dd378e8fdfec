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


class SampledAccuracy(Metric):
    """Over problems with n verified samples each: Avg@n (mean share correct) and Pass@k per k, and, when
    the verifier grades tests (code), ``tests_passed``: the mean fraction of a row's tests a sample passed.

    States are sums and a count, so the DDP reduction (a sum) gives the exact global mean.
    """

    full_state_update = False

    def __init__(self, n: int, ks: Sequence[int] = (1,)):
        super().__init__()
        if any(not 1 <= k <= n for k in ks):
            raise ValueError(f"pass@k needs 1 <= k <= n for every k (n={n}, ks={list(ks)})")
        self.n, self.ks = n, list(ks)
        self.add_state("avg_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pass_sum", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("tests_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tests_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct_per_problem: Sequence[int], tests_passed: Sequence[float] | None = None) -> None:
        counts = [int(c) for c in correct_per_problem]
        if any(not 0 <= c <= self.n for c in counts):
            raise ValueError(f"a problem's correct count must be in [0, {self.n}] (got {counts})")
        device = self.pass_sum.device
        passes = torch.tensor([[pass_at_k(self.n, c, k) for k in self.ks] for c in counts], dtype=torch.float64, device=device)
        # Out of place: a reset inside validation (inference mode) leaves inference tensors behind.
        self.avg_sum = self.avg_sum + sum(counts) / self.n
        self.pass_sum = self.pass_sum + passes.sum(0)
        self.problems = self.problems + len(counts)
        if tests_passed is not None:  # per sample, a diagnostic
            self.tests_sum = self.tests_sum + float(sum(tests_passed))
            self.tests_count = self.tests_count + len(tests_passed)

    def compute(self) -> dict[str, torch.Tensor]:
        """Avg@n, Pass@k per k, and the number of problems, over every process."""
        count = self.problems.clamp(min=1)
        out = {"problems": self.problems.clone(), f"avg@{self.n}": (self.avg_sum / count).float()}
        for i, k in enumerate(self.ks):
            out[f"pass@{k}"] = (self.pass_sum[i] / count).float()
        if self.tests_count > 0:  # the same on every process: the states are already reduced
            out["tests_passed"] = (self.tests_sum / self.tests_count).float()
        return out
