"""Evaluation: n verified samples per problem, Avg@n and Pass@k per dataset, and, at the end of ``trd test``, a
results table printed and written to the log dir (``EvaluationMixin``, shared by the modules). For distillation,
also what the teacher produces under the refiner, and the divergence by relative position along y_o and the
targets (``DistillationEvaluation``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only

from trd_lightning.data.prompts import DataError, PromptBatch
from trd_lightning.diagnostics import PositionProfile
from trd_lightning.metrics import SampledAccuracy
from trd_lightning.rollout.base import STUDENT, Rollouts
from trd_lightning.teachers.local import TEACHER
from trd_lightning.views import build_views

STAGES = ("val", "test")


class EvaluationMixin:
    """For LightningModules with ``engine``, ``eval_sampling``, ``verifier`` and ``pass_k``.

    ``setup_metrics`` makes one metric per (stage, dataset, who) before any evaluation runs:
    metric states first created inside validation would be inference tensors.
    """

    evaluated: tuple[str, ...] = ()  # who produces completions: "student", "teacher", "model"

    def setup_metrics(self) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        self.eval_datasets = {
            stage: (datamodule.dataset_names(stage) if datamodule is not None and hasattr(datamodule, "dataset_names") else []) or [stage]
            for stage in STAGES
        }
        keys = [self.metric_key(stage, name, who) for stage in STAGES for name in self.eval_datasets[stage] for who in self.evaluated]
        if set(keys) != set(getattr(self, "metrics", {}) or {}):
            self.metrics = torch.nn.ModuleDict({key: SampledAccuracy(self.eval_sampling.n, self.pass_k) for key in keys})

    @staticmethod
    def metric_key(stage: str, dataset: str, who: str) -> str:
        return f"{stage}__{dataset}__{who}"

    def dataset_name(self, stage: str, dataloader_idx: int) -> str:
        return self.eval_datasets[stage][dataloader_idx]

    def metric_prefix(self, stage: str, dataset: str, who: str) -> str:
        """``val/student`` for a single dataset, ``val/<dataset>/student`` for several."""
        return f"{stage}/{who}" if len(self.eval_datasets[stage]) == 1 else f"{stage}/{dataset}/{who}"

    def correct_per_problem(self, batch: PromptBatch, rollouts: Rollouts) -> tuple[list[int], dict[str, list[float] | None]]:
        """How many of each real (not padding) problem's completions are right, verified as one batch; and, per real
        completion, what else the verifier can judge: the fraction of tests passed (code), whether every step is
        right (tasks whose steps can be checked)."""
        counts = [0] * len(batch)
        verdicts, fractions = self.verifier.grade_many(rollouts.texts, [batch.answer[i] for i in rollouts.prompt_index])
        for i, correct in zip(rollouts.prompt_index, verdicts):
            counts[i] += int(correct)
        padding = batch.padding or [False] * len(batch)
        real = [r for r, i in enumerate(rollouts.prompt_index) if not padding[i]]
        steps = [self.verifier.steps_valid(batch.problem[rollouts.prompt_index[r]], rollouts.texts[r]) for r in real]
        per_sample = {"tests_passed": None if fractions is None else [fractions[r] for r in real],
                      "steps_valid": None if None in steps else [float(v) for v in steps]}
        return [c for c, pad in zip(counts, padding) if not pad], per_sample

    def score(self, stage: str, dataloader_idx: int, who: str, batch: PromptBatch, rollouts: Rollouts) -> None:
        key = self.metric_key(stage, self.dataset_name(stage, dataloader_idx), who)
        counts, per_sample = self.correct_per_problem(batch, rollouts)
        self.metrics[key].update(counts, **per_sample)

    def evaluated_in(self, stage: str) -> tuple[str, ...]:
        """Who produces completions in this stage; the same on every rank, since computing a metric is a collective."""
        return self.evaluated

    def compute_metrics(self, stage: str) -> list[dict]:
        """Rows of (dataset, who, metrics...) for this stage; logs and resets them."""
        rows, logged = [], {}
        for dataset in self.eval_datasets[stage]:
            for who in self.evaluated_in(stage):
                metric = self.metrics[self.metric_key(stage, dataset, who)]
                values = {name: float(value) for name, value in metric.compute().items()}
                problems = int(values.pop("problems"))  # the count over every process, not this rank's
                named = {f"{self.metric_prefix(stage, dataset, who)}/{name}": value for name, value in values.items()}
                for name, value in named.items():
                    self.log(name, value, logger=False)  # for callbacks and the progress bar
                logged.update(named)
                rows.append({"dataset": dataset, "who": who, "problems": problems, **values})
                metric.reset()
        # Logged at the optimizer step the weights are at, as the pre-fit validation is (0): Lightning's own step for
        # a validation inside fit is one less (its batch counter has not yet risen), which put the validation after
        # step 1 at step 0, next to the one before training.
        for logger in [] if self.trainer.sanity_checking else self.loggers:
            logger.log_metrics(logged, step=self.global_step)
        return rows

    def on_validation_epoch_end(self):
        self.compute_metrics("val")

    def on_test_epoch_end(self):
        self.write_results(self.log_dir(), self.compute_metrics("test"))

    def log_dir(self) -> Path:
        """The run's log directory. Call it on every rank: under DDP, Lightning broadcasts it."""
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    @rank_zero_only
    def write_results(self, directory: Path, rows: list[dict], extra: dict | None = None) -> None:
        """``results.json`` and ``results.csv`` in the log dir, and a table on the console."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "results.json").write_text(json.dumps({"results": rows, **(extra or {})}, indent=2))
        if rows:
            with open(directory / "results.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        print_table(rows, f"results ({directory / 'results.json'})")


class DistillationEvaluation(EvaluationMixin):
    """Validation and test of ``DistillationModule``: the student's accuracy, and in ``test`` what the teacher produces
    under the refiner (``evaluate_teacher``) and the per-token divergence by relative position along y_o (the teacher
    in its scoring context) and along the targets, written to ``results.json`` and plotted."""

    TRAJECTORIES = ("y_o", "y_r")

    def make_profiles(self) -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({name: PositionProfile() for name in self.TRAJECTORIES})

    def sync_student(self) -> None:
        if self.engine.holds_weights:
            self.engine.sync_weights(STUDENT, self.student)

    def on_validation_epoch_start(self):
        self.sync_student()

    def on_test_epoch_start(self):
        self.sync_student()
        for profile in self.profiles.values():
            profile.reset()

    def evaluated_in(self, stage: str) -> tuple[str, ...]:
        return ("student", "teacher") if stage == "test" and self.evaluate_teacher else ("student",)

    def validation_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0):
        rollouts = self.engine.generate(STUDENT, self.student, batch.prompt_ids, self.eval_sampling)
        self.score("val", dataloader_idx, "student", batch, rollouts)

    def test_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0):
        rollouts = self.engine.generate(STUDENT, self.student, batch.prompt_ids, self.eval_sampling)
        self.score("test", dataloader_idx, "student", batch, rollouts)
        targets = self.refiner.refine(batch, rollouts, self.teacher_access)
        if self.evaluate_teacher:
            solutions = self.refiner.teacher_solutions(batch, rollouts, targets, self.teacher_access, self.eval_sampling)
            self.score("test", dataloader_idx, "teacher", batch, solutions)
        student_contexts = batch.prompts_of(rollouts.prompt_index)
        scoring = self.refiner.scoring_contexts(batch, rollouts.prompt_index, self.teacher_access)
        scored = [not (batch.padding and batch.padding[i]) for i in rollouts.prompt_index]
        self.profile("y_o", student_contexts, scoring, rollouts.token_ids, scored)
        if self.refiner.rewrites:  # every rank runs the same passes (sharded models); padding is left out after
            self.profile("y_r", student_contexts, targets.teacher_contexts, targets.token_ids,
                         [keep and refined for keep, refined in zip(scored, targets.refined)])

    def profile(self, trajectory: str, student_contexts: list, teacher_contexts: list, targets: list, keep: list[bool]) -> None:
        """Add the per-token divergence along each kept row to that trajectory's position profile, in micro-batches."""
        packed = (self.packs(STUDENT), self.packs(TEACHER))
        costs = [max(len(s), len(t)) + len(y) for s, t, y in zip(student_contexts, teacher_contexts, targets)]
        for rows, run in self.batcher.plan(costs, packed=all(packed)):
            views = build_views([student_contexts[r] for r in run], [teacher_contexts[r] for r in run], [targets[r] for r in run],
                                self.tokenizer.pad_token_id, packed)
            if not views.num_target_tokens:
                continue
            out, _ = self.distill(views)
            kept = [k for k, r in enumerate(rows) if keep[r]]
            if kept:
                values = out.per_token.split(views.target_lengths.tolist())
                self.profiles[trajectory].update(torch.cat([values[k] for k in kept]), views.target_lengths[kept])

    def on_test_epoch_end(self):
        rows = self.compute_metrics("test")
        trajectories = self.TRAJECTORIES if self.refiner.rewrites else ("y_o",)  # the same on every rank
        profiles = {name: self.profiles[name].compute().tolist() for name in trajectories}
        directory = self.log_dir()
        self.write_results(directory, rows, {"divergence_by_relative_position": profiles, "divergence": self.divergence.describe()})
        self.plot_profiles(directory, profiles)

    @rank_zero_only
    def plot_profiles(self, directory: Path, profiles: dict[str, list[float]]) -> None:
        figure = plot_position_profiles(profiles, self.divergence.describe())
        figure.savefig(directory / "divergence_by_position.png", dpi=120)
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure("test/divergence_by_position", figure, self.global_step)


