"""DistillationModule: the loss against an independent formula, the teacher's isolation, setup errors, the step's contexts,
its gradients independent of the micro-batch budget and its token mean over DDP ranks, and each method (OPD, OPSD, TRD,
TRD on OPSD) trained through `trd fit`: the demo and reference configs, the baselines' overlays, and SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from tests.conftest import DEMO, DEMO_TEACHER, ROOT, SMOLLM2, demo_module, first_batch, make_data, make_module, needs_smollm2, scalars, tiny_overrides
from trd_lightning.cli import main
from trd_lightning.data import PromptDataModule
from trd_lightning.models import ModelSpec
from trd_lightning.module import DistillationModule
from trd_lightning.refiners import Identity, Refiner, Targets, TeacherRewrite
from trd_lightning.rollout import Sampling
from trd_lightning.teachers import SelfTeacher, SeparateTeacher
from trd_lightning.verifiers import MathVerifier


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


@pytest.mark.slow
def test_teacher_gets_no_gradient_and_stays_bit_identical(student_dir, teacher_dir, tokenizer, chain_data, tmp_path):
    module = make_module(student_dir, teacher_dir, max_tokens_per_micro_batch=None)  # one backward a step
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


def test_missing_model_path_is_a_clear_error(teacher_dir):
    with pytest.raises(FileNotFoundError, match="model path '/no/such/model' does not exist.*local copy"):
        DistillationModule(student=ModelSpec(path="/no/such/model"), teacher=SeparateTeacher(ModelSpec(path=teacher_dir)))
    with pytest.raises(FileNotFoundError, match="model.init_args.teacher.init_args.model.path: teacher model path '/no/teacher' does not exist"):
        SeparateTeacher(ModelSpec(path="/no/teacher"))  # refused when the config is read, before any weights load


def test_a_teacher_is_required(student_dir):
    with pytest.raises(ValueError, match="needs a teacher: set model.teacher to SeparateTeacher"):
        DistillationModule(student=ModelSpec(path=student_dir))


def test_sampling_top_k_is_checked_against_the_vocabulary(student_dir, teacher_dir):
    with pytest.raises(ValueError, match="top_k=4096 is larger than the vocabulary \\(259 tokens\\)"):
        make_module(student_dir, teacher_dir, sampling=Sampling(top_k=4096))


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


def test_opsd_without_reference_data_fails_at_startup(tokenizer, chain_data, tmp_path):
    module = demo_module(SelfTeacher(), Identity("demo_privileged"), export_student=False)
    data = make_data(tokenizer, chain_data)
    data.fields["solution"] = None
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="need the reference solution.*data.solution_field"):
        trainer.fit(module, datamodule=data)


@pytest.mark.slow
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


@pytest.mark.slow
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
    """Tiny stand-ins for the Qwen3 models, the math data and the GPU trainer of a reference config; on a CPU, the HF
    engine for vLLM and sdpa for flex_attention (no backward on CPUs), the rest as the config says."""
    demo_templates = {"opsd": ["--model.init_args.refiner.init_args.teacher_template=demo_privileged"],
                      "trd": ["--model.init_args.refiner.init_args.template=demo_refine"],
                      "trd_opsd": ["--model.init_args.refiner.init_args.template=demo_refine_reference",
                                   "--model.init_args.refiner.init_args.fallback_template=demo_privileged"]}
    return [
        *tiny_overrides(student_dir, teacher_dir if method in ("opd", "trd") else None, chain_data, tmp_path),
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
        "--trainer.accumulate_grad_batches=1", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--model.init_args.student.dtype=float32", "--model.init_args.student.lora.r=4", "--model.init_args.student.lora.alpha=8",
        "--model.init_args.engine=trd_lightning.rollout.HFEngine", "--model.init_args.student.attn_implementation=sdpa",
        "--model.init_args.verifier=trd_lightning.verifiers.ExactMatch", "--data.init_args.prompt_template=demo_student",
        "--data.init_args.max_prompt_tokens=64", "--model.init_args.eval_sampling.n=1", "--model.init_args.pass_k=[1]",
        "--trainer.callbacks.init_args.every_n_train_steps=2",
        *(["--model.init_args.teacher.init_args.model.dtype=float32",
           "--model.init_args.teacher.init_args.model.attn_implementation=sdpa"] if method in ("opd", "trd") else []),
        *(["--model.init_args.refiner.init_args.sampling.max_new_tokens=6"] if method.startswith("trd") else []),
        *demo_templates.get(method, []),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["opd", "opsd", "trd", "trd_opsd"])
def test_each_reference_config_trains_two_steps_with_stand_ins(method, student_dir, teacher_dir, chain_data, tmp_path):
    main(["fit", "--config", str(ROOT / "configs" / f"{method}.yaml"), *reference_overrides(method, student_dir, teacher_dir, chain_data, tmp_path)])
    logged = scalars(tmp_path / "run" / "version_0")
    assert [s for s, _ in logged["train/loss"]] == [0, 1]


@pytest.mark.slow
def test_command_line_switches_opd_to_trd(tmp_path):
    main(["fit", "--config", str(ROOT / "configs" / "demo" / "opd.yaml"),
          "--model.init_args.refiner=trd_lightning.refiners.TeacherRewrite", "--model.init_args.refiner.template=demo_refine",
          "--model.init_args.divergence.direction=forward", "--trainer.max_steps=1", "--validate_before_fit=false",
          "--trainer.limit_val_batches=0", "--data.init_args.batch_size=4", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"])
    logged = scalars(tmp_path / "demo_opd" / "version_0")
    assert logged["refine/refined_fraction"][0][1] > 0


# -- the loss over the whole step ------------------------------------------------------------------------
class GradientCapture(Callback):
    """Saves the student's gradients as the optimizer sees them at the first step (after any DDP all-reduce)."""

    def __init__(self, path: str):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0 and trainer.is_global_zero:
            torch.save({n: p.grad.detach().clone() for n, p in pl_module.student.named_parameters() if p.grad is not None}, self.path)


