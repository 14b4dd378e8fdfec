"""The stale-weights guard, tested with HF generation on CPU.

A real stale engine: it takes the student's weights at its first sync and ignores every later one (a
sync that silently fails), so it keeps sampling from step 0 while the student trains.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import ROOT, make_data, make_module, scalars, tiny_overrides
from trd_lightning.cli import main
from trd_lightning.rollout import HFEngine, LogprobGuard, StaleWeightsError


class StaleEngine(HFEngine):
    """Holds a copy of the weights, which only the first sync updates."""

    def __init__(self):
        super().__init__(return_logprobs=True)
        self.copies: dict = {}

    @property
    def holds_weights(self) -> bool:
        return True

    def has_weights(self, role: str) -> bool:
        return role in self.copies

    def sync_weights(self, role, model):
        self.copies.setdefault(role, copy.deepcopy(model))

    def generate(self, role, model, prompts, sampling):
        return super().generate(role, self.copies[role], prompts, sampling)


@pytest.mark.slow
def test_a_synced_engine_agrees_with_the_trainer_to_numerics(tmp_path, student_dir, teacher_dir, chain_data):
    main(["fit", "--config", str(ROOT / "configs" / "demo" / "opd.yaml"), *tiny_overrides(student_dir, teacher_dir, chain_data, tmp_path),
          "--trainer.max_steps=2", "--model.init_args.engine=trd_lightning.rollout.HFEngine", "--model.init_args.engine.return_logprobs=true",
          "--model.init_args.logprob_guard=trd_lightning.rollout.LogprobGuard", "--model.init_args.logprob_guard.stop=true",
          "--model.init_args.logprob_guard.every=1"])
    logged = scalars(next(tmp_path.glob("*/version_0")))
    assert [s for s, _ in logged["rollout/logprob_gap_max"]] == [0, 1]
    assert all(v < 1e-4 for _, v in logged["rollout/logprob_gap_max"])


@pytest.mark.slow
def test_a_stale_engine_is_caught(student_dir, teacher_dir, tokenizer, chain_data):
    from lightning.pytorch import Trainer

    module = make_module(student_dir, teacher_dir, engine=StaleEngine(), logprob_guard=LogprobGuard(max_mean_gap=0.01, stop=True, every=1),
                         optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
    trainer = Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.raises(StaleWeightsError, match="stale weights"):
        trainer.fit(module, datamodule=make_data(tokenizer, chain_data))
    assert trainer.global_step >= 1  # step 0 was synced and passed; a later step was caught


def test_guard_settings_are_checked():
    with pytest.raises(ValueError, match="max_mean_gap"):
        LogprobGuard(max_mean_gap=0)
    with pytest.raises(ValueError, match="every"):
        LogprobGuard(every=0)
