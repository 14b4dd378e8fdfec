"""Teachers in the trainer's process: a separate teacher's vocabulary checked against the student's, and a self-teacher
frozen at step 0 (a LoRA one by its base weights, without a second copy) or live."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from tests.conftest import lora_model, make_data, make_module, save_tiny_model
from trd_lightning.models import LoRA, ModelSpec, hf_state_dict, load_model
from trd_lightning.module import DistillationModule
from trd_lightning.refiners import Identity
from trd_lightning.rollout import HFEngine, Sampling
from trd_lightning.teachers import SelfTeacher


def test_vocabulary_mismatch_names_both_sizes(student_dir, tmp_path):
    other = save_tiny_model(tmp_path / "big_vocab", seed=3, vocab_size=300)
    with pytest.raises(ValueError, match="student's has 259 tokens and the teacher's 300"):
        make_module(student_dir, other)


def test_a_frozen_lora_self_teacher_syncs_the_base_weights(student_dir, tokenizer):
    model = lora_model(student_dir)
    base = load_model(ModelSpec(path=student_dir)).state_dict()
    self_teacher = SelfTeacher(frozen=True)
    assert self_teacher.setup(model, tokenizer, HFEngine()) is None  # LoRA: the base weights, no copy
    with self_teacher.scope() as teacher:
        state = hf_state_dict(teacher)
    assert all(torch.equal(state[k], base[k]) for k in base)


def run_steps(module, tokenizer, chain_data, tmp_path, steps=3):
    Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            limit_val_batches=0, default_root_dir=tmp_path).fit(module, datamodule=make_data(tokenizer, chain_data))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [None, LoRA(r=4, alpha=8)], ids=["full", "lora"])
def test_opsd_frozen_teacher_keeps_step0_weights_and_live_teacher_follows(lora, student_dir, tokenizer, chain_data, tmp_path):
    for frozen in (True, False):
        module = DistillationModule(student=ModelSpec(path=student_dir, lora=lora), teacher=SelfTeacher(frozen=frozen),
                                    refiner=Identity("demo_privileged"), sampling=Sampling(max_new_tokens=6),
                                    log_samples_every=0, export_student=False, max_context_tokens=256)
        module.configure_model()
        assert (module.teacher_model is None) == (lora is not None or not frozen)  # LoRA: no second copy
        prompt = torch.tensor([[258, 117, 115, 101, 114, 10, 49]])
        with module.teacher.scope() as teacher, torch.no_grad():
            before = teacher(input_ids=prompt).logits
        run_steps(module, tokenizer, chain_data, tmp_path)
        with module.teacher.scope() as teacher, torch.no_grad():
            after = teacher(input_ids=prompt).logits
        with torch.no_grad():
            module.student.eval()
            student_now = module.student(input_ids=prompt).logits
        assert not torch.equal(student_now, before)  # the student moved
        if frozen:
            assert torch.equal(after, before)
        else:
            assert torch.equal(after, student_now)