def answer_setting(datamodule, split: str, name: str) -> str:
    """The column(s) a dataset's reference answer is read from, as the data module's ``answer_field`` names them."""
    fields = datamodule.dataset_fields(split, name) if hasattr(datamodule, "dataset_fields") else {}
    column = fields.get("answer", "answer")
    if isinstance(column, dict):
        columns = [c for value in column.values() for c in (value if isinstance(value, list) else [value])]
        return "the answer (from " + ", ".join(f"`{c}`" for c in columns) + ")"
    return f"the answer field `{column}`"


def unreadable_answers(verifier, datamodule, split: str, name: str) -> list[tuple[dict, str]]:
    """Each item of one dataset whose reference answer the verifier cannot read, with why."""
    from trd_lightning.verifiers import AnswerParseError

    bad = []
    for item in datamodule.prepare(split, name):
        try:
            verifier.check_answer(item["answer"])
        except AnswerParseError as error:
            bad.append((item, str(error)))
    return bad


def check_answers(verifier, datamodule, splits: list[str]) -> None:
    """Fail before any compute when the verifier cannot read a reference answer of an evaluation set: a ``DataError``
    naming the file and row."""
    for split in splits:
        for name in datamodule.dataset_names(split):
            for item, error in unreadable_answers(verifier, datamodule, split, name)[:1]:
                raise DataError(
                    f"{item.get('source', split)}: {error} (in {answer_setting(datamodule, split, name)}); fix the row or drop "
                    f"it, or choose a verifier that reads it (model.verifier; {type(verifier).__name__} is set)"
                )


