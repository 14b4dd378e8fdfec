"""The stale-weights guard: the engine's log-probabilities of the tokens it sampled, against the trainer's.

An engine that keeps its own copy of the weights (vLLM) can silently go on sampling from old ones after a
failed or skipped sync. Then the rollouts are off-policy while every logged number looks plausible. The
trainer rescores the sampled tokens with the student it is training; a synced engine agrees with it up
to numerics (about 1e-6 in fp32, 1e-2 in bf16), a stale one does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn


class StaleWeightsError(RuntimeError):
    pass


class LogprobGuard:
    """Compares the engine's log-probabilities of its sampled tokens with the trainer's rescoring of them.

    Args:
        max_mean_gap: the mean absolute gap (nats per token, > 0) above which the step warns, or stops with ``stop``.
            A synced engine agrees to about 1e-6 in fp32 and 1e-2 in bf16.
        stop: raise ``StaleWeightsError`` (stopping the run) instead of warning when the gap is over ``max_mean_gap``.
        every: check on the steps whose global step is a multiple of this (> 0; each check is a student forward without
            grad over the step's rollouts, so the default, 10, keeps it to a tenth of the steps).
    """

    def __init__(self, max_mean_gap: float = 0.05, stop: bool = False, every: int = 10):
        if not max_mean_gap > 0:
            raise ValueError(f"LogprobGuard max_mean_gap must be > 0 (got {max_mean_gap})")
        if every <= 0:
            raise ValueError(f"LogprobGuard every must be > 0 (got {every})")
        self.max_mean_gap, self.stop, self.every = max_mean_gap, stop, every

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def check(self, engine_logprobs: Sequence[Sequence[float]], trainer_logprobs: torch.Tensor, step: int) -> torch.Tensor:
        """The absolute gap at every sampled token (``trainer_logprobs`` holds them concatenated in rollout order);
        warns, or stops, when their mean is over ``max_mean_gap``."""
        engine = torch.tensor([value for row in engine_logprobs for value in row], dtype=torch.float64)
        if engine.numel() != trainer_logprobs.numel():
            raise ValueError(f"the engine returned {engine.numel()} log-probabilities for {trainer_logprobs.numel()} sampled tokens")
        gap = (engine - trainer_logprobs.detach().double().cpu()).abs()
        if engine.numel() and not float(gap.mean()) <= self.max_mean_gap:  # a NaN gap fails too
            message = (
                f"step {step}: the rollout engine's log-probabilities of its sampled tokens differ from the trainer's by "
                f"{float(gap.mean()):.3g} nats on average (max {float(gap.max()):.3g}; "
                f"threshold {self.max_mean_gap}). The engine most likely generates from stale weights: check that a weight "
                "sync ran before this rollout (sync_every) and that it loaded every tensor. A dtype or kernel difference "
                "(bf16 engine, fp32 trainer) gives smaller, steady gaps; raise max_mean_gap if that is the cause."
            )
            if self.stop:
                raise StaleWeightsError(message)
            rank_zero_warn(message)
        return gap
