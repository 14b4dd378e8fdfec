"""Evaluation shared by the modules: sample n completions per problem, verify them, report Avg@n and Pass@k."""

from __future__ import annotations

import torch

from trd_lightning.data.prompts import PromptBatch
from trd_lightning.metrics import SampledAccuracy
from trd_lightning.rollout.base import Rollouts


class EvaluationMixin:
    """For LightningModules with ``engine``, ``eval_sampling``, ``verifier``, ``pass_k`` and a
    ``metrics`` ModuleDict from ``build_metrics``, keyed by stage and by who produced the completions."""

    def build_metrics(self, *keys: str) -> torch.nn.ModuleDict:
        """One metric per ``stage_who`` key, made up front: metric states first created inside
        validation would be inference tensors that later updates cannot touch."""
        return torch.nn.ModuleDict({key: SampledAccuracy(self.eval_sampling.n, self.pass_k) for key in keys})

    def metric(self, stage: str, who: str) -> SampledAccuracy:
        return self.metrics[f"{stage}_{who}"]

    def correct_per_problem(self, batch: PromptBatch, rollouts: Rollouts) -> list[int]:
        counts = [0] * len(batch)
        for i, text in zip(rollouts.prompt_index, rollouts.texts):
            counts[i] += int(self.verifier.score(text, batch.answer[i]))
        return counts

    def score(self, stage: str, who: str, batch: PromptBatch, rollouts: Rollouts) -> None:
        self.metric(stage, who).update(self.correct_per_problem(batch, rollouts))

    def log_metrics(self, stage: str) -> None:
        for key in [k for k in self.metrics if k.startswith(stage + "_")]:
            if not self.metrics[key].update_called:
                continue
            who = key[len(stage) + 1:]
            for name, value in self.metrics[key].compute().items():
                self.log(f"{stage}/{who}/{name}", value)
            self.metrics[key].reset()

    def on_validation_epoch_end(self):
        self.log_metrics("val")

    def on_test_epoch_end(self):
        self.log_metrics("test")