def warn_unreadable_answers(verifier, datamodule, splits: list[str], shown: int = 5) -> int:
    """For verifiers that read training answers (``Verifier.check_training_answers``): warn once per dataset, naming
    the file and row of each training row whose answer the verifier cannot read (its responses count as failed, and
    the verifier does not warn of it again). Returns how many rows were named."""
    from lightning.pytorch.utilities import rank_zero_warn

    if not verifier.check_training_answers:
        return 0
    named = 0
    for split in splits:
        for name in datamodule.dataset_names(split):
            bad = unreadable_answers(verifier, datamodule, split, name)
            if bad:
                verifier.named_unreadable.update(str(item["answer"]) for item, _ in bad)
                rows = "; ".join(f"{item.get('source', split)}: {error}" for item, error in bad[:shown])
                more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
                it = "them" if len(bad) > 1 else "it"
                rank_zero_warn(f"{len(bad)} {split} row(s): {answer_setting(datamodule, split, name)} cannot be read by "
                               f"{type(verifier).__name__} ({rows}{more}); responses to {it} count as failed; fix or drop {it}")
                named += len(bad)
    return named


def plot_position_profiles(profiles: dict[str, list[float]], title: str):
    """A line per trajectory (y_o, y_r): the mean per-token divergence in each tenth of the sequence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6))
    for name, values in profiles.items():
        centers = [(i + 0.5) / len(values) for i in range(len(values))]
        axis.plot(centers, values, marker="o", label=name)
    axis.set_xlabel("relative position in the trajectory")
    axis.set_ylabel("mean per-token divergence")
    axis.set_title(title, fontsize=9)
    axis.legend()
    figure.tight_layout()
    return figure


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = list(rows[0]) if rows else ["dataset", "who"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("dataset", "who") else "right")
    for row in rows:
        table.add_row(*(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    Console().print(table)
