"""What one optimizer step measured: a record each rank fills in, gathered over ranks, and the metrics
computed from it once, over the whole global batch.

A metric is computed only from what the step recorded, so a step that did not measure something (no
diagnostics pass, no rewrite, no failed rollout) logs no value for it, rather than an older one.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from rapidfuzz.distance import Levenshtein
from torch import Tensor

from trd_lightning.diagnostics import trajectory_stats
from trd_lightning.distributed import gather_objects

if TYPE_CHECKING:
    from trd_lightning.data.prompts import PromptBatch
    from trd_lightning.refiners import Targets
    from trd_lightning.rollout import Rollouts
    from trd_lightning.verifiers import Verifier

REFINER_METRIC = "refiner:"  # the prefix of a refiner's own per-row values in a record's rows


@dataclass
class StepRecord:
    """One rank's measurements of one step.

    ``rows``: per rollout (booleans and counts, by name); ``tokens``: per-token tensors by name, whose
    sequences' lengths sit in ``rows`` under the name given in ``TRAJECTORIES``; ``totals``: summed over
    ranks; ``seconds``: stage timings, the slowest rank's.
    """

    rows: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    tokens: dict[str, list[Tensor]] = field(default_factory=lambda: defaultdict(list))
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add_tokens(self, **values: Tensor) -> None:
        for name, value in values.items():
            self.tokens[name].append(value.detach().float().cpu())

    def token_values(self, name: str) -> Tensor | None:
        return torch.cat(self.tokens[name]) if self.tokens.get(name) else None

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Adds the enclosed block's wall time to ``seconds[stage]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    @staticmethod
    def merge(records: list[StepRecord]) -> StepRecord:
        """One record of the whole step: rows and tokens concatenated in rank order, totals summed, the
        slowest rank's timings."""
        merged = StepRecord()
        for record in records:
            for name, values in record.rows.items():
                merged.rows[name].extend(values)
            for name, values in record.tokens.items():
                merged.tokens[name].extend(values)
            for name, value in record.totals.items():
                merged.totals[name] += value
            for name, value in record.seconds.items():
                merged.seconds[name] = max(merged.seconds[name], value)
        return merged


@dataclass
class StepResult:
    """What one optimizer step produced, as ``training_step`` hands it to the logging: the step's prompts, rollouts
    and targets on this rank, and its record. ``target_name``: ``y_r`` when the refiner rewrites, else ``y_o``.
    ``scheduled``: the step ran a pass on a step-number schedule (the diagnostics, the stale-weights guard), so its
    measurements are logged even between logging steps."""

    step: int
    batch: PromptBatch
    rollouts: Rollouts
    targets: Targets
    record: StepRecord
    target_name: str
    scheduled: bool = False


def gather(record: StepRecord) -> StepRecord:
    """The whole step's record, on every rank (a collective under DDP/FSDP; this record as it is in one process)."""
    plain = StepRecord(dict(record.rows), dict(record.tokens), dict(record.totals), dict(record.seconds))
    records = gather_objects(plain)
    return record if len(records) == 1 else StepRecord.merge(records)


