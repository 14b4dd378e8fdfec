"""The four methods (OPD, OPSD, TRD, TRD on OPSD): contexts, teachers, configs, and startup errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from tests.conftest import DEMO_TEACHER, ROOT, demo_module, first_batch, fit_args, make_data, scalars, tiny_overrides
from trd_lightning.cli import main
from trd_lightning.models import LoRA, ModelSpec
from trd_lightning.module import DistillationModule
from trd_lightning.refiners import Identity, TeacherRewrite
from trd_lightning.rollout import Sampling
from trd_lightning.teachers import SelfTeacher, SeparateTeacher


@pytest.mark.parametrize("method", ["opd", "opsd", "trd", "trd_opsd"])
def test_each_demo_config_trains_two_steps(method, tmp_path):
    main(["fit", "--config", str(ROOT / "configs" / "demo" / f"{method}.yaml"), "--trainer.max_steps=2",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
          "--trainer.log_every_n_steps=1", "--validate_before_fit=false", "--trainer.limit_val_batches=0",
          "--data.init_args.batch_size=4", "--trainer.callbacks.init_args.every_n_train_steps=2"])
    logged = scalars(next(tmp_path.glob("*/version_0")))
    assert [s for s, _ in logged["train/loss"]] == [0, 1]
    refined = [v for _, v in logged["refine/refined_fraction"]]
    assert all(v > 0 for v in refined) if method.startswith("trd") else all(v == 0 for v in refined)


@pytest.mark.parametrize("baseline", sorted(p.stem for p in (ROOT / "configs" / "demo" / "baselines").glob("*.yaml")))
def test_each_token_level_baseline_is_a_config_overlay(baseline, tmp_path):
    main(["fit", "--config", str(ROOT / "configs" / "demo" / "opd.yaml"),
          "--config", str(ROOT / "configs" / "demo" / "baselines" / f"{baseline}.yaml"), "--trainer.max_steps=1",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
          "--validate_before_fit=false", "--trainer.limit_val_batches=0", "--data.init_args.batch_size=4",
          "--model.init_args.export_student=false"])
    logged = scalars(tmp_path / f"demo_opd_{baseline}" / "version_0")
    assert logged["train/loss"][0][0] == 0
    assert logged["train/divergence_p50"][0][1] <= logged["train/divergence_p99"][0][1] <= logged["train/divergence_max"][0][1]
    if baseline == "fkl_clip":
        assert logged["train/divergence_max"][0][1] <= 0.1 + 1e-6


def reference_overrides(method, student_dir, teacher_dir, chain_data, tmp_path):
    """Tiny stand-ins for the Qwen3 models, the math data and the GPU trainer of a reference config."""
    demo_templates = {"opsd": ["--model.init_args.refiner.init_args.teacher_template=demo_privileged"],
                      "trd": ["--model.init_args.refiner.init_args.template=demo_refine"],
                      "trd_opsd": ["--model.init_args.refiner.init_args.template=demo_refine_reference",
                                   "--model.init_args.refiner.init_args.fallback_template=demo_privileged"]}
    return [
        *tiny_overrides(student_dir, teacher_dir if method in ("opd", "trd") else None, chain_data, tmp_path),
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
        "--trainer.accumulate_grad_batches=1", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--model.init_args.student.dtype=float32", "--model.init_args.student.lora.r=4", "--model.init_args.student.lora.alpha=8",
        "--model.init_args.verifier=trd_lightning.verifiers.ExactMatch", "--data.init_args.prompt_template=demo_student",
        "--data.init_args.max_prompt_tokens=64", "--model.init_args.eval_sampling.n=1", "--model.init_args.pass_k=[1]",
        "--trainer.callbacks.init_args.every_n_train_steps=2",
        *(["--model.init_args.teacher.init_args.model.dtype=float32"] if method in ("opd", "trd") else []),
        *(["--model.init_args.refiner.init_args.sampling.max_new_tokens=6"] if method.startswith("trd") else []),
        *demo_templates.get(method, []),
    ]


@pytest.mark.parametrize("method", ["opd", "opsd", "trd", "trd_opsd"])
def test_each_reference_config_trains_two_steps_with_stand_ins(method, student_dir, teacher_dir, chain_data, tmp_path):
    main(["fit", "--config", str(ROOT / "configs" / f"{method}.yaml"), *reference_overrides(method, student_dir, teacher_dir, chain_data, tmp_path)])
    logged = scalars(tmp_path / "run" / "version_0")
    assert [s for s, _ in logged["train/loss"]] == [0, 1]


def test_command_line_switches_opd_to_trd(tmp_path):
    main(["fit", "--config", str(ROOT / "configs" / "demo" / "opd.yaml"),
          "--model.init_args.refiner=trd_lightning.refiners.TeacherRewrite", "--model.init_args.refiner.template=demo_refine",
          "--model.init_args.divergence.direction=forward", "--trainer.max_steps=1", "--validate_before_fit=false",
          "--trainer.limit_val_batches=0", "--data.init_args.batch_size=4", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"])
    logged = scalars(tmp_path / "demo_opd" / "version_0")
    assert logged["refine/refined_fraction"][0][1] > 0


@pytest.mark.parametrize("reference", [False, True], ids=["trd", "trd_opsd"])
def test_trd_contexts_hold_what_the_method_says(reference, tokenizer, chain_data):
    if reference:
        teacher, refiner = SelfTeacher(), TeacherRewrite("demo_refine_reference", fallback_template="demo_privileged")
    else:
        teacher, refiner = SeparateTeacher(ModelSpec(path=DEMO_TEACHER)), TeacherRewrite("demo_refine")
    module = demo_module(teacher, refiner)
    batch = first_batch(tokenizer, chain_data)
    torch.manual_seed(0)
    rollouts = module.engine.generate("student", module.student, batch.prompt_ids, module.sampling)
    targets = refiner.refine(batch, rollouts, module.teacher_access)
    assert any(targets.refined)
    for r, i in enumerate(rollouts.prompt_index):
        student = module.make_views(batch, rollouts, targets, [r]).student  # one row: no padding, whether packed or not
        student_text = tokenizer.decode(student.input_ids[~student.target_mask])
        teacher_text = tokenizer.decode(targets.teacher_contexts[r])
        assert student_text == f"<|im_start|>user\n{batch.problem[i]}<|im_end|>\n<|im_start|>assistant\n"  # only the problem
        if targets.refined[r]:
            assert batch.problem[i] in teacher_text and f"attempt:{rollouts.texts[r]}\n" in teacher_text
            assert (f"reference:{batch.solution[i]}\n" in teacher_text) == reference
            # The target is the teacher's rewrite of this rollout, ids and text alike.
            assert targets.token_ids[r] == targets.rewrites.token_ids[r]
            assert tokenizer.decode(targets.token_ids[r], skip_special_tokens=True) == targets.texts[r]


def test_identity_with_the_students_own_template_is_exactly_opd(tokenizer, chain_data):
    """A teacher context rendered from the student's template is token for token the student's prompt."""
    losses, batch = [], first_batch(tokenizer, chain_data)
    for refiner in (Identity(), Identity(teacher_template="demo_student")):
        module = demo_module(SeparateTeacher(ModelSpec(path=DEMO_TEACHER)), refiner)
        torch.manual_seed(0)
        rollouts = module.engine.generate("student", module.student, batch.prompt_ids, module.sampling)
        losses.append(module.distill(module.make_views(batch, rollouts, refiner.refine(batch, rollouts, module.teacher_access)))[0].loss)
    assert torch.equal(losses[0], losses[1])


def run_steps(module, tokenizer, chain_data, tmp_path, steps=3):
    Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            limit_val_batches=0, default_root_dir=tmp_path).fit(module, datamodule=make_data(tokenizer, chain_data))


def teacher_state(module):
    with module.teacher.scope() as teacher, torch.no_grad():
        return {k: v.detach().clone() for k, v in teacher.state_dict().items() if "lora_" not in k}


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


def test_opsd_without_reference_data_fails_at_startup(tokenizer, chain_data, tmp_path):
    module = demo_module(SelfTeacher(), Identity("demo_privileged"), export_student=False)
    data = make_data(tokenizer, chain_data)
    data.fields["solution"] = None
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="need the reference solution.*data.solution_field"):
        trainer.fit(module, datamodule=data)


@pytest.mark.parametrize("template, missing", [("{problem} fix it", "{attempt}"), ("{attempt} only", "{problem}")])
def test_refine_template_without_a_placeholder_is_refused(template, missing):
    with pytest.raises(ValueError, match=f"lacks the placeholder {missing}"):
        TeacherRewrite(template)


def test_refiner_sampling_must_be_one_per_rollout():
    with pytest.raises(ValueError, match="sampling.n must be 1"):
        TeacherRewrite("demo_refine", sampling=Sampling(n=2))


def test_require_valid_steps_trains_only_on_step_valid_rewrites(tmp_path):
    """Opt-in: a rewrite whose derivation the verifier finds wrong at a step falls back to y_o, counted."""
    main(fit_args("trd_opsd", tmp_path, "strict", 3, "--model.init_args.refiner.init_args.require_valid_steps=true"))
    logged = scalars(tmp_path / "strict/version_0")
    assert logged["refine/steps_valid_y_r"], "no rewrite was accepted: nothing was checked"
    assert [value for _, value in logged["refine/steps_valid_y_r"]] == [1.0] * len(logged["refine/steps_valid_y_r"])
    assert [value for _, value in logged["refine/answer_patched"]] == [0.0] * len(logged["refine/answer_patched"])
    assert len(logged["refine/fallbacks"]) == 3
