"""DistillationModule: one training step is one optimizer step, one straight line.

    the step's prompts -> rollouts y_o from the current student weights (synced first), one engine call
                       -> Refiner: targets (y_o, or y_r from one teacher call) and the teacher's contexts
                       -> micro-batches under a token budget, the same count on every rank
                          for each: views (the same target ids after each model's context, packed),
                          teacher.score (no autograd), student forward, Divergence, backward
                       -> loss = token mean over every target token of the global batch
                       -> clip, optimizer step, LR schedule step
                       -> a StepResult: what the step produced and measured, logged by StepLog

Elsewhere: evaluation (``evaluation.py``), the step's metrics (``step_metrics.py``) and their logging
(``step_log.py``), no-grad scoring passes (``scoring.py``), the micro-batch planner (``micro_batches.py``).
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from trd_lightning.data.prompts import DataError, PromptBatch
from trd_lightning.diagnostics import DEFAULT_PIVOTS, diagnose_rewrites, pivot_token_ids
from trd_lightning.distributed import on_all_ranks, sum_over_ranks
from trd_lightning.evaluation import DistillationEvaluation, check_answers, warn_unreadable_answers
from trd_lightning.losses import Divergence, DivergenceOutput
from trd_lightning.memory_plan import PlanError, RunShape, check_fits, largest_budget_that_fits
from trd_lightning.metrics import check_pass_k
from trd_lightning.micro_batches import MicroBatcher, auto_budget
from trd_lightning.models import (
    ModelSpec,
    Sharding,
    base_model,
    check_model_files,
    check_plain_head,
    export_hf,
    is_sharded,
    last_hidden_at,
    load_model,
    load_tokenizer,
    output_head,
    packs_sequences,
    stop_token_ids,
    vocab_size,
)
from trd_lightning.optim import WarmupCosine, check_optimizer, optimizer_and_schedule
from trd_lightning.precision import check_precision_settings, check_trainable_float32, compute_dtype
from trd_lightning.refiners import Identity, Refiner, Targets, TeacherAccess
from trd_lightning.reliability import GracefulInterrupt, NonFiniteGuard, RolloutRandomness, SaveOnResumableError
from trd_lightning.rollout import STUDENT, HFEngine, Placement, RolloutEngine, Rollouts, Sampling, VLLMEngine
from trd_lightning.rollout.guard import LogprobGuard
from trd_lightning.scores import SparseScores, TeacherScores
from trd_lightning.scoring import Scorer
from trd_lightning.step_log import StepLog
from trd_lightning.step_metrics import StepRecord, StepResult
from trd_lightning.strategy import gradient_sync
from trd_lightning.streaming import Prefetch, StreamClock, StreamPlanner
from trd_lightning.teachers import Teacher
from trd_lightning.teachers.local import TEACHER, LocalTeacher, SelfTeacher, exclude_reloadable_teacher
from trd_lightning.verifiers import ExactMatch, Verifier
from trd_lightning.views import ChatPrompts, Views, build_views, pack


class SettingsError(ValueError):
    """A setting that cannot work with this trainer; the message says what to set instead."""


def check_trainer(trainer) -> None:
    """Refuse Trainer settings the module's own optimizer step replaces, naming what to set instead."""
    if trainer.accumulate_grad_batches != 1:
        raise SettingsError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not used: one batch is one optimizer step. "
            "Set data.init_args.batch_size to the prompts per process per step (the old batch_size x accumulate_grad_batches), "
            "and model.init_args.max_tokens_per_micro_batch to bound what one forward pass holds"
        )
    if trainer.gradient_clip_val:
        raise SettingsError(
            f"trainer.gradient_clip_val={trainer.gradient_clip_val} does not apply: the module runs its own optimizer step. "
            f"Set model.init_args.gradient_clip_val: {trainer.gradient_clip_val} instead (and gradient_clip_algorithm there)"
        )


def check_trainable_attention(model, device: torch.device) -> None:
    """flex_attention has no backward pass on CPUs (torch 2.13 refuses it at the first backward): refuse it for the
    trained model there before any step runs. (A teacher, which runs without grad, may use it anywhere.)"""
    if "flex" in str(base_model(model).config._attn_implementation) and device.type == "cpu":
        raise SettingsError("the student's attn_implementation is flex_attention, which has no backward pass on CPUs; set "
                            "student.attn_implementation: sdpa to train on a CPU (flex_attention packs without padding on GPUs)")


def check_arguments(max_context_tokens: int, max_tokens_per_micro_batch: int | str | None, gradient_clip_val: float | None, packing: str,
                    gradient_clip_algorithm: str, disagreement_threshold: float, sync_every: int) -> None:
    """DistillationModule's numeric and named settings, refused with the accepted range before anything loads."""
    if max_context_tokens <= 0:
        raise ValueError(f"max_context_tokens must be > 0 (got {max_context_tokens})")
    if max_tokens_per_micro_batch not in (None, "auto") and not (isinstance(max_tokens_per_micro_batch, int) and max_tokens_per_micro_batch > 0):
        raise ValueError(f"max_tokens_per_micro_batch must be > 0, auto, or null for one micro-batch per step (got {max_tokens_per_micro_batch!r})")
    if gradient_clip_val is not None and not gradient_clip_val > 0:
        raise ValueError(f"gradient_clip_val must be > 0, or null not to clip (got {gradient_clip_val})")
    if packing not in ("auto", "always", "never"):
        raise ValueError(f"packing must be auto, always or never (got {packing!r})")
    if gradient_clip_algorithm not in ("norm", "value"):
        raise ValueError(f"gradient_clip_algorithm must be norm or value (got {gradient_clip_algorithm!r})")
    if not 0 < disagreement_threshold < 1:
        raise ValueError(f"disagreement_threshold must be in (0, 1) (got {disagreement_threshold})")
    if sync_every <= 0:
        raise ValueError(f"sync_every must be > 0 (got {sync_every})")


