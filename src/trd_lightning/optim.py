"""The learning-rate schedule of the reference recipe: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class WarmupCosine:
    """Warm up over ``warmup_ratio`` of the run, then follow a cosine down to ``min_lr_ratio`` x the peak.

    The peak is the optimizer's learning rate; the schedule steps once per optimizer step, over the run's
    estimated total of optimizer steps.

    Args:
        warmup_ratio: the share of the run's optimizer steps over which the learning rate rises linearly to the peak,
            in [0, 1); 0: no warmup.
        min_lr_ratio: the learning rate at the end of the cosine, as a fraction of the peak, in [0, 1]; 1 keeps the
            peak after the warmup.
    """

    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")

    def factor(self, step: int, total_steps: int) -> float:
        warmup = int(self.warmup_ratio * total_steps)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def build(self, optimizer: Optimizer, total_steps: int) -> LambdaLR:
        return LambdaLR(optimizer, lambda step: self.factor(step, total_steps))


def check_optimizer(optimizer_factory) -> None:
    """Build the optimizer once over a stand-in parameter, so its arguments (a negative learning rate, betas out of
    range, a misspelt keyword) are refused when the config is read, not after a validation pass has run."""
    try:
        optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as error:
        raise ValueError(f"model.optimizer: {error}; fix its init_args") from None


def optimizer_and_schedule(optimizer_factory, lr_schedule: WarmupCosine | None, model, total_steps: int):
    """``configure_optimizers``' answer for a module training ``model``'s trainable parameters: the optimizer, and the
    schedule stepped once per optimizer step (null: a constant learning rate)."""
    optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
    if lr_schedule is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_schedule.build(optimizer, total_steps), "interval": "step"}}
