"""Rollouts: sampling the student's (and the teacher's) completions."""

from trd_lightning.rollout.base import STUDENT, Placement, RolloutEngine, Rollouts, Sampling
from trd_lightning.rollout.guard import LogprobGuard, StaleWeightsError
from trd_lightning.rollout.hf import HFEngine
from trd_lightning.rollout.vllm import EngineMemory, VLLMEngine

__all__ = ["STUDENT", "EngineMemory", "HFEngine", "LogprobGuard", "Placement", "RolloutEngine", "Rollouts", "Sampling",
           "StaleWeightsError", "VLLMEngine"]
