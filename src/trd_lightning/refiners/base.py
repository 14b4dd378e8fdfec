"""The Refiner interface: from the student's rollouts y_o to the training targets and the teacher's contexts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from trd_lightning.data.prompts import PromptBatch
from trd_lightning.losses import Divergence
from trd_lightning.rollout.base import Rollouts, Sampling
from trd_lightning.scores import DecodedScores, SparseScores
from trd_lightning.templates import PROBLEM, Template
from trd_lightning.verifiers import Verifier
from trd_lightning.views import ChatPrompts


@dataclass
class Targets:
    """One training target per rollout row, and the context the teacher scores it in."""

    token_ids: list[list[int]]
    texts: list[str]
    teacher_contexts: list[list[int]]
    refined: list[bool]  # the target is a teacher rewrite y_r
    fallback: list[bool]  # a rewrite was rejected and y_o kept
    rewrites: Rollouts | None = None  # the rewrite of each refined row, accepted or not (TRD)
    metrics: dict[str, list[float]] = field(default_factory=dict)  # the refiner's own per-row values, logged as refine/<name>
    decoded: dict[int, DecodedScores] = field(default_factory=dict)  # rows whose teacher scores came with the rewrite's decode

    @classmethod
    def blank(cls, rows: int) -> Targets:
        """Targets of ``rows`` rows still to come (``place``)."""
        return cls([[]] * rows, [""] * rows, [[]] * rows, [False] * rows, [False] * rows)

    def place(self, first: int, part: Targets) -> range:
        """``part``'s rows as this one's rows ``first``, ``first + 1``, ...; those rows."""
        rows = range(first, first + len(part.token_ids))
        for name in ("token_ids", "texts", "teacher_contexts", "refined", "fallback"):
            getattr(self, name)[first: rows.stop] = getattr(part, name)
        self.decoded.update({first + k: scores for k, scores in part.decoded.items()})
        return rows

    @classmethod
    def join(cls, parts: Sequence[Targets]) -> Targets:
        """``parts`` (each of some rows) one after another: the targets of all their rows."""
        joined, first = cls.blank(sum(len(part.token_ids) for part in parts)), 0
        for part in parts:
            first = joined.place(first, part).stop
            for name, values in part.metrics.items():
                joined.metrics.setdefault(name, []).extend(values)
        rewrites = [part.rewrites for part in parts if part.rewrites is not None]
        joined.rewrites = Rollouts.join(rewrites) if rewrites else None
        return joined

    def decoded_scores(self, row: int) -> SparseScores | None:
        """The teacher's scores of ``row``'s target from the decode that wrote it, if it has them and the target and its
        context are still exactly what was decoded; else None (the row goes to the scoring pass)."""
        decoded = self.decoded.get(row)
        if decoded is None or not decoded.fits(self.teacher_contexts[row], self.token_ids[row]):
            return None
        return decoded.scores


@dataclass
class TeacherAccess:
    """What a refiner may use of the teacher: its prompts, its context limit, generation, scoring, the verifier.

    ``score(contexts, targets)``: the teacher's mean log-probability per token of each target after its context,
    in the trainer's micro-batches (every rank must call it the same number of times, as with ``generate``)."""

    prompts: ChatPrompts
    max_context_tokens: int
    verifier: Verifier
    stop_ids: set[int]
    generate: Callable[[Sequence[Sequence[int]], Sampling], Rollouts]
    score: Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], list[float]]


class Refiner(ABC):
    """Base class. Subclasses set how targets are made (``refine``) and which divergence fits them."""

    #: Whether the teacher writes new targets (so there is a y_r to compare with y_o).
    rewrites: bool = False

    def default_divergence(self) -> Divergence:
        return Divergence(direction="reverse", support="full")

    def required_fields(self) -> set[str]:
        """Data fields (besides the problem) the refiner's templates need, e.g. ``{"solution"}``."""
        return set()

    @property
    def scoring_template(self) -> Template | None:
        """The template of the context in which the teacher scores the student's own rollout y_o
        (None: the student's prompt)."""
        return None

    def teacher_templates(self) -> list[Template]:
        """Every template the teacher's contexts are rendered from (each limited to ``max_context_tokens``), so that a
        problem too long for one is refused when the data is read, not in the middle of a step."""
        return [self.scoring_template] if self.scoring_template is not None else []

    def scoring_contexts(self, batch: PromptBatch, prompt_index: Sequence[int], teacher: TeacherAccess) -> list[list[int]]:
        return self.contexts(self.scoring_template, batch, prompt_index, teacher)

    def generation_requests(self, batch: PromptBatch, rollouts: Rollouts, teacher: TeacherAccess) -> list[tuple[int, list[list[int]], Sampling]]:
        """What ``refine`` of each single row of ``rollouts`` will ask the teacher to generate, as (row, prompts, sampling),
        so that a streaming step can send it ahead, concurrently. None here: these targets need no generation."""
        return []

    @abstractmethod
    def refine(self, batch: PromptBatch, rollouts: Rollouts, teacher: TeacherAccess) -> Targets:
        """The training targets of these rollouts and the contexts the teacher scores them in."""

    @abstractmethod
    def teacher_solutions(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, teacher: TeacherAccess, sampling: Sampling) -> Rollouts:
        """What the teacher itself produces for these problems, for evaluation: its own solution in
        its scoring context, or its rewrites of the rollouts."""

    @staticmethod
    def contexts(template: Template | None, batch: PromptBatch, prompt_index: Sequence[int], teacher: TeacherAccess) -> list[list[int]]:
        """The teacher's context for each row: the student's own prompt when ``template`` is None,
        else ``template`` filled with the problem (and the reference solution)."""
        if template is None:
            return batch.prompts_of(prompt_index)
        rendered = {}
        for i in sorted(set(prompt_index)):
            rendered[i] = teacher.prompts.encode(
                template, teacher.max_context_tokens, problem=batch.problem[i], solution=batch.solution[i]
            )
        return [rendered[i] for i in prompt_index]

    @staticmethod
    def optional_template(spec: str | None, role: str) -> Template | None:
        return None if spec is None else Template(spec, role).require(PROBLEM)
