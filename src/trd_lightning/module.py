"""DistillationModule: one training step is one optimizer step, one straight line.

    the step's prompts -> rollouts y_o (RolloutCallback: current student weights, one engine call)
                       -> Refiner: targets (y_o, or y_r from one teacher call) and the teacher's contexts
                       -> micro-batches under a token budget, the same count on every rank
                          for each: views (the same target ids after each model's context, packed),
                          teacher.score (no autograd), student forward, Divergence, backward
                       -> loss = token mean over every target token of the global batch
                       -> clip, optimizer step, LR schedule step
                       -> one record of what the step measured -> metrics, logged once
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from rapidfuzz.distance import Levenshtein

from trd_lightning.data.prompts import PromptBatch
from trd_lightning.diagnostics import DEFAULT_PIVOTS, PositionProfile, pivot_token_ids, token_stats
from trd_lightning.evaluation import EvaluationMixin, check_answers, plot_position_profiles
from trd_lightning.losses import Divergence, DivergenceOutput
from trd_lightning.metrics import SampledAccuracy
from trd_lightning.micro_batches import plan_micro_batches
from trd_lightning.models import (
    ModelSpec,
    Sharding,
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
from trd_lightning.optim import WarmupCosine
from trd_lightning.refiners import Identity, Refiner, Targets, TeacherAccess
from trd_lightning.reliability import GracefulInterrupt, NonFiniteGuard, SaveOnResumableError
from trd_lightning.rollout import HFEngine, RolloutCallback, RolloutEngine, Rollouts, Sampling
from trd_lightning.rollout.callback import STUDENT
from trd_lightning.rollout.guard import LogprobGuard
from trd_lightning.scores import TeacherScores
from trd_lightning.step_metrics import REFINER_METRIC, StepRecord, gather, step_metrics
from trd_lightning.teachers import Teacher, evaluating
from trd_lightning.teachers.local import TEACHER, exclude_reloadable_teacher
from trd_lightning.verifiers import ExactMatch, Verifier
from trd_lightning.views import ChatPrompts, Views, build_views, pack

# What a sample line carries of the step's per-row measurements.
SAMPLE_FIELDS = ("y_o_correct", "y_o_steps_valid", "y_o_truncated", "refined", "fallback", "y_r_correct", "y_r_steps_valid", "edit_similarity")


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


class DistillationModule(EvaluationMixin, LightningModule):
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
            goes alone. Null puts the whole step in one micro-batch.
        packing: ``auto`` puts each micro-batch's sequences into one row without padding (position ids restart per
            sequence) where the attention has varlen kernels (``attn_implementation: flash_attention_2``), and
            right-pads micro-batches of length-sorted sequences elsewhere (sdpa and eager attention would compute a
            packed row as one masked square); ``always`` packs with any attention, ``never`` always pads. A model
            seen to let packed sequences attend to each other is padded instead.
        gradient_clip_val: clip the step's gradient norm (or values) to this; null does not clip. (The Trainer's
            ``gradient_clip_val`` does not apply: the module runs the optimizer step itself.)
        gradient_clip_algorithm: ``norm`` or ``value``.
        max_context_tokens: the limit on a teacher context (refine or privileged prompt); longer
            ones lose tail tokens of the attempt or reference, never of the problem.
        sync_every: for engines with their own weights, sync them every this many optimizer steps.
        pass_k: the k of Pass@k in evaluation (each <= eval_sampling.n).
        log_samples_every: every this many steps, append the step's rows (problem, y_o, y_r and what was measured of
            each) to ``samples/rank<r>.jsonl`` in the log dir, and show a few as text in TensorBoard; 0: never.
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
        max_tokens_per_micro_batch: int | None = None,
        packing: Literal["auto", "always", "never"] = "auto",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ):
        super().__init__()
        if teacher is None:
            raise ValueError(
                "DistillationModule needs a teacher: set model.teacher to SeparateTeacher (OPD, a separate "
                "model) or SelfTeacher (OPSD, the student's own model with privileged context)"
            )
        if max_context_tokens <= 0:
            raise ValueError(f"max_context_tokens must be > 0 (got {max_context_tokens})")
        if max_tokens_per_micro_batch is not None and max_tokens_per_micro_batch <= 0:
            raise ValueError(f"max_tokens_per_micro_batch must be > 0, or null for one micro-batch per step (got {max_tokens_per_micro_batch})")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0, or null not to clip (got {gradient_clip_val})")
        if packing not in ("auto", "always", "never"):
            raise ValueError(f"packing must be auto, always or never (got {packing!r})")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be norm or value (got {gradient_clip_algorithm!r})")
        if not 0 < disagreement_threshold < 1:
            raise ValueError(f"disagreement_threshold must be in (0, 1) (got {disagreement_threshold})")
        self.student_spec = student
        self.teacher = teacher
        self.refiner = refiner or Identity()
        self.divergence = divergence or self.refiner.default_divergence()
        self.teacher.check_divergence(self.divergence)  # e.g. a full-vocabulary divergence from top-k scores: refused now
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
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.packing = packing
        self.packing_checked: dict[str, bool] = {}
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.nonfinite = NonFiniteGuard(max_consecutive_skips)
        self.automatic_optimization = False  # a step holds several micro-batches: the module runs the optimizer
        self.tokenizer = load_tokenizer(student)
        self.prompts = ChatPrompts(self.tokenizer)
        self.check_sampling(student.config_vocab_size())  # before any weights load; again once they have
        self.pivot_ids = pivot_token_ids(self.tokenizer, pivot_tokens)
        self.student = None
        self.teacher_model = None  # the teacher's own weights, when it has any here (not for a live/LoRA self-teacher or a server)
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
        check_plain_head(self.student, "student")
        self.check_sampling(vocab_size(self.student))
        self.stop_ids = stop_token_ids(self.tokenizer, self.student)
        self.engine.setup(self.tokenizer, self.stop_ids)
        # Loads, builds (a frozen copy is taken before any sharding) or connects, and checks the vocabulary.
        self.teacher_model = self.teacher.setup(self.student, self.tokenizer, self.engine)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over its data-parallel dimension
            mesh = self.device_mesh["data_parallel"]
            self.sharding.apply(self.student, mesh)
            self.teacher.shard(self.sharding, mesh)
        exclude_reloadable_teacher(self, "teacher_model", self.teacher)

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
            raise ValueError(
                "the refiner's templates need the reference solution (OPSD and reference-based refining read it), "
                "but the data has none; set data.solution_field to the column that holds it"
            )
        if datamodule is not None:
            check_answers(self.verifier, datamodule, {"fit": ["val"], "validate": ["val"], "test": ["test"]}.get(stage, []))
        self.setup_metrics()

    def configure_callbacks(self):
        check_trainer(self.trainer)  # Lightning calls this before it checks the trainer itself, with a vaguer message
        return [RolloutCallback(self.sync_every), self.nonfinite, GracefulInterrupt(), SaveOnResumableError()]

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

    def on_fit_start(self) -> None:
        # Lightning warns of every module in eval mode when training starts; the frozen teacher is meant to be. Silence
        # exactly that count, so any other module left in eval mode (the student's) is still reported.
        if self.teacher_model is not None:
            frozen = sum(1 for module in self.teacher_model.modules() if not module.training)
            if frozen == sum(1 for module in self.modules() if not module.training):
                warnings.filterwarnings("ignore", message=rf"Found {frozen} module\(s\) in eval mode at the start of training")

    # -- the student's own log-probabilities -----------------------------------------------------------
    def rollout_logprobs(self, batch: PromptBatch, rollouts: Rollouts) -> torch.Tensor:
        """The student's log-probabilities (temperature 1) of each sampled token, concatenated in rollout order."""
        contexts = [batch.prompt_ids[i] for i in rollouts.prompt_index]
        weight, bias = output_head(self.student)
        found = [None] * len(rollouts)
        with torch.no_grad(), evaluating(self.student):
            for rows, inputs in self.micro_batches(contexts, rollouts.token_ids, self.packs(STUDENT)):
                hidden = last_hidden_at(self.student, inputs.to(self.device))
                ids = inputs.input_ids[inputs.target_mask].to(self.device)
                logprobs, _ = token_stats(hidden, weight, bias, ids, self.divergence.chunk_size)
                for row, values in zip(rows, logprobs.split([len(rollouts.token_ids[r]) for r in rows])):
                    found[row] = values
        return torch.cat(found) if found else torch.empty(0)

    @property
    def teacher_access(self) -> TeacherAccess:
        return TeacherAccess(self.prompts, self.max_context_tokens, self.verifier, self.stop_ids, self.teacher.generate, self.teacher_mean_logprobs)

    def teacher_mean_logprobs(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[float]:
        """The teacher's mean log-probability per token of each target after its context (-inf for an empty target)."""
        means = [float("-inf")] * len(targets)
        for rows, logprobs, _, _ in self.teacher_scores(contexts, targets):
            for r, values in zip(rows, logprobs.split([len(targets[r]) for r in rows])):
                if len(values):
                    means[r] = float(values.mean())
        return means

    # -- micro-batches ------------------------------------------------------------------------------
    def agree_max(self, value: int) -> int:
        """The maximum of ``value`` over ranks (a collective; ``value`` itself in one process)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
            return value
        tensor = torch.tensor(value, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return int(tensor)

    def sum_over_ranks(self, *values: float) -> list[float]:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def packs(self, role: str) -> bool:
        """Whether ``role``'s micro-batches go into one row without padding (``models.packs_sequences``; the teacher
        says for itself), decided on first use."""
        if role not in self.packing_checked:
            self.packing_checked[role] = (self.teacher.packs(self.packing, self.device) if role == TEACHER
                                          else packs_sequences(self.student, self.packing, self.device, role))
        return self.packing_checked[role]

    def plan(self, costs: Sequence[int], packed: bool) -> Iterator[tuple[list[int], list[int]]]:
        """(rows, rows to run) for each micro-batch under the token budget, the same count on every rank. A rank
        with fewer sequences gets empty micro-batches: it runs its cheapest row there, to be discarded (a filler
        pass keeps the collectives of sharded forwards and synced backwards in step)."""
        for rows in plan_micro_batches(costs, self.max_tokens_per_micro_batch, self.agree_max, padded=not packed):
            yield rows, rows or [min(range(len(costs)), key=costs.__getitem__)]

    def micro_batches(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], packed: bool):
        """(rows, inputs) for each micro-batch of these sequences, as ``plan`` forms them (``rows`` empty: a filler)."""
        for rows, run in self.plan([len(c) + len(t) for c, t in zip(contexts, targets)], packed):
            yield rows, pack([contexts[r] for r in run], [targets[r] for r in run], self.tokenizer.pad_token_id, packed)

    # -- the step ------------------------------------------------------------------------------------
    def make_views(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, rows: Sequence[int] | None = None) -> Views:
        """Both models' inputs for these rows (all by default) of the step, packed where the model allows."""
        rows = range(len(rollouts)) if rows is None else rows
        return build_views([batch.prompt_ids[rollouts.prompt_index[r]] for r in rows], [targets.teacher_contexts[r] for r in rows],
                           [targets.token_ids[r] for r in rows], self.tokenizer.pad_token_id, (self.packs(STUDENT), self.packs(TEACHER)))

    def distill(self, views: Views, weights: torch.Tensor | None = None) -> tuple[DivergenceOutput, TeacherScores]:
        """The teacher's scores (no autograd), the student's forward with autograd, and the fused divergence
        (``weights``: each target token's weight in the loss; by default this batch's own token mean)."""
        start = time.perf_counter()
        teacher = self.teacher.score(views.teacher)
        self.timings["teacher"] = self.timings.get("teacher", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        student_hidden = last_hidden_at(self.student, views.student.to(self.device))
        student_weight, student_bias = output_head(self.student)
        out = self.divergence.against(teacher, student_hidden, student_weight, views.target_ids.to(self.device),
                                      views.target_lengths, student_bias, weights)
        self.teacher.release()
        self.timings["student_forward"] = self.timings.get("student_forward", 0.0) + time.perf_counter() - start
        return out, teacher

    def training_step(self, batch: PromptBatch, batch_idx: int):
        """One optimizer step: the whole step's rollouts (sampled by the RolloutCallback in one engine call) are
        refined in one call, then learnt in micro-batches under the token budget; the loss is the token mean over
        every target token of the global batch."""
        start = time.perf_counter()
        step, record = self.global_step, StepRecord()
        rollouts = batch.rollouts
        if rollouts is None:
            raise RuntimeError("the batch has no rollouts: DistillationModule relies on its RolloutCallback (configure_callbacks)")
        self.check_rollout_logprobs(batch, rollouts, record)
        refine_start = time.perf_counter()
        targets = self.refiner.refine(batch, rollouts, self.teacher_access)
        record.seconds["refine"] = time.perf_counter() - refine_start
        self.record_targets(batch, rollouts, targets, record)
        loss = self.learn(batch, rollouts, targets, record)
        coherence = self.diagnose_rollouts(batch, rollouts, targets, record)
        self.update(loss, record)
        # The callback's sync and rollout ran before this method; the step is all of it.
        record.seconds.update({name: self.timings[name] for name in ("sync", "rollout", "teacher", "student_forward") if name in self.timings})
        record.seconds["step"] = time.perf_counter() - start + self.timings.get("sync", 0.0) + self.timings.get("rollout", 0.0)
        self.timings = dict(record.seconds)  # this step's stages, until the next step's rollout starts afresh
        self.log_record(record, step)
        if self.log_samples_every and step % self.log_samples_every == 0:
            self.log_samples(step, batch, rollouts, targets, record, coherence)

    def learn(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, record: StepRecord) -> float | None:
        """Forward and backward passes over the step's micro-batches; the step's loss (the same on every rank), or
        None when the whole step has no target token (skipped together, so collectives stay in step)."""
        lengths = [len(t) for t in targets.token_ids]
        tokens, sequences = self.sum_over_ranks(sum(lengths), sum(n > 0 for n in lengths))
        if tokens == 0:
            return None
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        student_contexts = [batch.prompt_ids[i] for i in rollouts.prompt_index]
        costs = [max(len(s), len(t)) + n for s, t, n in zip(student_contexts, targets.teacher_contexts, lengths)]
        groups = list(self.plan(costs, packed=self.packs(STUDENT) and self.packs(TEACHER)))
        scale = self.trainer.world_size  # DDP and FSDP2 average gradients over ranks; the weights already divide by the global count
        loss, backward_seconds = 0.0, 0.0
        for k, (rows, run) in enumerate(groups):
            views = self.make_views(batch, rollouts, targets, run)
            weights = self.divergence.weights(views.target_lengths, tokens=int(tokens), sequences=int(sequences))
            if not rows:  # a filler pass: this rank has fewer micro-batches' worth of sequences than another
                weights = torch.zeros_like(weights)
            with self.gradient_sync(k == len(groups) - 1):
                out, teacher = self.distill(views, weights)
                backward_start = time.perf_counter()
                self.manual_backward(out.loss * scale)
                backward_seconds += time.perf_counter() - backward_start
            loss += float(out.loss.detach())
            processed = views.student.processed_tokens + views.teacher.processed_tokens
            record.totals["processed_tokens"] += processed
            if rows:
                record.totals["real_tokens"] += int(views.student.target_mask.sum() + views.teacher.target_mask.sum()) + sum(
                    len(student_contexts[r]) + len(targets.teacher_contexts[r]) for r in rows)
                record.rows["micro_batch_target_length"].extend(views.target_lengths.tolist())
                record.add_tokens(divergence=out.per_token, clipped=out.clipped, teacher_logprob=out.teacher_logprobs,
                                  student_logprob=out.student_logprobs,
                                  pivot_mass=teacher.pivot_mass(self.pivot_ids, out.teacher_lse))
        record.seconds["backward"] = backward_seconds
        (global_loss,) = self.sum_over_ranks(loss)
        record.totals.update({"loss": loss, "target_tokens": sum(lengths), "micro_batches": len(groups), "ranks": 1})
        return global_loss

    @contextmanager
    def gradient_sync(self, enabled: bool):
        """DDP reduces gradients on the step's last backward only (``no_sync`` before it): one all-reduce per step.
        FSDP2 reduce-scatters after every micro-batch, since skipping that would keep whole unsharded gradients
        on every rank."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)  # parallel strategies only
        if enabled or block is None or is_sharded(self.student):
            yield
        else:
            with block():
                yield

    def update(self, loss: float | None, record: StepRecord) -> None:
        """The optimizer step (gradients dropped when the step is empty or non-finite, so no weight moves), with
        the module's own clipping, and the learning-rate schedule's step."""
        start = time.perf_counter()
        optimizer = self.optimizers()
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
        record.seconds["optimizer"] = time.perf_counter() - start

    def check_rollout_logprobs(self, batch: PromptBatch, rollouts: Rollouts, record: StepRecord) -> None:
        """The stale-weights guard: the engine's log-probabilities of its sampled tokens against the trainer's."""
        guard = self.logprob_guard
        if guard is None or rollouts.logprobs is None or not guard.due(self.global_step):
            return
        trainer_logprobs = self.rollout_logprobs(batch, rollouts)
        guard.check(rollouts.logprobs, trainer_logprobs, self.global_step)
        engine = torch.tensor([value for row in rollouts.logprobs for value in row], dtype=torch.float64)
        record.add_tokens(logprob_gap=(engine - trainer_logprobs.detach().double().cpu()).abs())

    def diagnose_rollouts(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, record: StepRecord) -> dict[int, dict[str, float]]:
        """For a rewriting refiner, every ``diagnostics_every`` steps: the teacher along y_o, in its scoring
        context, and the coherence of each rewrite (extra teacher passes, in micro-batches, on the same schedule on
        every rank). Returns each rewrite's coherence values by row, for the samples."""
        if not self.diagnostics_due(self.global_step):
            return {}
        start = time.perf_counter()
        contexts = self.refiner.scoring_contexts(batch, rollouts.prompt_index, self.teacher_access)
        for rows, logprobs, scores, lse in self.teacher_scores(contexts, rollouts.token_ids):
            if rows:
                record.rows["diag_y_o_length"].extend(len(rollouts.token_ids[r]) for r in rows)
                record.add_tokens(diag_y_o_teacher_logprob=logprobs, diag_y_o_pivot_mass=scores.pivot_mass(self.pivot_ids, lse))
        coherence = self.coherence(batch, rollouts, targets, record)
        record.seconds["diagnostics"] = time.perf_counter() - start
        return coherence

    def coherence(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, record: StepRecord) -> dict[int, dict[str, float]]:
        """How likely the teacher finds each rewrite y_r in the context it was written and scored in (the refine
        prompt, with the attempt and any reference) and in the student's plain prompt (the problem alone), as mean
        log-probabilities per token. A rewrite the teacher finds likely only when it sees the privileged context
        (a far lower plain score) is suspect: an answer copied into a flawed derivation reads that way."""
        plain = [batch.prompt_ids[i] for i in rollouts.prompt_index]
        refine_means = self.teacher_mean_logprobs(targets.teacher_contexts, targets.token_ids)
        plain_means = self.teacher_mean_logprobs(plain, targets.token_ids)
        out = {}
        for r in range(len(rollouts)):
            if not targets.refined[r] or not targets.token_ids[r]:
                continue
            out[r] = {"y_r_logprob_refine": refine_means[r], "y_r_logprob_plain": plain_means[r]}
            record.rows["coherence_refine"].append(out[r]["y_r_logprob_refine"])
            record.rows["coherence_plain"].append(out[r]["y_r_logprob_plain"])
            valid = record.rows.get("y_r_steps_valid")
            if valid:  # tasks whose steps can be checked: split the signal by what the rewrite really is
                record.rows["coherence_answer_patched"].append(float(record.rows["y_r_correct"][r] and not valid[r]))
                record.rows["coherence_steps_valid"].append(valid[r])
        return out

    def teacher_scores(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]):
        """The teacher's log-probability of each target token in its context, a micro-batch at a time:
        (rows, log-probabilities in row order, the teacher's scores, log-normalisers or None); ``rows`` empty for a
        filler. What the teacher keeps gathered for a micro-batch is released before the next."""
        for rows, inputs in self.micro_batches(contexts, targets, self.packs(TEACHER)):
            scores = self.teacher.score(inputs)
            logprobs, lse = scores.target_logprobs(inputs.input_ids[inputs.target_mask].to(self.device), self.divergence.chunk_size)
            yield rows, logprobs, scores, lse
            self.teacher.release()

    # -- step metrics --------------------------------------------------------------------------------
    def record_targets(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, record: StepRecord) -> None:
        """Per rollout: its length, cut-off, correctness; and, where the target is a rewrite, the rewrite's. Each set
        of responses is verified in one call (a code verifier runs their tests concurrently)."""
        answers = [batch.answer[i] for i in rollouts.prompt_index]
        refined = [r for r in range(len(rollouts)) if targets.refined[r]]
        y_o_correct, y_o_tests = self.verifier.grade_many(rollouts.texts, answers)
        y_r_correct = dict(zip(refined, self.verifier.score_many([targets.texts[r] for r in refined], [answers[r] for r in refined])))
        for r, ids in enumerate(rollouts.token_ids):
            values = {
                "y_o_length": len(ids), "y_o_truncated": rollouts.truncated[r], "y_o_correct": y_o_correct[r],
                "refined": targets.refined[r], "fallback": targets.fallback[r], "target_length": len(targets.token_ids[r]),
                "y_r_correct": y_r_correct.get(r, False),
                "edit_similarity": Levenshtein.normalized_similarity(ids, targets.token_ids[r]) if targets.refined[r] else 0.0,
            }
            if y_o_tests is not None:
                values["y_o_tests_passed"] = y_o_tests[r]
            problem = batch.problem[rollouts.prompt_index[r]]
            if (valid := self.verifier.steps_valid(problem, rollouts.texts[r])) is not None:  # tasks whose steps can be checked
                values["y_o_steps_valid"] = valid
                values["y_r_steps_valid"] = targets.refined[r] and self.verifier.steps_valid(problem, targets.texts[r])
            for name, value in values.items():
                record.rows[name].append(float(value))
        for name, values in targets.metrics.items():  # the refiner's own, logged as refine/<name>
            record.rows[f"{REFINER_METRIC}{name}"].extend(values)

    def diagnostics_due(self, step: int) -> bool:
        return bool(self.refiner.rewrites and self.diagnostics_every and step % self.diagnostics_every == 0)

    def log_record(self, record: StepRecord, step: int) -> None:
        """The step's metrics, computed over every rank's record, written once, at this step: on the trainer's
        logging schedule (``log_every_n_steps``), and at every step that ran a scheduled pass (the diagnostics
        along y_o, the stale-weights guard), so that nothing measured is dropped. The same decision on every rank."""
        scheduled = self.diagnostics_due(step) or "logprob_gap" in record.tokens  # both on step-number schedules
        if (step + 1) % self.trainer.log_every_n_steps and not self.trainer.should_stop and not scheduled:
            return
        merged = gather(record)
        metrics = step_metrics(merged, self.disagreement_threshold, "y_r" if self.refiner.rewrites else "y_o")
        if "skipped_empty_steps" in record.totals:  # this rank's count, the same on every rank
            metrics["train/skipped_empty_steps"] = record.totals["skipped_empty_steps"]
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def log_samples(self, step: int, batch: PromptBatch, rollouts: Rollouts, targets: Targets, record: StepRecord,
                    coherence: dict[int, dict[str, float]], count: int = 4) -> None:
        """Every row of the step on this rank, with what was measured of it, appended to ``samples/rank<r>.jsonl``
        in the log dir (to read, recount or grep); the first ``count`` as text in TensorBoard."""
        samples = []
        for r in range(len(rollouts)):
            i = rollouts.prompt_index[r]
            sample = {"step": step, "problem": batch.problem[i], "answer": batch.answer[i], "y_o": rollouts.texts[r],
                      "y_r": targets.texts[r] if targets.refined[r] else None, **coherence.get(r, {})}
            sample.update({name: values[r] for name, values in record.rows.items() if name in SAMPLE_FIELDS})
            samples.append(sample)
        if self.trainer.log_dir is not None:
            path = Path(self.trainer.log_dir) / "samples" / f"rank{self.global_rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(sample) + "\n" for sample in samples)
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("samples", "\n\n---\n\n".join(
                f"**problem** {s['problem']}  \n**answer** {s['answer']}  \n**y_o** `{s['y_o']}`"
                + (f"  \n**y_r** `{s['y_r']}`" if s["y_r"] is not None else "") for s in samples[:count]), step)

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
        self.profile("y_o", student_contexts, scoring, rollouts.token_ids, scored)
        if self.refiner.rewrites:  # every rank runs the same passes (sharded models); padding is left out after
            self.profile("y_r", student_contexts, targets.teacher_contexts, targets.token_ids,
                         [keep and refined for keep, refined in zip(scored, targets.refined)])

    def evaluated_in(self, stage: str) -> tuple[str, ...]:
        return ("student", "teacher") if stage == "test" and self.evaluate_teacher else ("student",)

    def profile(self, trajectory: str, student_contexts: list, teacher_contexts: list, targets: list, keep: list[bool]) -> None:
        """Add the per-token divergence along each kept row to that trajectory's position profile, in micro-batches."""
        costs = [max(len(s), len(t)) + len(y) for s, t, y in zip(student_contexts, teacher_contexts, targets)]
        for rows, run in self.plan(costs, packed=self.packs(STUDENT) and self.packs(TEACHER)):
            views = build_views([student_contexts[r] for r in run], [teacher_contexts[r] for r in run], [targets[r] for r in run],
                                self.tokenizer.pad_token_id, (self.packs(STUDENT), self.packs(TEACHER)))
            if not views.num_target_tokens:
                continue
            out, _ = self.distill(views)
            kept = [k for k, r in enumerate(rows) if keep[r]]
            if kept:
                values = out.per_token.split(views.target_lengths.tolist())
                self.profiles[trajectory].update(torch.cat([values[k] for k in kept]), views.target_lengths[kept])

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
