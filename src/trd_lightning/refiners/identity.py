"""OPD and OPSD: the targets are the student's own rollouts y_o."""

from __future__ import annotations

from trd_lightning.data.prompts import PromptBatch
from trd_lightning.refiners.base import Refiner, Targets, TeacherAccess
from trd_lightning.rollout.base import Rollouts, Sampling
from trd_lightning.templates import PROBLEM, Template


class Identity(Refiner):
    """Train on y_o.

    The teacher scores it in the student's own context (OPD, ``teacher_template: null``) or in a privileged one
    holding the reference solution (OPSD, e.g. ``math_privileged``).

    Args:
        teacher_template: the teacher's user message when it scores y_o: a built-in name, a file, or text with a
            ``{problem}`` slot (and ``{solution}`` for the reference solution); null: the student's own prompt.
    """

    def __init__(self, teacher_template: str | None = None):
        self.teacher_template = self.optional_template(teacher_template, "refiner teacher_template")

    def required_fields(self) -> set[str]:
        return set(self.teacher_template.fields) - {PROBLEM} if self.teacher_template else set()

    @property
    def scoring_template(self) -> Template | None:
        return self.teacher_template

    def refine(self, batch: PromptBatch, rollouts: Rollouts, teacher: TeacherAccess) -> Targets:
        n = len(rollouts)
        return Targets(
            token_ids=rollouts.token_ids,
            texts=rollouts.texts,
            teacher_contexts=self.scoring_contexts(batch, rollouts.prompt_index, teacher),
            refined=[False] * n,
            fallback=[False] * n,
        )

    def teacher_solutions(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, teacher: TeacherAccess, sampling: Sampling) -> Rollouts:
        return teacher.generate(self.scoring_contexts(batch, range(len(batch)), teacher), sampling)
