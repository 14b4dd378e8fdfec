"""TRD: the teacher rewrites each rollout y_o into a refined trajectory y_r, and the student learns y_r."""

from __future__ import annotations

from dataclasses import replace

from trd_lightning.data.prompts import PromptBatch
from trd_lightning.losses import Divergence
from trd_lightning.refiners.base import Refiner, Targets, TeacherAccess
from trd_lightning.rollout.base import Rollouts, Sampling
from trd_lightning.templates import ATTEMPT, PROBLEM, Template


class TeacherRewrite(Refiner):
    """Trajectory-Refined Distillation.

    The teacher generates y_r from the refine prompt R (``template``: the problem and y_o, plus
    the reference solution when the template has a ``{solution}`` slot, as for OPSD), then scores
    y_r under that same R, while the student sees only its own prompt. Defaults to forward KL over
    the full vocabulary, as the paper does.

    A rewrite that is empty, cut off at ``sampling.max_new_tokens``, or (``require_answer``) has
    no answer the verifier can extract is rejected: that row falls back to y_o, scored in the
    ``fallback_template`` context.

    A rewrite is three steps a subclass can change one at a time: ``propose`` (the teacher's candidates),
    ``accept`` (which may be trained on) and ``select`` (which one, with per-row metrics); ``BestOfNRewrite``
    changes the first and the last.

    Args:
        template: the refine prompt R, the teacher's user message: a built-in name, a file, or text with
            ``{problem}`` and ``{attempt}`` slots (and ``{solution}`` for the reference solution, as for OPSD).
        sampling: how the teacher samples y_r; ``n`` must be 1. Null: temperature 0.6, top_p 0.95, top_k 20,
            max_new_tokens 2048.
        fallback_template: the teacher's context for scoring y_o where a rewrite is rejected or not made (a template
            with ``{problem}``); null: the student's own prompt. OPSD runs use the privileged one.
        only_failed: refine only the rollouts the verifier marks wrong, and train on the others as they are (an
            ablation; the paper refines every rollout).
        require_answer: reject a rewrite with no answer the verifier can extract.
        require_valid_steps: also reject a rewrite whose derivation the verifier finds wrong at some step, on tasks
            whose steps it can check (an answer copied into a flawed derivation is then not trained on); off by
            default: the paper keeps every rewrite.
    """

    rewrites = True

    def __init__(
        self,
        template: str = "math_refine",
        sampling: Sampling | None = None,
        fallback_template: str | None = None,
        only_failed: bool = False,
        require_answer: bool = True,
        require_valid_steps: bool = False,
    ):
        self.template = Template(template, "refine template").require(PROBLEM, ATTEMPT)
        self.sampling = sampling or Sampling(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=2048)
        if self.sampling.n != 1:
            raise ValueError(f"the refiner writes one y_r per rollout: its sampling.n must be 1 (got {self.sampling.n}); "
                             "BestOfNRewrite samples several and keeps one")
        self.fallback_template = self.optional_template(fallback_template, "refiner fallback_template")
        self.only_failed = only_failed
        self.require_answer = require_answer
        self.require_valid_steps = require_valid_steps

    def default_divergence(self) -> Divergence:
        return Divergence(direction="forward", support="full")

    @property
    def scoring_template(self) -> Template | None:
        return self.fallback_template

    def teacher_templates(self) -> list[Template]:
        return [self.template, *super().teacher_templates()]

    def required_fields(self) -> set[str]:
        fields = set(self.template.fields) | set(self.fallback_template.fields if self.fallback_template else ())
        return fields - {PROBLEM, ATTEMPT}

    def refine_prompts(self, batch: PromptBatch, rollouts: Rollouts, rows: list[int], teacher: TeacherAccess) -> list[list[int]]:
        return [
            teacher.prompts.encode(
                self.template,
                teacher.max_context_tokens,
                problem=batch.problem[rollouts.prompt_index[r]],
                solution=batch.solution[rollouts.prompt_index[r]],
                attempt=rollouts.texts[r],
            )
            for r in rows
        ]

    def rows_to_refine(self, batch: PromptBatch, rollouts: Rollouts, teacher: TeacherAccess) -> list[int]:
        """Every rollout, or (``only_failed``) those the verifier marks wrong."""
        rows = list(range(len(rollouts)))
        if not self.only_failed:
            return rows
        answers = [batch.answer[i] for i in rollouts.prompt_index]
        return [r for r, correct in zip(rows, teacher.verifier.score_many(rollouts.texts, answers)) if not correct]

    # -- a rewrite: propose -> accept -> select; a subclass changes one of them ------------------------------------
    def proposal_sampling(self) -> Sampling:
        """How the teacher samples the candidates of one refine prompt: one here."""
        return self.sampling

    def propose(self, prompts: list[list[int]], teacher: TeacherAccess) -> Rollouts:
        """The teacher's candidate rewrites, grouped by prompt (``prompt_index`` k for ``prompts[k]``)."""
        return teacher.generate(prompts, self.proposal_sampling())

    def generation_requests(self, batch: PromptBatch, rollouts: Rollouts, teacher: TeacherAccess) -> list[tuple[int, list[list[int]], Sampling]]:
        rows = self.rows_to_refine(batch, rollouts, teacher)
        return [(r, [prompt], self.proposal_sampling()) for r, prompt in zip(rows, self.refine_prompts(batch, rollouts, rows, teacher))]

    def accept(self, rewrite: list[int], text: str, truncated: bool, teacher: TeacherAccess, problem: str = "") -> bool:
        """Whether a candidate may be trained on: not empty, not cut off, and (as configured) with an answer the
        verifier can read and steps it does not find wrong."""
        if truncated or not any(token not in teacher.stop_ids for token in rewrite):
            return False
        if self.require_valid_steps and teacher.verifier.steps_valid(problem, text) is False:
            return False
        return not self.require_answer or teacher.verifier.extract(text) is not None

    def select(self, prompts: list[list[int]], answers: list[str], candidates: Rollouts, accepted: list[bool],
               teacher: TeacherAccess) -> tuple[list[int | None], dict[str, list[float]]]:
        """For each refine prompt (with its reference answer), the index into ``candidates`` of the rewrite to train
        on, or None to fall back to y_o; and per-row metrics of the choice, logged as ``refine/<name>``. Here: the
        first accepted candidate."""
        choice: list[int | None] = [None] * len(prompts)
        for c, k in enumerate(candidates.prompt_index):
            if accepted[c] and choice[k] is None:
                choice[k] = c
        return choice, {}

    def rewrite(self, batch: PromptBatch, rollouts: Rollouts, rows: list[int], prompts: list[list[int]],
                teacher: TeacherAccess) -> tuple[Rollouts, list[bool], dict[str, list[float]]]:
        """One rewrite per row of ``rows`` (the chosen one, else the first candidate), whether it was accepted, and
        the choice's metrics."""
        candidates = self.propose(prompts, teacher)
        problems = [batch.problem[rollouts.prompt_index[rows[k]]] for k in candidates.prompt_index]
        accepted = [self.accept(ids, text, cut, teacher, problem)
                    for ids, text, cut, problem in zip(candidates.token_ids, candidates.texts, candidates.truncated, problems)]
        answers = [batch.answer[rollouts.prompt_index[r]] for r in rows]
        choice, metrics = self.select(prompts, answers, candidates, accepted, teacher)
        first = {k: c for c, k in reversed(list(enumerate(candidates.prompt_index)))}
        chosen = candidates.select([first[k] if c is None else c for k, c in enumerate(choice)])
        return replace(chosen, prompt_index=[rollouts.prompt_index[r] for r in rows]), [c is not None for c in choice], metrics

    def refine(self, batch: PromptBatch, rollouts: Rollouts, teacher: TeacherAccess) -> Targets:
        rows = self.rows_to_refine(batch, rollouts, teacher)
        prompts = self.refine_prompts(batch, rollouts, rows, teacher)
        rewrites, accepted, metrics = self.rewrite(batch, rollouts, rows, prompts, teacher) if rows else (None, [], {})
        targets = Targets(
            token_ids=list(rollouts.token_ids),
            texts=list(rollouts.texts),
            teacher_contexts=self.scoring_contexts(batch, rollouts.prompt_index, teacher),
            refined=[False] * len(rollouts),
            fallback=[False] * len(rollouts),
            rewrites=rewrites,
            metrics=metrics,
        )
        for k, r in enumerate(rows):
            if accepted[k]:
                targets.token_ids[r], targets.texts[r], targets.teacher_contexts[r] = rewrites.token_ids[k], rewrites.texts[k], prompts[k]
                targets.refined[r] = True
                if rewrites.scores is not None:  # y_r after R is what the teacher decoded: its scores came with it
                    targets.decoded[r] = rewrites.scores[k]
            else:
                targets.fallback[r] = True
        return targets

    def teacher_solutions(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, teacher: TeacherAccess, sampling: Sampling) -> Rollouts:
        """The rewrite of every rollout, chosen as in training (``sampling`` sets only the rollouts)."""
        if targets.rewrites is not None and len(targets.rewrites) == len(rollouts):
            return targets.rewrites
        rows = list(range(len(rollouts)))
        return self.rewrite(batch, rollouts, rows, self.refine_prompts(batch, rollouts, rows, teacher), teacher)[0]