class DistillationModule(DistillationEvaluation, LightningModule):
    """Distils a teacher into the student on the student's own rollouts (OPD, OPSD, TRD).

    Args:
        student: the model being trained (a local path or a config; optional LoRA).
        teacher: ``SeparateTeacher`` (OPD), ``SelfTeacher`` (OPSD), or ``VLLMServerTeacher`` (a teacher served by
            ``vllm serve`` elsewhere: top-k and sampled-token divergences only).
        refiner: ``Identity`` (train on y_o) or ``TeacherRewrite`` (TRD: train on y_r).
        divergence: the per-token loss; null takes the refiner's default (reverse KL for
            Identity, forward KL for TeacherRewrite, both over the full vocabulary).
        engine: generates rollouts (``HFEngine`` by default; ``VLLMEngine`` on GPUs).
        logprob_guard: checks that the engine samples from the current weights, by rescoring its sampled
            tokens (``LogprobGuard``); on by default for engines that hold their own weights and return
            log-probabilities.
        sampling: how the student samples y_o (``n`` rollouts per prompt).
        eval_sampling: how validation and test sample (``n`` per problem, for Avg@n / Pass@k).
        verifier: checks answers (and steps, where it can), for metrics and for refiners that choose targets by them
            (``require_answer``, ``only_failed``, ``require_valid_steps``); never a term of the loss.
        optimizer: an optimizer class and its arguments (``class_path`` / ``init_args``).
        lr_schedule: warmup + cosine, stepped once per optimizer step; null keeps the learning rate constant.
        max_tokens_per_micro_batch: the token budget of one forward pass, per rank: sequences (context + target,
            counted in the model with the longer context) are grouped up to it, longest first; a longer sequence
            goes alone. ``auto``: on GPUs the largest budget the memory plan says fits; elsewhere a quarter of the step's
            tokens (at least its longest sequence), so the step still splits into length-sorted micro-batches. Null
            puts the whole step in one micro-batch.
        packing: ``auto`` puts each micro-batch's sequences into one row without padding (position ids restart per
            sequence) where the attention has varlen kernels (``attn_implementation: flex_attention``, torch's own, or
            ``flash_attention_2``), and right-pads micro-batches of length-sorted sequences elsewhere (sdpa and eager
            attention would compute a packed row as one masked square); ``always`` packs with any attention, ``never``
            always pads. A model seen to let packed sequences attend to each other is padded instead.
        gradient_clip_val: clip the step's gradient norm (or values) to this; null does not clip. (The Trainer's
            ``gradient_clip_val`` does not apply: the module runs the optimizer step itself.)
        gradient_clip_algorithm: ``norm`` or ``value``.
        streaming: overlap the step's phases per sequence: each rollout's rewrite is sent to the teacher at once, and
            each micro-batch is trained as soon as its sequences' targets are in, while later rewrites are still
            being written (``streaming.py``). The loss is the same token mean. The overlap needs a teacher that
            generates off the trainer's devices (``VLLMServerTeacher``); with another the rewrites come in one call and
            only the micro-batches stream. False: the synchronous step (rollouts, then every rewrite, then training).
        max_requests_in_flight: with ``streaming``, the teacher's generation requests out at once.
        max_context_tokens: the limit on a teacher context (refine or privileged prompt); longer
            ones lose tail tokens of the attempt or reference, never of the problem.
        sync_every: for engines with their own weights, sync them every this many optimizer steps.
        pass_k: the k of Pass@k in evaluation (each <= eval_sampling.n).
        log_samples_every: every this many steps, append the step's rows (problem, y_o, y_r and what was measured of
            each) to ``samples/rank<r>.jsonl`` in the log dir, and show a few as text in TensorBoard; 0: never.
        evaluate_teacher: in ``test``, also score what the teacher produces (its own solution in
            its context, or its rewrites of the student's rollouts).
        export_student: at the end of fit, save the student with ``save_pretrained`` in the log dir.
        pivot_tokens: words whose teacher probability mass the diagnostics track ("Wait", "However", ...): it rises
            where the teacher would rather interject than continue; words with no single-token spelling are skipped.
        disagreement_threshold: a target token whose teacher probability is below this is a disagreement; the
            diagnostics log the first one's relative position and the share of the loss after it.
        diagnostics_every: for a rewriting refiner, every this many steps, score y_o with the teacher in its scoring
            context and each rewrite with and without the privileged context (extra teacher passes); 0: never.
        max_consecutive_skips: a step with a non-finite loss or gradient changes no weight; this many in a row stop
            the run, naming what was seen.
        sharding: how FSDP2 shards the models under ``ModelParallelStrategy`` (ignored under other strategies).
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
        max_tokens_per_micro_batch: int | Literal["auto"] | None = "auto",
        packing: Literal["auto", "always", "never"] = "auto",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        streaming: bool = False,
        max_requests_in_flight: int = 64,
    ):
        super().__init__()
        if teacher is None:
            raise ValueError(
                "DistillationModule needs a teacher: set model.teacher to SeparateTeacher (OPD, a separate "
                "model) or SelfTeacher (OPSD, the student's own model with privileged context)"
            )
        check_arguments(max_context_tokens, max_tokens_per_micro_batch, gradient_clip_val, packing, gradient_clip_algorithm,
                        disagreement_threshold, sync_every)
        self.student_spec = student
        self.teacher = teacher
        self.refiner = refiner or Identity()
        self.divergence = divergence or self.refiner.default_divergence()
        self.teacher.check_divergence(self.divergence)  # e.g. a full-vocabulary divergence from top-k scores: refused now
        self.engine = engine or HFEngine()
        self.logprob_guard = logprob_guard or (LogprobGuard() if self.engine.holds_weights else None)
        self.sampling = sampling or Sampling()
        self.eval_sampling = eval_sampling or Sampling(greedy=True)
        check_pass_k(self.eval_sampling.n, pass_k)
        self.verifier = verifier or ExactMatch()
        check_optimizer(optimizer)
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.max_context_tokens = max_context_tokens
        self.sync_every = sync_every
        self.pass_k = list(pass_k)
        self.log_samples_every = log_samples_every
        self.evaluate_teacher = evaluate_teacher
        self.export_student = export_student
        self.disagreement_threshold = disagreement_threshold
        self.diagnostics_every = diagnostics_every
        self.sharding = sharding or Sharding()
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.packing = packing
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        if max_requests_in_flight <= 0:
            raise ValueError(f"max_requests_in_flight must be > 0 (got {max_requests_in_flight})")
        self.streaming, self.max_requests_in_flight = streaming, max_requests_in_flight
        self.nonfinite = NonFiniteGuard(max_consecutive_skips)
        self.automatic_optimization = False  # a step holds several micro-batches: the module runs the optimizer
        check_model_files(student, "student", "model.init_args.student")  # a path not there, or a folder that cannot load
        self.tokenizer = load_tokenizer(student)
        self.teacher.check_tokenizer(self.tokenizer, student)  # the vocabularies agree, seen from the files
        self.prompts = ChatPrompts(self.tokenizer)
        self.check_sampling(student.config_vocab_size())  # before any weights load; again once they have
        self.pivot_ids = pivot_token_ids(self.tokenizer, pivot_tokens)
        self.student = None
        self.teacher_model = None  # the teacher's own weights, when it has any here (not for a live/LoRA self-teacher or a server)
        self.stop_ids: set[int] = set()
        self.packing_checked: dict[str, bool] = {}
        self.synced_at: int | None = None  # the optimizer step whose weights the engine holds
        self.randomness = RolloutRandomness()
        self.skipped_empty = 0
        self.tokens_trained = 0  # target tokens over every rank, summed over the run's steps
        self.evaluated = ("student", "teacher")
        self.metrics = torch.nn.ModuleDict()
        self.profiles = self.make_profiles()
        self.training_rows_checked = False  # warned of training rows the verifier cannot read (once per run)
        self.context_checked: set[tuple[str, str]] = set()  # (split, dataset) whose problems fit max_context_tokens

    # -- setup -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.student is not None:
            return
        self.student = load_model(self.student_spec)
        check_plain_head(self.student, "student")
        check_trainable_attention(self.student, self.placement_device())
        self.check_sampling(vocab_size(self.student))
        self.stop_ids = stop_token_ids(self.tokenizer, self.student)
        self.engine.setup(self.tokenizer, self.stop_ids, self.placement(), self.sync_every)
        self.engine.check_roles(self.engine_roles())
        # Loads, builds (a frozen copy is taken before any sharding) or connects, and checks the vocabulary.
        self.teacher_model = self.teacher.setup(self.student, self.tokenizer, self.engine)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over its data-parallel dimension
            mesh = self.device_mesh["data_parallel"]
            self.sharding.apply(self.student, mesh)
            self.teacher.shard(self.sharding, mesh)
        exclude_reloadable_teacher(self, "teacher_model", self.teacher)

    def placement_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")

    def placement(self) -> Placement:
        """This process's place among the trainer's, its device and compute dtype, for the rollout engine."""
        if self._trainer is None:  # built by hand, outside a Trainer: one process here
            return Placement(compute_dtype=compute_dtype("32-true", self.student))
        device = self.placement_device()
        return Placement(rank=self.trainer.global_rank, world_size=self.trainer.world_size,
                         device_index=device.index if device.type == "cuda" else None,
                         compute_dtype=compute_dtype(self.trainer.precision, self.student))

    def run_shape(self, device_bytes: int) -> RunShape:
        """What the memory plan reads of this run: its models' specs, strategy, precision, budget and engines."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        teacher = getattr(self.teacher, "model", None)  # a separate teacher's spec
        if isinstance(self.teacher, SelfTeacher) and self.teacher.frozen and self.student_spec.lora is None:
            teacher = self.student_spec  # a frozen full copy of the student
        engine = self.engine if isinstance(self.engine, VLLMEngine) else None
        return RunShape(student=self.student_spec, teacher=teacher, precision=str(self.trainer.precision),
                        teacher_engine=engine is not None and TEACHER in self.engine_roles() and self.refiner.rewrites,
                        world_size=self.trainer.world_size, fsdp=isinstance(self.trainer.strategy, ModelParallelStrategy),
                        max_tokens_per_micro_batch=None if self.max_tokens_per_micro_batch == "auto" else self.max_tokens_per_micro_batch,
                        chunk_size=self.divergence.chunk_size,
                        engine=engine, device_bytes=device_bytes)

    def engine_roles(self) -> set[str]:
        """The roles the engine may serve: the student's, and a local teacher's with weights of its own (which
        generates rewrites, and its own solutions in ``test``)."""
        own_teacher = isinstance(self.teacher, LocalTeacher) and not self.teacher.is_live
        return {STUDENT, TEACHER} if own_teacher else {STUDENT}

    def check_sampling(self, vocab: int | None) -> None:
        if vocab is None:
            return
        for sampling in (self.sampling, self.eval_sampling, getattr(self.refiner, "sampling", None)):
            if sampling is not None:
                sampling.check_vocab(vocab)
        self.divergence.check_vocab(vocab)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if "solution" in self.refiner.required_fields() and datamodule is not None and not datamodule.has_solutions:
            raise SettingsError(
                "the refiner's templates need the reference solution (OPSD and reference-based refining read it), "
                "but the data has none; set data.solution_field to the column that holds it"
            )
        if datamodule is not None:
            check_answers(self.verifier, datamodule, {"fit": ["val"], "validate": ["val"], "test": ["test"]}.get(stage, []))
            # The training rows, at fit, or already at the validation before fit when the CLI has read them for it.
            training = ["train"] if stage == "fit" or ("train", "train") in getattr(datamodule, "datasets", {}) else []
            if training and not self.training_rows_checked:
                warn_unreadable_answers(self.verifier, datamodule, training)
                self.training_rows_checked = True
            self.check_context_lengths(datamodule, training + (["test"] if stage == "test" else []))
        self.setup_metrics()

    def check_context_lengths(self, datamodule, splits: list[str]) -> None:
        """Every teacher context the refiner will render for these splits' problems fits ``max_context_tokens`` once
        its attempt and reference solution are cut to nothing (the problem never is): else a ``DataError`` naming the
        row and the lengths, when the data is read rather than in the middle of a step."""
        templates = self.refiner.teacher_templates()
        for split in splits:
            for name in datamodule.dataset_names(split) if templates else []:
                if (split, name) in self.context_checked:
                    continue
                items = list(datamodule.prepare(split, name))
                for template in templates:
                    over = [(items[i], length) for i, length in self.prompts.too_long(template, [item["problem"] for item in items],
                                                                                       self.max_context_tokens)]
                    if over:
                        (item, length), others = over[0], f"; {len(over) - 1} more problems of it are too" if len(over) > 1 else ""
                        raise DataError(
                            f"{item['source']}: the teacher's context from the {template.role} {template.spec!r} is {length} tokens "
                            f"for this problem with the attempt and reference solution cut to nothing (the student's prompt is "
                            f"{len(item['prompt_ids'])} tokens), over model.init_args.max_context_tokens={self.max_context_tokens}"
                            f"{others}; raise max_context_tokens to at least {max(n for _, n in over)}, or shorten or drop the problem"
                        )
                self.context_checked.add((split, name))

    def configure_callbacks(self):
        check_trainer(self.trainer)  # Lightning calls this before it checks the trainer itself, with a vaguer message
        if self.trainer.state.fn == "fit":  # evaluating in bf16-true is fine; training in it moves nothing
            check_precision_settings(self.trainer.precision, self.student_spec.dtype, self.student_spec.lora is not None)
            device = self.trainer.strategy.root_device
            if device.type == "cuda":  # before any weight loads: a run that cannot fit is refused, with the numbers
                memory = torch.cuda.get_device_properties(device).total_memory
                if self.max_tokens_per_micro_batch == "auto":
                    self.max_tokens_per_micro_batch = largest_budget_that_fits(self.run_shape(memory))
                    if self.max_tokens_per_micro_batch is None:
                        raise PlanError("no max_tokens_per_micro_batch fits this device; `trd plan --config ...` shows every term")
                    rank_zero_info(f"max_tokens_per_micro_batch: auto -> {self.max_tokens_per_micro_batch:,} (the memory plan's largest that fits)")
                check_fits(self.run_shape(memory))
        if any(callback is self.nonfinite for callback in self.trainer.callbacks):
            return []  # a trainer entered again (fit after validate_before_fit) keeps what its first entry attached
        return [StepLog(self.verifier, self.disagreement_threshold, self.log_samples_every), self.nonfinite, GracefulInterrupt(),
                SaveOnResumableError()]

    def configure_optimizers(self):
        return optimizer_and_schedule(self.optimizer_factory, self.lr_schedule, self.student, int(self.trainer.estimated_stepping_batches))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_model is not None:
            self.teacher_model.eval()  # never dropout in the teacher, whatever Lightning toggles
        return self

    def on_fit_start(self) -> None:
        check_trainable_float32(self.student)  # the invariant itself, after the strategy and precision set the model up
        # Lightning warns of every module in eval mode when training starts; the frozen teacher is meant to be. Silence
        # exactly that count, so any other module left in eval mode (the student's) is still reported.
        if self.teacher_model is not None:
            frozen = sum(1 for module in self.teacher_model.modules() if not module.training)
            if frozen == sum(1 for module in self.modules() if not module.training):
                warnings.filterwarnings("ignore", message=rf"Found {frozen} module\(s\) in eval mode at the start of training")

    # -- what the step's passes share ------------------------------------------------------------------
    def packs(self, role: str) -> bool:
        """Whether ``role``'s micro-batches go into one row without padding (``models.packs_sequences``; the teacher
        says for itself), decided on first use."""
        if role not in self.packing_checked:
            self.packing_checked[role] = (self.teacher.packs(self.packing, self.device) if role == TEACHER
                                          else packs_sequences(self.student, self.packing, self.device, role))
        return self.packing_checked[role]

    @property
    def batcher(self) -> MicroBatcher:
        return MicroBatcher(self.max_tokens_per_micro_batch, self.tokenizer.pad_token_id, self.device)

    @property
    def scorer(self) -> Scorer:
        return Scorer(self.teacher, self.student, self.batcher, self.packs, self.divergence.chunk_size)

    @property
    def teacher_access(self) -> TeacherAccess:
        return TeacherAccess(self.prompts, self.max_context_tokens, self.verifier, self.stop_ids, self.teacher.generate,
                             self.scorer.teacher_mean_logprobs)

    def make_views(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, rows: Sequence[int] | None = None) -> Views:
        """Both models' inputs for these rows (all by default) of the step, packed where the model allows."""
        rows = range(len(rollouts)) if rows is None else rows
        return build_views(batch.prompts_of([rollouts.prompt_index[r] for r in rows]), [targets.teacher_contexts[r] for r in rows],
                           [targets.token_ids[r] for r in rows], self.tokenizer.pad_token_id, (self.packs(STUDENT), self.packs(TEACHER)))

    def distill(self, views: Views, weights: torch.Tensor | None = None, record: StepRecord | None = None,
                teacher: TeacherScores | None = None) -> tuple[DivergenceOutput, TeacherScores]:
        """The teacher's scores (no autograd; ``teacher``: already at hand), the student's forward with autograd, and the
        fused divergence (``weights``: each target token's weight in the loss; by default this batch's own token mean)."""
        record = record or StepRecord()
        if teacher is None:
            with record.timed("teacher"):
                teacher = self.teacher.score(views.teacher)
        with record.timed("student_forward"):
            student_hidden = last_hidden_at(self.student, views.student.to(self.device))
            student_weight, student_bias = output_head(self.student)
            out = self.divergence.against(teacher, student_hidden, student_weight, views.target_ids.to(self.device),
                                          views.target_lengths, student_bias, weights)
            self.teacher.release()
        return out, teacher

    # -- the step ------------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int):
        """One optimizer step: the whole step's rollouts (one engine call) are refined in one call, then learnt in
        micro-batches under the token budget; the loss is the token mean over every target token of the global batch."""
        step, record = self.global_step, StepRecord()
        with record.timed("step"):
            if self.streaming:
                rollouts, targets, loss, guarded = self.step_streaming(batch, record)
            else:
                rollouts = self.rollout(batch, record)
                guarded = self.check_rollout_logprobs(batch, rollouts, record)
                with record.timed("refine"):
                    targets = self.refiner.refine(batch, rollouts, self.teacher_access)
                self.engine.release()  # generation is done: the engines free the device for training (vLLM sleep mode)
                loss = self.learn(batch, rollouts, targets, record)
            diagnosed = self.diagnose(batch, rollouts, targets, record)
            self.update(loss, record)
        return {"result": StepResult(step, batch, rollouts, targets, record, "y_r" if self.refiner.rewrites else "y_o", guarded or diagnosed)}

    def rollout(self, batch: PromptBatch, record: StepRecord, each: Callable[[int, Rollouts], None] | None = None) -> Rollouts:
        """The step's rollouts y_o, every prompt in one engine call (decoding is memory-bound: the engine gets the whole
        step), from the current weights: an engine holding its own copy is synced first, every ``sync_every`` steps.
        ``each``: called with (first row, rollouts) of each prompt as the engine finishes it (``RolloutEngine.stream``)."""
        self.randomness.before_rollout(self.global_rank)
        step = self.global_step
        due = self.synced_at is None or step - self.synced_at >= self.sync_every or not self.engine.has_weights(STUDENT)
        if self.engine.holds_weights and due:
            with record.timed("sync"):
                self.engine.sync_weights(STUDENT, self.student)
            self.synced_at = step
        with record.timed("rollout"):
            if each is None:
                return self.engine.generate(STUDENT, self.student, batch.prompt_ids, self.sampling)
            parts = {}
            for k, part in self.engine.stream(STUDENT, self.student, batch.prompt_ids, self.sampling):
                each(k * self.sampling.n, part)
                parts[k] = part
            return Rollouts.join([parts[k] for k in range(len(batch.prompt_ids))])

    def check_rollout_logprobs(self, batch: PromptBatch, rollouts: Rollouts, record: StepRecord) -> bool:
        """The stale-weights guard, on its schedule: the engine's log-probabilities of its sampled tokens against the
        trainer's. Returns whether it ran."""
        guard = self.logprob_guard
        if guard is None or rollouts.logprobs is None or not guard.due(self.global_step):
            return False
        contexts = batch.prompts_of(rollouts.prompt_index)
        gaps = guard.check(rollouts.logprobs, self.scorer.student_logprobs(contexts, rollouts.token_ids), self.global_step)
        record.add_tokens(logprob_gap=gaps)
        return True

    def learn(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, record: StepRecord) -> float | None:
        """Forward and backward passes over the step's micro-batches; the step's loss (the same on every rank), or
        None when the whole step has no target token (skipped together, so collectives stay in step)."""
        lengths = [len(t) for t in targets.token_ids]
        tokens, sequences = sum_over_ranks([sum(lengths), sum(n > 0 for n in lengths)], self.device)
        if tokens == 0:
            return None
        self.tokens_trained += int(tokens)
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        student_contexts = batch.prompts_of(rollouts.prompt_index)
        costs = [max(len(s), len(t)) + n for s, t, n in zip(student_contexts, targets.teacher_contexts, lengths)]
        groups = list(self.batcher.plan(costs, packed=self.packs(STUDENT) and self.packs(TEACHER)))
        scale = self.trainer.world_size  # DDP and FSDP2 average gradients over ranks; the weights already divide by the global count
        loss = 0.0
        for k, (rows, run) in enumerate(groups):
            loss += self.train_micro_batch(batch, rollouts, targets, rows, run, record, sync=k == len(groups) - 1, scale=scale,
                                           counts=(int(tokens), int(sequences)))
        record.totals.update({"loss": loss, "target_tokens": sum(lengths), "micro_batches": len(groups), "ranks": 1})
        return sum_over_ranks([loss], self.device)[0]

    def train_micro_batch(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, rows: Sequence[int], run: Sequence[int],
                          record: StepRecord, sync: bool, scale: float, counts: tuple[int, int], ahead: dict[int, Future] | None = None) -> float:
        """One micro-batch's forward and backward (``rows``; none: a zero-weight filler pass over ``run``), its tokens
        weighted for ``counts`` = (target tokens, sequences) and the loss times ``scale``; its loss. ``ahead``: teacher
        scores already requested, by row."""
        views = self.make_views(batch, rollouts, targets, run)
        weights = self.divergence.weights(views.target_lengths, tokens=counts[0], sequences=counts[1])
        if not rows:  # a filler pass: this rank has fewer micro-batches' worth of sequences than another
            weights = torch.zeros_like(weights)
        with self.gradient_sync(sync):
            out, teacher = self.distill(views, weights, record, self.teacher_scores(batch, rollouts, targets, run, views, record, ahead))
            with record.timed("backward"):
                self.manual_backward(out.loss * scale)
        record.totals["processed_tokens"] += views.student.processed_tokens + views.teacher.processed_tokens
        if rows:
            record.totals["real_tokens"] += int(views.student.target_mask.sum() + views.teacher.target_mask.sum()) + sum(
                len(batch.prompt_ids[rollouts.prompt_index[r]]) + len(targets.teacher_contexts[r]) for r in rows)
            record.rows["micro_batch_target_length"].extend(views.target_lengths.tolist())
            record.add_tokens(divergence=out.per_token, clipped=out.clipped, teacher_logprob=out.teacher_logprobs,
                              student_logprob=out.student_logprobs, pivot_mass=teacher.pivot_mass(self.pivot_ids, out.teacher_lse))
        return float(out.loss.detach())

    def step_streaming(self, batch: PromptBatch, record: StepRecord) -> tuple[Rollouts, Targets, float | None, bool]:
        """The streaming step (``streaming``) up to its update: with a teacher off the trainer's devices, each rollout's
        rewrite is requested as the engine finishes it (``Prefetch``), then ``learn_streaming`` trains as they come.
        The rollouts, the targets, the loss, and whether the stale-weights guard ran."""
        clock = StreamClock()
        prefetch = (Prefetch(self.teacher.generate, self.max_requests_in_flight, clock, len(batch.prompt_ids) * self.sampling.n)
                    if self.teacher.concurrent else None)
        try:
            send = None if prefetch is None else lambda first, part: self.send_ahead(batch, first, part, prefetch)
            rollouts = self.rollout(batch, record, each=send)
            guarded = self.check_rollout_logprobs(batch, rollouts, record)
            targets, loss = self.learn_streaming(batch, rollouts, record, prefetch, clock)
        finally:
            if prefetch is not None:
                prefetch.close()
        return rollouts, targets, loss, guarded

    def send_ahead(self, batch: PromptBatch, first: int, rollouts: Rollouts, prefetch: Prefetch) -> None:
        """Rows ``first`` on (``rollouts``, one prompt's) into ``prefetch``, each with the generation its refinement asks for."""
        requests = {row: (prompts, sampling) for row, prompts, sampling in self.refiner.generation_requests(batch, rollouts, self.teacher_access)}
        for row in range(len(rollouts)):
            prefetch.add(first + row, *requests.get(row, ()))

    def learn_streaming(self, batch: PromptBatch, rollouts: Rollouts, record: StepRecord, prefetch: Prefetch | None,
                        clock: StreamClock) -> tuple[Targets, float | None]:
        """Training as the targets come: each row joins the planner once its target is in (``prefetch``: as its rewrite
        is written; none: the teacher is in this process and refines every row in one call), and each micro-batch the
        planner closes is trained at once, every target token weighing 1; the gradients are then scaled to the token
        mean over every rank's tokens. Ranks train in lockstep (each forward of a sharded model is a collective): a round
        trains one micro-batch on every rank, a filler pass where a rank has none left, until every rank is done. The
        step's targets, and its loss (None: no target token)."""
        parts: dict[int, Targets] = {}  # by first row
        if prefetch is None:
            with record.timed("refine"):
                parts[0] = self.refiner.refine(batch, rollouts, self.teacher_access)  # the teacher computes here: one call, as synchronous
        self.engine.release()
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        student_contexts = batch.prompts_of(rollouts.prompt_index)
        targets = Targets.blank(len(rollouts))
        packed = self.packs(STUDENT) and self.packs(TEACHER)
        planner = StreamPlanner(self.streaming_budget(student_contexts, rollouts), padded=not packed)
        ahead: dict[int, Future] = {}  # rows whose teacher scores were requested as they arrived (a served teacher)
        scores_ahead = prefetch is not None and self.teacher.scores == "sparse"  # a teacher off the trainer's devices (served)
        arrivals = self.arrivals(batch, rollouts, prefetch, parts)
        pending: deque[list[int]] = deque()
        done, loss, trained = False, 0.0, 0
        while True:
            while not pending and not done:
                if planner.rows and prefetch is not None and not prefetch.ready():  # train what is open rather than wait
                    pending.extend(planner.flush())
                    break
                arrived = next(arrivals, None)
                if arrived is None:
                    done = True
                    pending.extend(planner.flush())
                    break
                for row in targets.place(*arrived):
                    if scores_ahead and targets.decoded_scores(row) is None:  # its scoring pass, requested now
                        ahead[row] = prefetch.submit(self.teacher.score, pack([targets.teacher_contexts[row]], [targets.token_ids[row]],
                                                                              self.tokenizer.pad_token_id))
                    cost = max(len(student_contexts[row]), len(targets.teacher_contexts[row])) + len(targets.token_ids[row])
                    pending.extend(planner.add(row, cost))
            rows = pending.popleft() if pending else []  # none: this rank is done, and trains a filler while others train
            if on_all_ranks(not rows, self.device):
                break
            run = rows or [min(range(len(rollouts)), key=lambda r: len(targets.token_ids[r]) + len(targets.teacher_contexts[r]))]
            started, overlapping = time.perf_counter(), prefetch is not None and prefetch.in_flight()
            loss += self.train_micro_batch(batch, rollouts, targets, rows, run, record, sync=False, scale=1.0, counts=(1, 1), ahead=ahead)
            clock.overlapped += (time.perf_counter() - started) if overlapping else 0.0
            trained += 1
        step_targets = Targets.join([parts[k] for k in sorted(parts)])
        lengths = [len(t) for t in targets.token_ids]
        tokens, sequences = sum_over_ranks([sum(lengths), sum(n > 0 for n in lengths)], self.device)
        if self.trainer.world_size > 1 and not is_sharded(self.student):  # DDP reduces on a synced backward: one, last
            self.train_micro_batch(batch, rollouts, targets, [], [0], record, sync=True, scale=1.0, counts=(1, 1))
        record.totals.update({"target_tokens": sum(lengths), "micro_batches": trained, "ranks": 1})
        clock.record(record)
        if tokens == 0:
            return step_targets, None
        self.tokens_trained += int(tokens)
        norm = tokens if self.divergence.reduction == "token" else sequences
        for parameter in self.student.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(self.trainer.world_size / norm)
        record.totals["loss"] = loss / norm
        return step_targets, sum_over_ranks([loss], self.device)[0] / norm

    def arrivals(self, batch: PromptBatch, rollouts: Rollouts, prefetch: Prefetch | None, parts: dict[int, Targets]) -> Iterator[tuple[int, Targets]]:
        """(first row, targets of that row on) as they come: a refinement made in one call; else every row that asks
        the teacher for nothing at once, then each row as its generation request finishes, refined on this thread."""
        if prefetch is None:
            yield from parts.items()
            return
        access = replace(self.teacher_access, generate=prefetch.generate)
        for row in prefetch.finished():  # each as it finishes
            parts[row] = self.refiner.refine(batch, rollouts.select([row]), access)
            yield row, parts[row]

    def streaming_budget(self, student_contexts: Sequence[Sequence[int]], rollouts: Rollouts) -> int | None:
        """The streaming planner's budget: the configured one; for ``auto``, the memory plan's where there is one, else
        the synchronous rule over the costs expected before the targets exist (a rewrite's context holds y_o too)."""
        budget = self.max_tokens_per_micro_batch
        if budget != "auto":
            return budget
        expected = [len(c) + len(y) * (2 if self.refiner.rewrites else 1) for c, y in zip(student_contexts, rollouts.token_ids)]
        return auto_budget(expected)

    def teacher_scores(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, rows: Sequence[int], views: Views,
                       record: StepRecord, ahead: dict[int, Future] | None = None) -> TeacherScores:
        """The teacher's scores of one micro-batch (``views``, of ``rows``) in row-major target order: a row's from the
        decode that wrote its target where it has them (``Targets.decoded_scores``), the others' from a scoring pass,
        or (``ahead``) from the pass the streaming step already requested for each of them."""
        decoded = [targets.decoded_scores(r) if self.teacher.scores == "sparse" else None for r in rows]
        passed = [r for r, scores in zip(rows, decoded) if scores is None]
        record.totals["teacher_pass_tokens"] += sum(len(targets.teacher_contexts[r]) + len(targets.token_ids[r]) for r in passed)
        record.totals["decode_scored_tokens"] += sum(len(scores) for scores in decoded if scores is not None)
        scores = None  # of the rows in ``passed``, one after another
        with record.timed("teacher"):
            if passed and ahead and all(r in ahead for r in passed):
                scores = SparseScores.cat([ahead.pop(r).result() for r in passed])
            elif passed:
                scores = self.teacher.score(views.teacher if len(passed) == len(rows) else self.make_views(batch, rollouts, targets, passed).teacher)
        if len(passed) == len(rows):
            return scores
        parts, start = [], 0
        for r, own in zip(rows, decoded):
            if own is None:
                own, start = scores.select(slice(start, start + len(targets.token_ids[r]))), start + len(targets.token_ids[r])
            parts.append(own)
        return SparseScores.cat(parts)

    def gradient_sync(self, enabled: bool):
        """Around one micro-batch's backward: DDP all-reduces on the step's last only (``strategy.gradient_sync``)."""
        return gradient_sync(self.trainer.strategy, self.student, enabled)

    def diagnose(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, record: StepRecord) -> bool:
        """For a rewriting refiner, every ``diagnostics_every`` steps (``diagnostics.diagnose_rewrites``). Returns whether it ran."""
        if not (self.refiner.rewrites and self.diagnostics_every and self.global_step % self.diagnostics_every == 0):
            return False
        with record.timed("diagnostics"):
            scoring = self.refiner.scoring_contexts(batch, rollouts.prompt_index, self.teacher_access)
            plain = batch.prompts_of(rollouts.prompt_index)
            rows, tokens = diagnose_rewrites(self.scorer, scoring, plain, rollouts, targets, self.pivot_ids)
            record.rows.update(rows)
            for name, values in tokens.items():
                record.add_tokens(**{name: torch.cat(values)})
        return True

    def update(self, loss: float | None, record: StepRecord) -> None:
        """The optimizer step (gradients dropped when the step is empty or non-finite, so no weight moves), with
        the module's own clipping, and the learning-rate schedule's step."""
        optimizer = self.optimizers()
        with record.timed("optimizer"):
            if loss is None:
                optimizer.zero_grad(set_to_none=True)
                self.skipped_empty += 1
                rank_zero_warn(f"step {self.global_step}: every target is empty; skipped ({self.skipped_empty} so far)")
                record.totals["skipped_empty_steps"] = float(self.skipped_empty)
            else:
                self.log("train/loss", loss, prog_bar=True, logger=False)
                skipped = self.nonfinite.check(loss, self.student.parameters(),
                                               lambda flag: self.trainer.strategy.reduce_boolean_decision(flag, all=False))
                if not skipped and self.gradient_clip_val:
                    self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm=self.gradient_clip_algorithm)
            optimizer.step()  # with no gradients, AdamW moves nothing; the step still counts, as the schedule does
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()

    # -- around the steps --------------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        self.randomness.stash(self.global_rank)  # validation in the middle of training never shifts the rollouts' stream

    def on_validation_end(self) -> None:
        self.randomness.restore_stash()
        self.engine.release()  # training follows

    def on_fit_end(self):
        directory = self.log_dir() / "student_hf"  # on every rank: the log dir is a collective under DDP
        if not self.export_student:
            return
        # Every rank joins in: a sharded student is gathered before rank 0 writes it.
        if export_hf(self.student, self.tokenizer, directory, self.student_spec, rank=self.global_rank) is not None:
            rank_zero_info(f"exported the student to {directory}")

    def teardown(self, stage: str) -> None:
        if stage in ("fit", "test"):  # free the engine's memory; it starts again (and syncs) if this process goes on
            self.engine.teardown()
            self.synced_at = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["trd_counters"] = {"skipped_empty": self.skipped_empty, "tokens_trained": self.tokens_trained}
        checkpoint["rollout_randomness"] = self.randomness.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counters = checkpoint.get("trd_counters", {})
        self.skipped_empty, self.tokens_trained = counters.get("skipped_empty", 0), counters.get("tokens_trained", 0)
        self.synced_at = None  # a new process's engine holds none of the weights
        # Checkpoints from before the rollout moved into the module keep this state under their RolloutCallback.
        legacy = [state for key, state in checkpoint.get("callbacks", {}).items() if key.startswith("RolloutCallback")]
        state = checkpoint.get("rollout_randomness") or (legacy[0] if legacy else None)
        if state is not None:
            self.randomness.load_state_dict(state)
