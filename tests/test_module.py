"""DistillationModule on real tiny models: the loss against an independent formula, the teacher's isolation, setup errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from tests.conftest import first_batch, make_data, make_module, save_tiny_model
from trd_lightning.models import ModelSpec
from trd_lightning.module import DistillationModule
from trd_lightning.rollout import Sampling
from trd_lightning.teachers import SeparateTeacher


def reference_reverse_kl(student, teacher, student_contexts, teacher_contexts, targets):
    """Token-mean KL(student || teacher) at each target token, from each model's ordinary forward pass on one
    unpadded sequence at a time: the logits at position j score the token at j + 1."""
    student_rows, teacher_rows = [], []
    for s_ctx, t_ctx, target in zip(student_contexts, teacher_contexts, targets):
        s_logits = student(input_ids=torch.tensor([s_ctx + target])).logits[0].float()
        with torch.no_grad():
            t_logits = teacher(input_ids=torch.tensor([t_ctx + target])).logits[0].float()
        student_rows.append(s_logits[len(s_ctx) - 1: len(s_ctx) + len(target) - 1])
        teacher_rows.append(t_logits[len(t_ctx) - 1: len(t_ctx) + len(target) - 1])
    log_p, log_q = torch.cat(student_rows).log_softmax(-1), torch.cat(teacher_rows).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def test_opd_loss_matches_an_independent_reverse_kl(student_dir, teacher_dir, tokenizer, chain_data):
    module = make_module(student_dir, teacher_dir)
    batch = first_batch(tokenizer, chain_data)
    torch.manual_seed(0)
    rollouts = module.engine.generate("student", module.student, batch.prompt_ids, module.sampling)
    targets = module.refiner.refine(batch, rollouts, module.teacher_access)
    assert targets.token_ids == rollouts.token_ids  # OPD trains on y_o itself
    out, _ = module.distill(module.make_views(batch, rollouts, targets))
    params = [p for p in module.student.parameters()]
    got = torch.autograd.grad(out.loss, params)

    student_contexts = [batch.prompt_ids[i] for i in rollouts.prompt_index]
    expected = reference_reverse_kl(module.student, module.teacher_model, student_contexts, student_contexts, rollouts.token_ids)
    want = torch.autograd.grad(expected, params)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_teacher_gets_no_gradient_and_stays_bit_identical(student_dir, teacher_dir, tokenizer, chain_data, tmp_path):
    module = make_module(student_dir, teacher_dir)
    teacher_before = {k: v.clone() for k, v in module.teacher_model.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    seen_grads = []
    module.on_after_backward = lambda: seen_grads.append([p.grad for p in module.teacher_model.parameters()])
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=tmp_path, limit_val_batches=0)
    module.export_student = False
    trainer.fit(module, datamodule=make_data(tokenizer, chain_data))
    assert trainer.global_step == 2 and len(seen_grads) == 2
    assert all(g is None for step in seen_grads for g in step)
    assert not any(p.requires_grad for p in module.teacher_model.parameters())
    for key, value in module.teacher_model.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert any(not torch.equal(v, student_before[k]) for k, v in module.student.state_dict().items())


def test_vocabulary_mismatch_names_both_sizes(student_dir, tmp_path):
    other = save_tiny_model(tmp_path / "big_vocab", seed=3, vocab_size=300)
    with pytest.raises(ValueError, match="student's has 259 tokens and the teacher's 300"):
        make_module(student_dir, other)


def test_missing_model_path_is_a_clear_error(teacher_dir):
    with pytest.raises(FileNotFoundError, match="model path '/no/such/model' does not exist.*local copy"):
        DistillationModule(student=ModelSpec(path="/no/such/model"), teacher=SeparateTeacher(ModelSpec(path=teacher_dir)))
    module = DistillationModule(student=ModelSpec(path=teacher_dir), teacher=SeparateTeacher(ModelSpec(path="/no/teacher")))
    with pytest.raises(FileNotFoundError, match="'/no/teacher' does not exist"):
        module.configure_model()


def test_a_teacher_is_required(student_dir):
    with pytest.raises(ValueError, match="needs a teacher: set model.teacher to SeparateTeacher"):
        DistillationModule(student=ModelSpec(path=student_dir))


def test_sampling_top_k_is_checked_against_the_vocabulary(student_dir, teacher_dir):
    with pytest.raises(ValueError, match="top_k=4096 is larger than the vocabulary \\(259 tokens\\)"):
        make_module(student_dir, teacher_dir, sampling=Sampling(top_k=4096))