def verify(verifier: Verifier, batch: PromptBatch, rollouts: Rollouts, targets: Targets) -> dict[str, list[float]]:
    """Per rollout: its length, cut-off and correctness; where its target is a rewrite, the rewrite's; where the
    verifier checks steps, whether every step is right. Each set of responses is verified in one call (a code
    verifier runs their tests concurrently)."""
    answers = [batch.answer[i] for i in rollouts.prompt_index]
    refined = [r for r in range(len(rollouts)) if targets.refined[r]]
    y_o_correct, y_o_tests = verifier.grade_many(rollouts.texts, answers)
    y_r_correct = dict(zip(refined, verifier.score_many([targets.texts[r] for r in refined], [answers[r] for r in refined])))
    rows: dict[str, list[float]] = defaultdict(list)
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
        if (valid := verifier.steps_valid(problem, rollouts.texts[r])) is not None:  # tasks whose steps can be checked
            values["y_o_steps_valid"] = valid
            values["y_r_steps_valid"] = targets.refined[r] and verifier.steps_valid(problem, targets.texts[r])
        for name, value in values.items():
            rows[name].append(float(value))
    for name, values in targets.metrics.items():  # the refiner's own, logged as refine/<name>
        rows[f"{REFINER_METRIC}{name}"].extend(values)
    return rows


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def step_metrics(record: StepRecord, threshold: float, target_name: str) -> dict[str, float]:
    """The metrics of a (gathered) step record. ``target_name`` is ``y_r`` when the refiner rewrites, else ``y_o``."""
    rows, totals, out = record.rows, record.totals, {}
    # rollouts
    out["rollout/length"] = mean(rows["y_o_length"])
    out["rollout/truncated"] = mean(rows["y_o_truncated"])
    out["rollout/accuracy"] = mean(rows["y_o_correct"])
    out["rollout/tests_passed"] = mean(rows.get("y_o_tests_passed", []))  # verifiers that run tests (code)
    out["rollout/steps_valid"] = mean(rows.get("y_o_steps_valid", []))  # verifiers that check each step
    gaps = record.token_values("logprob_gap")
    if gaps is not None and len(gaps):
        out["rollout/logprob_gap_mean"], out["rollout/logprob_gap_max"] = float(gaps.mean()), float(gaps.max())
    # refinement (only over the rows whose target is a rewrite)
    refined = [r for r, flag in enumerate(rows["refined"]) if flag]
    out["refine/refined_fraction"] = mean(rows["refined"])
    out["refine/fallbacks"] = float(sum(rows["fallback"])) if rows["fallback"] else None
    if refined:
        pick = lambda name: [rows[name][r] for r in refined]  # noqa: E731
        y_o, y_r = pick("y_o_correct"), pick("y_r_correct")
        out["refine/accuracy_y_o"], out["refine/accuracy_y_r"] = mean(y_o), mean(y_r)
        out["refine/fail_to_pass"] = mean([after for before, after in zip(y_o, y_r) if not before])
        out["refine/pass_to_fail"] = mean([1.0 - after for before, after in zip(y_o, y_r) if before])
        out["refine/length_y_o"], out["refine/length_y_r"] = mean(pick("y_o_length")), mean(pick("target_length"))
        out["refine/edit_similarity"] = mean(pick("edit_similarity"))
        if rows.get("y_r_steps_valid"):  # a right answer reached by wrong steps is "answer-patched"
            valid = pick("y_r_steps_valid")
            out["refine/steps_valid_y_r"] = mean(valid)
            out["refine/answer_patched"] = mean([float(right and not ok) for right, ok in zip(y_r, valid)])
    for name, values in rows.items():  # a refiner's own per-row values (BestOfNRewrite's choice, ...)
        if name.startswith(REFINER_METRIC) and values:
            out[f"refine/{name[len(REFINER_METRIC):]}"] = mean(values)
    # the diagnostics pass, on its schedule: each rewrite's likelihood with and without the privileged context
    scored = [r for r, value in enumerate(rows.get("y_r_logprob_refine", [])) if math.isfinite(value) and rows["refined"][r]]
    if scored:
        refine, plain = [rows["y_r_logprob_refine"][r] for r in scored], [rows["y_r_logprob_plain"][r] for r in scored]
        gaps = [p - r for p, r in zip(plain, refine)]
        out["refine/y_r_logprob_refine_prompt"], out["refine/y_r_logprob_plain_prompt"] = mean(refine), mean(plain)
        out["refine/coherence_gap"] = mean(gaps)
        if rows.get("y_r_steps_valid"):  # split by what the rewrite really is: right at every step, or answer-patched
            valid = [bool(rows["y_r_steps_valid"][r]) for r in scored]
            patched = [bool(rows["y_r_correct"][r]) and not ok for r, ok in zip(scored, valid)]
            for name, flags in (("steps_valid", valid), ("answer_patched", patched)):
                if any(flags):
                    out[f"refine/coherence_gap_{name}"] = mean([gap for gap, flag in zip(gaps, flags) if flag])
    # the loss and its per-token values
    if totals.get("target_tokens"):
        out["train/loss"] = totals["loss"]
        out["train/target_tokens"] = totals["target_tokens"]
        values = record.token_values("divergence")
        p50, p95, p99 = torch.quantile(values, torch.tensor([0.5, 0.95, 0.99], dtype=values.dtype)).tolist()
        out.update({"train/divergence_p50": p50, "train/divergence_p95": p95, "train/divergence_p99": p99,
                    "train/divergence_max": float(values.max()), "train/clip_fraction": float(record.token_values("clipped").mean())})
        stats = trajectory_stats(torch.tensor(rows["micro_batch_target_length"], dtype=torch.long), record.token_values("teacher_logprob"),
                                 threshold, record.token_values("student_logprob"), values, record.token_values("pivot_mass"))
        out.update({f"diag/{name}_{target_name}": value for name, value in stats.items()})
    if rows.get("diag_y_o_length"):  # the extra teacher pass along y_o, on its schedule
        stats = trajectory_stats(torch.tensor(rows["diag_y_o_length"], dtype=torch.long), record.token_values("diag_y_o_teacher_logprob"),
                                 threshold, pivots=record.token_values("diag_y_o_pivot_mass"))
        out.update({f"diag/{name}_y_o": value for name, value in stats.items()})
    # the step's shape and speed
    if totals.get("micro_batches"):
        out["step/micro_batches"] = totals["micro_batches"] / totals["ranks"]  # the same on every rank
        out["step/real_token_ratio"] = totals["real_tokens"] / totals["processed_tokens"]
        # the teacher's scoring pass (context + target tokens, all ranks), and the targets scored by their own decode instead
        out["step/teacher_pass_tokens"], out["step/decode_scored_tokens"] = totals["teacher_pass_tokens"], totals["decode_scored_tokens"]
    for stage, seconds in record.seconds.items():
        out[f"time/{stage}"] = seconds
    if "stream_requests" in totals:  # a streaming step: what went to the teacher ahead, and how much training it hid
        out["stream/requests"], out["stream/max_in_flight"] = totals["stream_requests"], totals["stream_max_in_flight"]
        if record.seconds.get("stream_overlap") is not None and record.seconds.get("refine"):
            out["stream/overlap_fraction"] = record.seconds["stream_overlap"] / record.seconds["refine"]
    if totals.get("target_tokens") and record.seconds.get("step"):
        out["step/target_tokens_per_second"] = totals["target_tokens"] / record.seconds["step"]
    return {name: float(value) for name, value in out.items() if value is not None}
