"""The Lightning callback that brings each training batch its on-policy rollouts.

Before a batch reaches ``training_step`` it syncs the engine to the student's current weights
(when they changed and the engine keeps its own copy) and samples ``y_o`` for every prompt.
"""

from __future__ import annotations

import time

from lightning.pytorch import Callback

STUDENT = "student"


class RolloutCallback(Callback):
    """``sync_every``: push the student's weights to the engine every this many optimizer steps."""

    def __init__(self, sync_every: int = 1):
        if sync_every <= 0:
            raise ValueError(f"sync_every must be > 0 (got {sync_every})")
        self.sync_every = sync_every
        self.synced_at: int | None = None  # the optimizer step whose weights the engine holds

    def sync_due(self, step: int) -> bool:
        return self.synced_at is None or (step != self.synced_at and step - self.synced_at >= self.sync_every)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        engine, step = pl_module.engine, trainer.global_step
        start = time.perf_counter()
        if engine.holds_weights and self.sync_due(step):
            engine.sync_weights(STUDENT, pl_module.student)
            self.synced_at = step
        synced = time.perf_counter()
        batch.rollouts = engine.generate(STUDENT, pl_module.student, batch.prompt_ids, pl_module.sampling)
        pl_module.timings["sync"] = synced - start
        pl_module.timings["rollout"] = time.perf_counter() - synced
