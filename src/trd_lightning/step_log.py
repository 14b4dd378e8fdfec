"""Writing down what each training step measured: its metrics to the loggers, its rows to the samples file.

``training_step`` returns a ``StepResult``; this callback turns it into numbers, once, at the step that measured
them: on the trainer's logging schedule (``log_every_n_steps``), and at every step that ran a scheduled pass (the
diagnostics, the stale-weights guard), so nothing measured is dropped and nothing is re-logged later as new.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lightning.pytorch import Callback

from trd_lightning.step_metrics import StepResult, gather, step_metrics, verify
from trd_lightning.verifiers import Verifier

# The step's main figures the progress bar shows (from the last logged step), by their names on the bar.
BAR_FIGURES = {"rollout/accuracy": "accuracy", "rollout/steps_valid": "steps_valid", "step/target_tokens_per_second": "tokens/s"}

# What a sample line carries of the step's per-row measurements.
SAMPLE_FIELDS = ("y_o_length", "target_length", "y_o_correct", "y_o_steps_valid", "y_o_truncated", "refined", "fallback", "y_r_correct",
                 "y_r_steps_valid", "edit_similarity", "y_r_logprob_refine", "y_r_logprob_plain")


class StepLog(Callback):
    """Logs each step's metrics over the whole global batch, and writes samples of the step's rows.

    ``DistillationModule`` adds it itself, from its own settings.

    Args:
        verifier: checks each row's y_o and y_r (answers, and steps where it can) for the step's metrics.
        threshold: the teacher probability under which a target token is a disagreement (the module's
            ``disagreement_threshold``).
        samples_every: every this many steps, append each row of the step (problem, y_o, y_r and what was measured of
            them) to ``samples/rank<r>.jsonl`` in the log dir and show a few as text in TensorBoard; 0: never.
        samples_shown: how many of those rows TensorBoard shows.
    """

    def __init__(self, verifier: Verifier, threshold: float, samples_every: int, samples_shown: int = 4):
        self.verifier = verifier
        self.threshold = threshold
        self.samples_every = samples_every
        self.samples_shown = samples_shown

    def on_train_start(self, trainer, pl_module):
        # Resumed at step S: the rows of steps S and later, written by the run that stopped, are written again.
        path = self.samples_path(trainer)
        if trainer.global_step and path is not None and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            path.write_text("".join(line for line in lines if json.loads(line)["step"] < trainer.global_step), encoding="utf-8")

    def samples_path(self, trainer) -> Path | None:
        return None if trainer.log_dir is None else Path(trainer.log_dir) / "samples" / f"rank{trainer.global_rank}.jsonl"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        result: StepResult = outputs["result"]
        # The same decisions on every rank: gathering the record is a collective.
        log = result.scheduled or (result.step + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop
        samples = bool(self.samples_every) and result.step % self.samples_every == 0
        if not (log or samples):
            return
        result.record.rows.update(verify(self.verifier, result.batch, result.rollouts, result.targets))
        if log:
            self.log_metrics(trainer, pl_module, result)
        if samples:
            self.write_samples(trainer, result)

    def log_metrics(self, trainer, pl_module, result: StepResult) -> None:
        metrics = step_metrics(gather(result.record), self.threshold, result.target_name)
        if "skipped_empty_steps" in result.record.totals:  # this rank's count, the same on every rank
            metrics["train/skipped_empty_steps"] = result.record.totals["skipped_empty_steps"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=result.step)
        for name, shown in BAR_FIGURES.items():
            if metrics.get(name) is not None:
                pl_module.log(shown, metrics[name], prog_bar=True, logger=False)

    def write_samples(self, trainer, result: StepResult) -> None:
        batch, rollouts, targets, rows = result.batch, result.rollouts, result.targets, result.record.rows
        samples = []
        for r in range(len(rollouts)):
            i = rollouts.prompt_index[r]
            sample = {"step": result.step, "problem": batch.problem[i], "answer": batch.answer[i], "y_o": rollouts.texts[r],
                      "y_r": targets.texts[r] if targets.refined[r] else None}
            sample.update({name: values[r] for name, values in rows.items() if name in SAMPLE_FIELDS and math.isfinite(values[r])})
            samples.append(sample)
        path = self.samples_path(trainer)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(sample) + "\n" for sample in samples)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("samples", "\n\n---\n\n".join(
                f"**problem** {s['problem']}  \n**answer** {s['answer']}  \n**y_o** `{s['y_o']}`"
                + (f"  \n**y_r** `{s['y_r']}`" if s["y_r"] is not None else "") for s in samples[:self.samples_shown]), result.step)
