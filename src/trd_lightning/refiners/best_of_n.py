"""TRD with a choice: the teacher writes N rewrites of each rollout and the student learns the one it finds most likely."""

from __future__ import annotations

from dataclasses import replace

from trd_lightning.refiners.base import TeacherAccess
from trd_lightning.refiners.rewrite import TeacherRewrite
from trd_lightning.rollout.base import Rollouts, Sampling


class BestOfNRewrite(TeacherRewrite):
    """``TeacherRewrite`` with a choice: ``n`` rewrites per rollout, of which it keeps the one the teacher scores highest.

    It keeps, among the rewrites it accepts, the one the teacher itself scores highest under the refine prompt
    (mean log-probability per token). The verifier has no part in the choice unless ``prefer_correct`` is set:
    then a candidate it marks right beats any it marks wrong.

    Logs, per refined rollout: ``refine/best_of_n_accepted`` (the share of its n candidates accepted),
    ``refine/best_of_n_score_spread`` (best minus worst accepted score, nats per token; rows with two or more
    accepted) and ``refine/best_of_n_not_first`` (whether the choice is not the first accepted candidate, i.e.
    what ``TeacherRewrite`` would have kept).

    Args:
        template: the refine prompt R, as in ``TeacherRewrite``; the candidates are scored under it too.
        sampling: how the teacher samples each candidate, as in ``TeacherRewrite`` (``n`` must stay 1: ``n`` below
            sets how many).
        fallback_template: the teacher's context for scoring y_o where no candidate is accepted or none is made, as in
            ``TeacherRewrite`` (null: the student's own prompt).
        only_failed: refine only the rollouts the verifier marks wrong, as in ``TeacherRewrite``.
        require_answer: reject a candidate with no answer the verifier can extract, as in ``TeacherRewrite``.
        require_valid_steps: reject a candidate whose steps the verifier finds wrong, as in ``TeacherRewrite``.
        n: rewrites sampled per rollout (>= 1; the refiner's ``sampling.n`` stays 1, this sets how many).
        prefer_correct: let the verifier's verdict on the answer rank candidates before the teacher's score.
    """

    def __init__(
        self,
        template: str = "math_refine",
        sampling: Sampling | None = None,
        fallback_template: str | None = None,
        only_failed: bool = False,
        require_answer: bool = True,
        require_valid_steps: bool = False,
        n: int = 4,
        prefer_correct: bool = False,
    ):
        super().__init__(template, sampling, fallback_template, only_failed, require_answer, require_valid_steps)
        if n < 1:
            raise ValueError(f"BestOfNRewrite needs n >= 1 rewrites per rollout (got {n})")
        self.n, self.prefer_correct = n, prefer_correct

    def proposal_sampling(self) -> Sampling:
        return replace(self.sampling, n=self.n)

    def select(self, prompts: list[list[int]], answers: list[str], candidates: Rollouts, accepted: list[bool],
               teacher: TeacherAccess) -> tuple[list[int | None], dict[str, list[float]]]:
        scores = teacher.score([prompts[k] for k in candidates.prompt_index], candidates.token_ids)
        right = [False] * len(candidates)
        if self.prefer_correct:
            right = teacher.verifier.score_many(candidates.texts, [answers[k] for k in candidates.prompt_index])
        choice: list[int | None] = [None] * len(prompts)
        metrics: dict[str, list[float]] = {"best_of_n_accepted": [], "best_of_n_score_spread": [], "best_of_n_not_first": []}
        for k in range(len(prompts)):
            mine = [c for c, owner in enumerate(candidates.prompt_index) if owner == k]
            kept = [c for c in mine if accepted[c]]
            metrics["best_of_n_accepted"].append(len(kept) / len(mine))
            if not kept:
                continue
            choice[k] = max(kept, key=lambda c: (right[c], scores[c]))
            metrics["best_of_n_not_first"].append(float(choice[k] != kept[0]))
            if len(kept) > 1:
                metrics["best_of_n_score_spread"].append(max(scores[c] for c in kept) - min(scores[c] for c in kept))
        return choice, metrics
