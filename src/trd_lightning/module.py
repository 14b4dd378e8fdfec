"""DistillationModule: one training step is one straight line.

    prompts -> rollouts y_o (RolloutCallback, current student weights)
            -> Refiner: targets (y_o or y_r) and the teacher's contexts
            -> views: the same target ids after each model's context
            -> teacher forward (inference mode), student forward (grad)
            -> Divergence -> loss
            -> metrics
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from rapidfuzz.distance import Levenshtein

from trd_lightning.data.prompts import PromptBatch
from trd_lightning.diagnostics import DEFAULT_PIVOTS, PositionProfile, pivot_mass, pivot_token_ids, token_stats, trajectory_stats
from trd_lightning.evaluation import EvaluationMixin, check_answers, plot_position_profiles
from trd_lightning.losses import Divergence, DivergenceOutput
from trd_lightning.models import (
    ModelSpec,
    Sharding,
    is_sharded,
    check_plain_head,
    export_hf,
    last_hidden_at,
    load_model,
    load_tokenizer,
    output_head,
    stop_token_ids,
    vocab_size,
)
from trd_lightning.optim import WarmupCosine
from trd_lightning.reliability import GracefulInterrupt, NonFiniteGuard
from trd_lightning.refiners import Identity, Refiner, TeacherAccess, Targets
from trd_lightning.rollout import HFEngine, RolloutCallback, RolloutEngine, Rollouts, Sampling
from trd_lightning.rollout.callback import STUDENT
from trd_lightning.rollout.guard import LogprobGuard
from trd_lightning.teachers import Teacher
from trd_lightning.verifiers import ExactMatch, Verifier
from trd_lightning.metrics import SampledAccuracy
from trd_lightning.views import ChatPrompts, ModelInputs, Views, build_views, pack

TEACHER = "teacher"


@dataclass
class TeacherPass:
    hidden: torch.Tensor  # [N, H_t] at the target positions
    weight: torch.Tensor  # the LM head [V, H_t]
    bias: torch.Tensor | None


class DistillationModule(EvaluationMixin, LightningModule):
    """Distils a teacher into the student on the student's own rollouts (OPD, OPSD, TRD).

    Args:
        student: the model being trained (a local path or a config; optional LoRA).
        teacher: ``SeparateTeacher`` (OPD) or ``SelfTeacher`` (OPSD).
        refiner: ``Identity`` (train on y_o) or ``TeacherRewrite`` (TRD: train on y_r).
        divergence: the per-token loss; null takes the refiner's default (reverse KL for
            Identity, forward KL for TeacherRewrite, both over the full vocabulary).
        engine: generates rollouts (``HFEngine`` by default; ``VLLMEngine`` on GPUs).
        logprob_guard: checks that the engine samples from the current weights, by rescoring its sampled
            tokens (``LogprobGuard``); on by default for engines that hold their own weights and return
            log-probabilities.
        sampling: how the student samples y_o (``n`` rollouts per prompt).
        eval_sampling: how validation and test sample (``n`` per problem, for Avg@n / Pass@k).
        verifier: checks answers, for metrics only (never in the loss).
        optimizer: an optimizer class and its arguments (``class_path`` / ``init_args``).
        lr_schedule: warmup + cosine; null keeps the learning rate constant.
        max_context_tokens: the limit on a teacher context (refine or privileged prompt); longer
            ones lose tail tokens of the attempt or reference, never of the problem.
        sync_every: for engines with their own weights, sync them every this many optimizer steps.
        pass_k: the k of Pass@k in evaluation (each <= eval_sampling.n).
        log_samples_every: write sample (problem, y_o, y_r) text to the logger every this many steps.
        evaluate_teacher: in ``test``, also score what the teacher produces (its own solution in
            its context, or its rewrites of the student's rollouts).
        export_student: at the end of fit, save the student with ``save_pretrained`` in the log dir.
    """

    def __init__(
        self,
        student: ModelSpec,
        teacher: Teacher | None = None,
        refiner: Refiner | None = None,
        divergence: Divergence | None = None,
        engine: RolloutEngine | None = None,
        logprob_guard: LogprobGuard | None = None,
        sampling: Sampling | None = None,
        eval_sampling: Sampling | None = None,
        verifier: Verifier | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: WarmupCosine | None = None,
        max_context_tokens: int = 4096,
        sync_every: int = 1,
        pass_k: Sequence[int] = (1,),
        log_samples_every: int = 50,
        evaluate_teacher: bool = True,
        export_student: bool = True,
        pivot_tokens: Sequence[str] = DEFAULT_PIVOTS,
        disagreement_threshold: float = 0.05,
        diagnostics_every: int = 10,
        max_consecutive_skips: int = 5,
        sharding: Sharding | None = None,
    ):
        super().__init__()
        if teacher is None:
            raise ValueError(
                "DistillationModule needs a teacher: set model.teacher to SeparateTeacher (OPD, a separate "
                "model) or SelfTeacher (OPSD, the student's own model with privileged context)"
            )
        if max_context_tokens <= 0:
            raise ValueError(f"max_context_tokens must be > 0 (got {max_context_tokens})")
        if not 0 < disagreement_threshold < 1:
            raise ValueError(f"disagreement_threshold must be in (0, 1) (got {disagreement_threshold})")
        self.student_spec = student
        self.teacher = teacher
        self.refiner = refiner or Identity()
        self.divergence = divergence or self.refiner.default_divergence()
        self.engine = engine or HFEngine()
        self.logprob_guard = logprob_guard or (LogprobGuard() if self.engine.holds_weights else None)
        self.sampling = sampling or Sampling()
        self.eval_sampling = eval_sampling or Sampling(greedy=True)
        self.verifier = verifier or ExactMatch()
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.max_context_tokens = max_context_tokens
        self.sync_every = sync_every
        self.pass_k = list(pass_k)
        SampledAccuracy(self.eval_sampling.n, self.pass_k)  # refuses a k > n now, before any compute
        self.log_samples_every = log_samples_every
        self.evaluate_teacher = evaluate_teacher
        self.export_student = export_student
        self.disagreement_threshold = disagreement_threshold
        self.diagnostics_every = diagnostics_every
        self.max_consecutive_skips = max_consecutive_skips
        self.sharding = sharding or Sharding()
        NonFiniteGuard(max_consecutive_skips)  # refuses a bad value now
        self.tokenizer = load_tokenizer(student)
        self.prompts = ChatPrompts(self.tokenizer)
        self.check_sampling(student.config_vocab_size())  # before any weights load; again once they have
        self.pivot_ids = pivot_token_ids(self.tokenizer, pivot_tokens)
        self.student = None
        self.teacher_model = None  # the teacher's own weights, when it has any (not for a live/LoRA self-teacher)
        self.stop_ids: set[int] = set()
        self.timings: dict[str, float] = {}
        self.skipped_empty = 0
        self.evaluated = ("student", "teacher")
        self.metrics = torch.nn.ModuleDict()
        self.profiles = torch.nn.ModuleDict({"y_o": PositionProfile(), "y_r": PositionProfile()})

    # -- setup -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.student is not None:
            return
        self.student = load_model(self.student_spec)
        self.teacher_model = self.teacher.build(self.student)  # a frozen copy is taken before any sharding
        with self.teacher_scope() as teacher:
            self.check_vocabularies(teacher)
            check_plain_head(teacher, "teacher")
        check_plain_head(self.student, "student")
        self.check_sampling(vocab_size(self.student))
        self.stop_ids = stop_token_ids(self.tokenizer, self.student)
        self.engine.setup(self.tokenizer, self.stop_ids)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over its data-parallel dimension
            mesh = self.device_mesh["data_parallel"]
            self.sharding.apply(self.student, mesh)
            if self.teacher_model is not None:
                self.sharding.apply(self.teacher_model, mesh)
        self.exclude_reloadable_teacher()

    def exclude_reloadable_teacher(self) -> None:
        """A teacher loaded from a path is left out of checkpoints (an 8B teacher would double each one) and
        not expected back when one loads; a frozen step-0 copy stays in them."""
        if self.teacher.persistent or self.teacher_model is None:
            return
        marker = "teacher_model."

        def drop_from_state_dict(module, state_dict, prefix, local_metadata):
            for key in [k for k in state_dict if k.startswith(prefix + marker)]:
                del state_dict[key]

        def forgive_missing(module, incompatible):
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(marker)]

        self.register_state_dict_post_hook(drop_from_state_dict)
        self.register_load_state_dict_post_hook(forgive_missing)

    def check_sampling(self, vocab: int | None) -> None:
        if vocab is None:
            return
        for sampling in (self.sampling, self.eval_sampling, getattr(self.refiner, "sampling", None)):
            if sampling is not None:
                sampling.check_vocab(vocab)
        self.divergence.check_vocab(vocab)

    def check_vocabularies(self, teacher: torch.nn.Module) -> None:
        student_size, teacher_size = vocab_size(self.student), vocab_size(teacher)
        if student_size != teacher_size:
            raise ValueError(
                f"student and teacher must share a vocabulary: the student's has {student_size} tokens and the "
                f"teacher's {teacher_size}; pick a teacher from the student's model family"
            )
        spec = getattr(self.teacher, "model", None)
        if spec is not None and (spec.tokenizer or spec.path):
            try:
                teacher_vocab = load_tokenizer(spec).get_vocab()
            except (OSError, ValueError):
                return  # the teacher ships no tokenizer of its own; the head sizes matched
            if teacher_vocab != self.tokenizer.get_vocab():
                raise ValueError("student and teacher tokenizers map tokens to different ids; they must share one vocabulary")

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if "solution" in self.refiner.required_fields() and datamodule is not None and not datamodule.has_solutions:
            raise ValueError(
                "the refiner's templates need the reference solution (OPSD and reference-based refining read it), "
                "but the data has none; set data.solution_field to the column that holds it"
            )
        if datamodule is not None:
            check_answers(self.verifier, datamodule, {"fit": ["val"], "validate": ["val"], "test": ["test"]}.get(stage, []))
        self.setup_metrics()

    def configure_callbacks(self):
        return [RolloutCallback(self.sync_every), NonFiniteGuard(self.max_consecutive_skips), GracefulInterrupt()]

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_schedule is None:
            return optimizer
        scheduler = self.lr_schedule.build(optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_model is not None:
            self.teacher_model.eval()  # never dropout in the teacher, whatever Lightning toggles
        return self

    # -- the teacher ---------------------------------------------------------------------------------
    @contextmanager
    def teacher_scope(self):
        with self.teacher.scope(self.student, self.teacher_model) as model:
            yield model

    def teacher_generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Rollouts:
        """The teacher's completions (y_r). A live self-teacher is the student, so the student's engine serves it;
        an engine with its own weights loads a fixed teacher (separate, or frozen at step 0) once."""
        role = STUDENT if self.teacher.is_live else TEACHER
        with self.teacher_scope() as teacher:
            if not self.engine.has_weights(role):
                self.engine.sync_weights(role, teacher)
            return self.engine.generate(role, teacher, prompts, sampling)

    def rollout_logprobs(self, batch: PromptBatch, rollouts: Rollouts) -> torch.Tensor:
        """The student's log-probabilities (temperature 1) of each sampled token, concatenated in rollout order."""
        contexts = [batch.prompt_ids[i] for i in rollouts.prompt_index]
        inputs = pack(contexts, rollouts.token_ids, self.tokenizer.pad_token_id).to(self.device)
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                hidden = last_hidden_at(self.student, inputs.input_ids, inputs.attention_mask, *inputs.predicting_positions())
                weight, bias = output_head(self.student)
                logprobs, _ = token_stats(hidden, weight, bias, inputs.input_ids[inputs.target_mask], self.divergence.chunk_size)
        finally:
            self.student.train(was_training)
        return logprobs

    @property
    def teacher_access(self) -> TeacherAccess:
        return TeacherAccess(self.prompts, self.max_context_tokens, self.verifier, self.stop_ids, self.teacher_generate)

    # -- the step ------------------------------------------------------------------------------------
    def make_views(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets) -> Views:
        student_contexts = [batch.prompt_ids[i] for i in rollouts.prompt_index]
        return build_views(student_contexts, targets.teacher_contexts, targets.token_ids, self.tokenizer.pad_token_id)

    def teacher_forward(self, inputs: ModelInputs) -> TeacherPass:
        """The teacher's last hidden states at the target positions, without autograd."""
        inputs = inputs.to(self.device)
        # inference_mode where it is safe; FSDP2 reuses its gathered buffers across modes, so no_grad there.
        no_autograd = torch.no_grad() if is_sharded(self.student) else torch.inference_mode()
        with no_autograd, self.teacher_scope() as teacher:
            hidden = last_hidden_at(teacher, inputs.input_ids, inputs.attention_mask, *inputs.predicting_positions())
            weight, bias = output_head(teacher)
        # Inference tensors cannot be saved for backward: clone into a normal tensor before it meets the graph.
        return TeacherPass(hidden.clone(), weight, bias)

    def distill(self, views: Views) -> tuple[DivergenceOutput, TeacherPass]:
        """Teacher forward without autograd, student forward with it, and the fused divergence."""
        start = time.perf_counter()
        teacher = self.teacher_forward(views.teacher)
        self.timings["teacher"] = time.perf_counter() - start
        start = time.perf_counter()
        student_in = views.student.to(self.device)
        student_hidden = last_hidden_at(self.student, student_in.input_ids, student_in.attention_mask, *student_in.predicting_positions())
        student_weight, student_bias = output_head(self.student)
        out = self.divergence(
            student_hidden, student_weight, teacher.hidden, teacher.weight,
            views.target_ids.to(self.device), views.target_lengths, student_bias, teacher.bias,
        )
        if self.teacher_model is not None and is_sharded(self.teacher_model):
            self.teacher_model.reshard()  # its gathered head is no longer needed: free it until the next forward
        self.timings["student_forward"] = time.perf_counter() - start
        return out, teacher

    def training_step(self, batch: PromptBatch, batch_idx: int):
        rollouts = batch.rollouts
        if rollouts is None:
            raise RuntimeError("the batch has no rollouts: DistillationModule relies on its RolloutCallback (configure_callbacks)")
        start = time.perf_counter()
        targets = self.refiner.refine(batch, rollouts, self.teacher_access)
        self.timings["refine"] = time.perf_counter() - start
        views = self.make_views(batch, rollouts, targets)
        self.log_step(batch, rollouts, targets, views)
        # Never train, nor log a loss, on nothing; and skip together, or the ranks' collectives fall out of step.
        if self.trainer.strategy.reduce_boolean_decision(views.num_target_tokens == 0, all=False):
            self.skipped_empty += 1
            self.log("train/skipped_empty_steps", float(self.skipped_empty))
            rank_zero_warn(f"step {self.global_step}: every target is empty; skipped ({self.skipped_empty} so far)")
            return None
        out, teacher = self.distill(views)
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=len(rollouts))
        self.log_divergence(out, len(rollouts))
        self.log_diagnostics(batch, rollouts, targets, views, out, teacher)
        return out.loss

    def log_divergence(self, out: DivergenceOutput, batch_size: int) -> None:
        """Quantiles of the per-token values over the batch's target tokens, and the clip fraction."""
        values = out.per_token.float()
        p50, p95, p99 = torch.quantile(values, torch.tensor([0.5, 0.95, 0.99], device=values.device)).tolist()
        self.log_dict({"train/divergence_p50": p50, "train/divergence_p95": p95, "train/divergence_p99": p99,
                       "train/divergence_max": values.max().item(), "train/clip_fraction": out.clipped.float().mean().item()},
                      batch_size=batch_size)

    def on_before_backward(self, loss):
        self._backward_start = time.perf_counter()

    def on_after_backward(self):
        self.timings["backward"] = time.perf_counter() - getattr(self, "_backward_start", time.perf_counter())
        for name, seconds in self.timings.items():
            self.log(f"time/{name}", seconds)

    def log_diagnostics(self, batch, rollouts: Rollouts, targets: Targets, views: Views, out: DivergenceOutput, teacher: TeacherPass) -> None:
        """Prefix-failure diagnostics along the training target, and, for a rewriting refiner, along y_o
        (an extra teacher pass, every ``diagnostics_every`` steps)."""
        pivots = pivot_mass(teacher.hidden, teacher.weight, teacher.bias, out.teacher_lse, self.pivot_ids)
        stats = trajectory_stats(views.target_lengths, out.teacher_logprobs, self.disagreement_threshold,
                                 out.student_logprobs, out.per_token, pivots)
        self.log_dict({f"diag/{k}_{'y_r' if self.refiner.rewrites else 'y_o'}": v for k, v in stats.items()}, batch_size=len(rollouts))
        # The extra pass runs on a schedule, the same on every rank (a sharded teacher's forward is a collective).
        if self.refiner.rewrites and self.diagnostics_every and self.global_step % self.diagnostics_every == 0:
            contexts = self.refiner.scoring_contexts(batch, rollouts.prompt_index, self.teacher_access)
            inputs = pack(contexts, rollouts.token_ids, self.tokenizer.pad_token_id)
            raw = self.teacher_forward(inputs)
            ids = inputs.input_ids[inputs.target_mask].to(self.device)
            logprobs, lse = token_stats(raw.hidden, raw.weight, raw.bias, ids, self.divergence.chunk_size)
            lengths = torch.tensor([len(t) for t in rollouts.token_ids])
            stats = trajectory_stats(lengths, logprobs, self.disagreement_threshold,
                                     pivots=pivot_mass(raw.hidden, raw.weight, raw.bias, lse, self.pivot_ids))
            self.log_dict({f"diag/{k}_y_o": v for k, v in stats.items()}, batch_size=len(rollouts))

    # -- step metrics --------------------------------------------------------------------------------
    def log_step(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, views: Views) -> None:
        n = len(rollouts)
        answers = [batch.answer[i] for i in rollouts.prompt_index]
        y_o_correct = [self.verifier.score(t, a) for t, a in zip(rollouts.texts, answers)]
        stats = {
            "rollout/length": sum(map(len, rollouts.token_ids)) / n,
            "rollout/truncated": sum(rollouts.truncated) / n,
            "rollout/accuracy": sum(y_o_correct) / n,
            "train/target_tokens": float(views.num_target_tokens),
        }
        refined = [r for r in range(n) if targets.refined[r]]
        stats["refine/refined_fraction"] = len(refined) / n
        stats["refine/fallbacks"] = float(sum(targets.fallback))
        if refined:
            y_r_correct = {r: self.verifier.score(targets.texts[r], answers[r]) for r in refined}
            failed = [r for r in refined if not y_o_correct[r]]
            passed = [r for r in refined if y_o_correct[r]]
            stats["refine/accuracy_y_o"] = sum(y_o_correct[r] for r in refined) / len(refined)
            stats["refine/accuracy_y_r"] = sum(y_r_correct.values()) / len(refined)
            if failed:
                stats["refine/fail_to_pass"] = sum(y_r_correct[r] for r in failed) / len(failed)
            if passed:
                stats["refine/pass_to_fail"] = sum(not y_r_correct[r] for r in passed) / len(passed)
            stats["refine/length_y_o"] = sum(len(rollouts.token_ids[r]) for r in refined) / len(refined)
            stats["refine/length_y_r"] = sum(len(targets.token_ids[r]) for r in refined) / len(refined)
            stats["refine/edit_similarity"] = sum(
                Levenshtein.normalized_similarity(rollouts.token_ids[r], targets.token_ids[r]) for r in refined
            ) / len(refined)
        self.log_dict(stats, batch_size=n)
        if self.log_samples_every and self.global_step % self.log_samples_every == 0:
            self.log_samples(batch, rollouts, targets)

    def log_samples(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, count: int = 4) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        rows = []
        for r in range(min(count, len(rollouts))):
            i = rollouts.prompt_index[r]
            rows.append(
                f"**problem** {batch.problem[i]}  \n**answer** {batch.answer[i]}  \n**y_o** `{rollouts.texts[r]}`"
                + (f"  \n**y_r** `{targets.texts[r]}`" if targets.refined[r] else "")
            )
        experiment.add_text("samples", "\n\n---\n\n".join(rows), self.global_step)

    # -- evaluation ----------------------------------------------------------------------------------
    def sync_student(self) -> None:
        if self.engine.holds_weights:
            self.engine.sync_weights(STUDENT, self.student)

    def on_validation_epoch_start(self):
        self.sync_student()

    def on_test_epoch_start(self):
        self.sync_student()
        for profile in self.profiles.values():
            profile.reset()

    def validation_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0):
        rollouts = self.engine.generate(STUDENT, self.student, batch.prompt_ids, self.eval_sampling)
        self.score("val", dataloader_idx, "student", batch, rollouts)

    def test_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0):
        """The student's accuracy; what the teacher produces under the refiner; and the divergence by
        relative position along y_o (teacher in its scoring context) and along the targets y_r."""
        rollouts = self.engine.generate(STUDENT, self.student, batch.prompt_ids, self.eval_sampling)
        self.score("test", dataloader_idx, "student", batch, rollouts)
        targets = self.refiner.refine(batch, rollouts, self.teacher_access)
        if self.evaluate_teacher:
            solutions = self.refiner.teacher_solutions(batch, rollouts, targets, self.teacher_access, self.eval_sampling)
            self.score("test", dataloader_idx, "teacher", batch, solutions)
        student_contexts = [batch.prompt_ids[i] for i in rollouts.prompt_index]
        scoring = self.refiner.scoring_contexts(batch, rollouts.prompt_index, self.teacher_access)
        scored = [not (batch.padding and batch.padding[i]) for i in rollouts.prompt_index]
        self.profile("y_o", build_views(student_contexts, scoring, rollouts.token_ids, self.tokenizer.pad_token_id), scored)
        if self.refiner.rewrites:  # every rank runs the same passes (sharded models); padding is left out after
            self.profile("y_r", build_views(student_contexts, targets.teacher_contexts, targets.token_ids, self.tokenizer.pad_token_id),
                         [keep and refined for keep, refined in zip(scored, targets.refined)])

    def evaluated_in(self, stage: str) -> tuple[str, ...]:
        return ("student", "teacher") if stage == "test" and self.evaluate_teacher else ("student",)

    def profile(self, trajectory: str, views: Views, keep: list[bool]) -> None:
        """Add the per-token divergence along each kept row to that trajectory's position profile."""
        if not views.num_target_tokens:
            return
        out, _ = self.distill(views)
        rows = out.per_token.split(views.target_lengths.tolist())
        kept = [row for row, flag in zip(rows, keep) if flag]
        if kept:
            self.profiles[trajectory].update(torch.cat(kept), views.target_lengths[torch.tensor(keep)])

    def on_test_epoch_end(self):
        rows = self.compute_metrics("test")
        trajectories = ["y_o", "y_r"] if self.refiner.rewrites else ["y_o"]  # the same on every rank
        profiles = {name: self.profiles[name].compute().tolist() for name in trajectories}
        directory = self.log_dir()
        self.write_results(directory, rows, {"divergence_by_relative_position": profiles, "divergence": self.divergence.describe()})
        if profiles:
            self.plot_profiles(directory, profiles)

    @rank_zero_only
    def plot_profiles(self, directory: Path, profiles: dict[str, list[float]]) -> None:
        figure = plot_position_profiles(profiles, self.divergence.describe())
        figure.savefig(directory / "divergence_by_position.png", dpi=120)
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure("test/divergence_by_position", figure, self.global_step)

    # -- the end ---------------------------------------------------------------------------------------
    def on_fit_end(self):
        directory = self.log_dir() / "student_hf"  # on every rank: the log dir is a collective under DDP
        if not self.export_student:
            return
        # Every rank joins in: a sharded student is gathered before rank 0 writes it.
        if export_hf(self.student, self.tokenizer, directory, self.student_spec, rank=self.global_rank) is not None:
            rank_zero_info(f"exported the student to {directory}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["trd_counters"] = {"skipped_empty": self.skipped_empty}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_empty = checkpoint.get("trd_counters", {}).get("skipped_empty", 0)
