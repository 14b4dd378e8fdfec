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
    ``fallback_template`` context (the student's prompt when null; OPSD runs use the privileged one).
    ``only_failed`` refines only the rollouts the verifier marks wrong (an ablation; the paper
    refines every rollout). ``require_valid_steps`` (off by default: the paper keeps every rewrite) also
    rejects a rewrite whose derivation the verifier finds wrong at some step, on tasks whose steps it can
    check (an answer copied into a flawed derivation is then not trained on).
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
            raise ValueError(f"the refiner writes one y_r per rollout: its sampling.n must be 1 (got {self.sampling.n})")
        self.fallback_template = self.optional_template(fallback_template, "refiner fallback_template")
        self.only_failed = only_failed
        self.require_answer = require_answer
        self.require_valid_steps = require_valid_steps

    def default_divergence(self) -> Divergence:
        return Divergence(direction="forward", support="full")

    @property
    def scoring_template(self) -> Template | None:
        return self.fallback_template

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

    def acceptable(self, rewrite: list[int], text: str, truncated: bool, teacher: TeacherAccess, problem: str = "") -> bool:
        if truncated or not any(token not in teacher.stop_ids for token in rewrite):
            return False
        if self.require_valid_steps and teacher.verifier.steps_valid(problem, text) is False:
            return False
        return not self.require_answer or teacher.verifier.extract(text) is not None

    def refine(self, batch: PromptBatch, rollouts: Rollouts, teacher: TeacherAccess) -> Targets:
        rows = list(range(len(rollouts)))
        if self.only_failed:
            answers = [batch.answer[i] for i in rollouts.prompt_index]
            rows = [r for r, correct in zip(rows, teacher.verifier.score_many(rollouts.texts, answers)) if not correct]
        prompts = self.refine_prompts(batch, rollouts, rows, teacher)
        rewrites = teacher.generate(prompts, self.sampling) if rows else None
        if rewrites is not None:
            rewrites = replace(rewrites, prompt_index=[rollouts.prompt_index[r] for r in rows])
        targets = Targets(
            token_ids=list(rollouts.token_ids),
            texts=list(rollouts.texts),
            teacher_contexts=self.scoring_contexts(batch, rollouts.prompt_index, teacher),
            refined=[False] * len(rollouts),
            fallback=[False] * len(rollouts),
            rewrites=rewrites,
        )
        for k, r in enumerate(rows):
            ids, text, cut = rewrites.token_ids[k], rewrites.texts[k], rewrites.truncated[k]
            if self.acceptable(ids, text, cut, teacher, batch.problem[rollouts.prompt_index[r]]):
                targets.token_ids[r], targets.texts[r], targets.teacher_contexts[r] = ids, text, prompts[k]
                targets.refined[r] = True
            else:
                targets.fallback[r] = True
        return targets

    def teacher_solutions(self, batch: PromptBatch, rollouts: Rollouts, targets: Targets, teacher: TeacherAccess, sampling: Sampling) -> Rollouts:
        """The rewrite of every rollout, sampled as in training (``sampling`` sets only the rollouts)."""
        if targets.rewrites is not None and len(targets.rewrites) == len(rollouts):
            return targets.rewrites
        rewrites = teacher.generate(self.refine_prompts(batch, rollouts, list(range(len(rollouts))), teacher), self.sampling)
        return replace(rewrites, prompt_index=list(rollouts.prompt_index))
