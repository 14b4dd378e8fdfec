"""The Lightning callback that brings each training batch (one optimizer step's prompts) its on-policy rollouts.

Before a batch reaches ``training_step`` it syncs the engine to the student's current weights
(when they changed and the engine keeps its own copy) and samples ``y_o`` for every prompt of the step in one
engine call: decoding is memory-bound, so the engine is given the whole step at once.
It owns the randomness of sampling: its checkpointed state holds every RNG, so a resumed run
draws the same rollouts, and validation in the middle of training never shifts the stream.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback

from trd_lightning.reliability import rng_state, set_rng_state

STUDENT = "student"


class RolloutCallback(Callback):
    """``sync_every``: push the student's weights to the engine every this many optimizer steps."""

    def __init__(self, sync_every: int = 1):
        if sync_every <= 0:
            raise ValueError(f"sync_every must be > 0 (got {sync_every})")
        self.sync_every = sync_every
        self.synced_at: int | None = None  # the optimizer step whose weights the engine holds
        self.resumed_rng: dict | None = None  # set at the first rollout after a restore

    def sync_due(self, step: int) -> bool:
        return self.synced_at is None or (step != self.synced_at and step - self.synced_at >= self.sync_every)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        engine, step = pl_module.engine, trainer.global_step
        if self.resumed_rng is not None:  # restored here, so nothing run since the restore shifts the stream
            set_rng_state(self.resumed_rng)
            self.resumed_rng = None
        pl_module.timings = {}  # this step's stage timings start here
        start = time.perf_counter()
        if engine.holds_weights and self.sync_due(step):
            engine.sync_weights(STUDENT, pl_module.student)
            self.synced_at = step
        synced = time.perf_counter()
        batch.rollouts = engine.generate(STUDENT, pl_module.student, batch.prompt_ids, pl_module.sampling)
        pl_module.timings["sync"] = synced - start
        pl_module.timings["rollout"] = time.perf_counter() - synced

    def on_validation_start(self, trainer, pl_module):
        self.stashed_rng = rng_state()

    def on_validation_end(self, trainer, pl_module):
        set_rng_state(self.stashed_rng)

    def state_dict(self) -> dict:
        """Every process's RNG state: their streams part as soon as their rollouts differ in length, and the
        checkpoint is written from the first process's state dict. (Every process saves together.)"""
        return {"synced_at": self.synced_at, "rng_per_rank": _all_ranks(rng_state())}

    def load_state_dict(self, state: dict) -> None:
        self.synced_at = None  # a new process's engine holds none of the weights
        states = state.get("rng_per_rank") or [state["rng"]]
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        self.resumed_rng = states[rank % len(states)]  # the same world size resumes exactly


def _all_ranks(value) -> list:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return [value]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
