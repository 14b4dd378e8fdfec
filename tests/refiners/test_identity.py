"""Identity (OPD, OPSD): the targets are the rollouts themselves."""

from __future__ import annotations

import torch

from tests.conftest import DEMO_TEACHER, demo_module, first_batch
from trd_lightning.models import ModelSpec
from trd_lightning.refiners import Identity
from trd_lightning.teachers import SeparateTeacher


def test_identity_with_the_students_own_template_is_exactly_opd(tokenizer, chain_data):
    """A teacher context rendered from the student's template is token for token the student's prompt."""
    losses, batch = [], first_batch(tokenizer, chain_data)
    for refiner in (Identity(), Identity(teacher_template="demo_student")):
        module = demo_module(SeparateTeacher(ModelSpec(path=DEMO_TEACHER)), refiner)
        torch.manual_seed(0)
        rollouts = module.engine.generate("student", module.student, batch.prompt_ids, module.sampling)
        losses.append(module.distill(module.make_views(batch, rollouts, refiner.refine(batch, rollouts, module.teacher_access)))[0].loss)
    assert torch.equal(losses[0], losses[1])
