"""Rollouts: sampling the student's (and the teacher's) completions."""

from trd_lightning.rollout.base import RolloutEngine, Rollouts, Sampling
from trd_lightning.rollout.callback import RolloutCallback
from trd_lightning.rollout.hf import HFEngine

__all__ = ["HFEngine", "RolloutCallback", "RolloutEngine", "Rollouts", "Sampling"]
