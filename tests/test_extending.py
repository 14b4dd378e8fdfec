"""The examples of docs/extending.md, run as written: each python block of the page is executed and its class put to work."""

from __future__ import annotations

import re

import pytest
import torch

from tests.conftest import ROOT
from trd_lightning.data import PromptDataModule
from trd_lightning.models import ModelSpec
from trd_lightning.module import DistillationModule
from trd_lightning.rollout import HFEngine, Sampling
from trd_lightning.rollout.base import STUDENT
from trd_lightning.teachers import SeparateTeacher


@pytest.fixture(scope="module")
def examples() -> dict:
    """Every class the page's python blocks define, by name."""
    page = (ROOT / "docs/extending.md").read_text()
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks, "docs/extending.md has no python block"
    for block in blocks:
        exec(compile(block, "docs/extending.md", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def demo():
    module = DistillationModule(student=ModelSpec(path="demo:student"), teacher=SeparateTeacher(ModelSpec(path="demo:teacher")),
                                max_context_tokens=256)
    module.configure_model()
    data = PromptDataModule(train_path="demo:data/train.jsonl", test_path="demo:data/test.jsonl", prompt_template="demo_student",
                            eval_batch_size=4, tokenizer=module.tokenizer)
    data.setup("test")
    return module, next(iter(data.test_dataloader()))


def test_the_refiner_trains_on_the_shortest_accepted_rewrite(examples, demo):
    module, batch = demo
    refiner = examples["ShortestOfFour"]("demo_refine", sampling=Sampling(temperature=1.0, max_new_tokens=48))
    torch.manual_seed(0)
    rollouts = module.engine.generate(STUDENT, module.student, batch.prompt_ids, Sampling(temperature=1.0, max_new_tokens=48))
    targets = refiner.refine(batch, rollouts, module.teacher_access)
    assert any(targets.refined)
    assert sorted(targets.metrics["shortest_length"]) == sorted(len(t) for t, kept in zip(targets.token_ids, targets.refined) if kept)


def test_the_verifier_reads_the_last_integer(examples):
    verifier = examples["LastInteger"]()
    assert verifier.score("first 41, then 42", "42") and not verifier.score("42, no: 41", "42")
    assert verifier.extract("no number") is None


def test_the_divergence_gives_its_own_gradient(examples):
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11, dtype=torch.float64, requires_grad=True), torch.randn(5, 11, dtype=torch.float64)
    values, grads = examples["ProbabilityMSE"]()._dense(student.detach().clone(), teacher.clone())
    expected = 0.5 * ((student.softmax(-1) - teacher.softmax(-1)) ** 2).sum(-1)
    torch.testing.assert_close(values.double(), expected.detach())
    (autograd,) = torch.autograd.grad(expected.sum(), student)
    torch.testing.assert_close(grads.double(), autograd)


def test_the_engine_decodes_as_the_hf_engine_does_greedily(examples, demo):
    module, batch = demo
    engine, reference = examples["GreedyLoop"](), HFEngine()
    for e in (engine, reference):
        e.setup(module.tokenizer, module.stop_ids)
    greedy = Sampling(greedy=True, max_new_tokens=24)
    assert engine.generate(STUDENT, module.student, batch.prompt_ids, greedy).token_ids == \
        reference.generate(STUDENT, module.student, batch.prompt_ids, greedy).token_ids