def gradients_of_one_step(tmp_path, config, name, budget, student_dir, teacher_dir, chain_data, *extra):
    path = tmp_path / f"{name}.pt"
    main(["fit", "--config", str(DEMO / f"{config}.yaml"), *tiny_overrides(student_dir, teacher_dir, chain_data, tmp_path, name),
          "--trainer.max_steps=1", "--data.init_args.batch_size=8", f"--model.init_args.max_tokens_per_micro_batch={budget}",
          "--model.init_args.gradient_clip_val=null",  # clipping would hide a wrong scale
          "--trainer.callbacks+=tests.test_module.GradientCapture", f"--trainer.callbacks.path={path}", *extra])
    return torch.load(path, weights_only=True), scalars(tmp_path / name / "version_0")


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["always", "never"])
@pytest.mark.parametrize("config", ["opd", "trd"])
def test_gradients_do_not_depend_on_the_micro_batch_budget(config, packing, student_dir, teacher_dir, chain_data, tmp_path):
    mode = f"--model.init_args.packing={packing}"
    whole, logged = gradients_of_one_step(tmp_path, config, "whole", "null", student_dir, teacher_dir, chain_data, mode)
    assert logged["step/micro_batches"] == [(0, 1.0)]
    ratio = logged["step/real_token_ratio"][0][1]
    assert ratio == 1.0 if packing == "always" else 0 < ratio <= 1.0  # packed: no padding computed
    costs = 8 * 60  # about 8 sequences of context + target: a budget of a third of it makes several micro-batches
    for budget in (costs // 2, costs // 6):
        grads, logged = gradients_of_one_step(tmp_path, config, f"b{budget}", budget, student_dir, teacher_dir, chain_data, mode)
        assert logged["step/micro_batches"][0][1] > 1, budget
        assert grads.keys() == whole.keys()
        for key, value in whole.items():
            torch.testing.assert_close(grads[key], value, atol=1e-5, rtol=1e-4, msg=f"{key} at budget {budget}")


class LengthByParity(Refiner):
    """Targets of a known length per problem, so that ranks hold very different token counts: even problems get a
    long target, odd ones a short one. The teacher scores them in the student's own context (OPD)."""

    def __init__(self, long: int = 40, short: int = 2):
        self.long, self.short = long, short

    def refine(self, batch, rollouts, teacher):
        ids = [[(7 * batch.index[i] + k) % 250 for k in range(self.long if batch.index[i] % 2 == 0 else self.short)]
               for i in rollouts.prompt_index]
        n = len(rollouts)
        return Targets(ids, [""] * n, self.scoring_contexts(batch, rollouts.prompt_index, teacher), [False] * n, [False] * n)

    def teacher_solutions(self, batch, rollouts, targets, teacher, sampling):
        return rollouts


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["synchronous", "streaming"])
def test_global_token_mean_over_ddp_ranks_equals_one_process(streaming, student_dir, teacher_dir, tmp_path):
    """Rank 0 holds the long targets (20x rank 1's tokens): its tokens must weigh what they weigh in one process
    (synchronous), whichever flow the two processes run."""
    data = tmp_path / "eight.jsonl"
    from trd_lightning.data.chain import sample_problems

    data.write_text("".join(json.dumps({"problem": p.text, "answer": p.answer, "solution": p.solution}) + "\n"
                            for p in sample_problems(8, 3, seed=3)))
    common = ["fit", "--config", str(DEMO / "opd.yaml"), f"--model.init_args.student.path={student_dir}",
              f"--model.init_args.teacher.init_args.model.path={teacher_dir}", f"--data.init_args.train_path={data}",
              "--data.init_args.val_path=null", "--data.init_args.test_path=null", "--data.init_args.shuffle=false",
              "--model.init_args.refiner=tests.test_module.LengthByParity", "--model.init_args.sampling.max_new_tokens=4",
              "--model.init_args.max_tokens_per_micro_batch=80", "--trainer.max_steps=1", "--validate_before_fit=false",
              "--model.init_args.gradient_clip_val=null",  # clipping would hide a wrong scale
              "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.callbacks+=tests.test_module.GradientCapture"]
    one = subprocess.run([sys.executable, "-m", "trd_lightning.cli", *common, "--data.init_args.batch_size=8",
                          f"--trainer.callbacks.path={tmp_path / 'one.pt'}", "--trainer.logger.init_args.name=one"],
                         capture_output=True, text=True, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "trd_lightning.cli", *common, "--data.init_args.batch_size=4",
                          "--trainer.strategy=ddp", "--trainer.devices=2", f"--trainer.callbacks.path={tmp_path / 'two.pt'}",
                          f"--model.init_args.streaming={str(streaming).lower()}",
                          "--trainer.logger.init_args.name=two"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    alone, shared = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    for key, value in alone.items():
        torch.testing.assert_close(shared[key], value, atol=1e-5, rtol=1e-4, msg=key)
    logged_one, logged_two = scalars(tmp_path / "one/version_0"), scalars(tmp_path / "two/version_0")
    # Both see the whole global batch: 4 long and 4 short targets, one loss.
    assert logged_one["train/target_tokens"] == logged_two["train/target_tokens"] == [(0, 4 * 40 + 4 * 2.0)]
    torch.testing.assert_close(logged_two["train/loss"][0][1], logged_one["train/loss"][0][1], atol=1e-5, rtol=1e-5)
    # Rank 0 needs more micro-batches of 80 tokens for its long rows than rank 1: both ran as many (a mean over
    # ranks of their counts would not be a whole number otherwise).
    (_, count), = logged_two["step/micro_batches"]
    assert count == int(count) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("setting, fix", [("--trainer.accumulate_grad_batches=4", "data.init_args.batch_size"),
                                          ("--trainer.gradient_clip_val=1.0", "model.init_args.gradient_clip_val: 1.0")])
def test_trainer_settings_the_step_replaces_are_refused_with_the_fix(setting, fix, student_dir, teacher_dir, chain_data, tmp_path):
    with pytest.raises(SystemExit, match=fix.replace(".", r"\.")):
        main(["fit", "--config", str(DEMO / "opd.yaml"), *tiny_overrides(student_dir, teacher_dir, chain_data, tmp_path),
              "--trainer.max_steps=1", setting])


PROBLEMS = [
    {"problem": "What is 12 + 30?", "answer": "42", "solution": "12 + 30 = 42, so the answer is \\boxed{42}."},
    {"problem": "Compute 7 * 6 - 2.", "answer": "40", "solution": "7 * 6 = 42 and 42 - 2 = 40. \\boxed{40}"},
]


@pytest.mark.slow
@needs_smollm2
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


@pytest.mark.parametrize("layout", ["module", "rollout_callback", "rollout_callback_one_process"])
def test_the_rollout_rng_is_restored_from_new_and_older_checkpoints(layout, student_dir, teacher_dir):
    """The rollouts' RNG state is applied at the first rollout after a restore, whichever checkpoint layout holds it:
    the module's own key, or the RolloutCallback state of checkpoints written before the rollout moved into the module."""
    module = DistillationModule(student=ModelSpec(path=student_dir), teacher=SeparateTeacher(ModelSpec(path=teacher_dir)))
    torch.manual_seed(123)
    saved = {"torch": torch.get_rng_state(), "python": [3, [0] * 625, None]}
    state = {"module": {"rollout_randomness": {"rng_per_rank": [saved]}},
             "rollout_callback": {"callbacks": {"RolloutCallback{'sync_every': 1}": {"synced_at": 4, "rng_per_rank": [saved]}}},
             "rollout_callback_one_process": {"callbacks": {"RolloutCallback": {"rng": saved}}}}[layout]
    module.on_load_checkpoint(state)
    torch.manual_seed(0)
    expected = torch.rand(3, generator=torch.Generator().set_state(saved["torch"]))
    module.randomness.before_rollout()
    assert torch.equal(torch.rand(3), expected)
