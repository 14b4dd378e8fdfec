"""Per-token divergences between the student and the teacher, fused with the student's LM head.

One component, three axes:
- direction: ``forward`` KL(teacher || student), ``reverse`` KL(student || teacher), or the
  generalized ``jsd`` with mixture M = beta * teacher + (1 - beta) * student,
  JSD = beta * KL(teacher || M) + (1 - beta) * KL(student || M); as in TRL/GKD, beta = 0 is
  defined as forward KL and beta = 1 as reverse KL;
- support: the ``full`` vocabulary; the teacher's ``topk`` tokens, both distributions
  renormalised on them (or, with ``tail``, the top-k tokens plus one bucket holding the rest of
  each distribution's mass, as TRL does); or the ``sampled`` token only, with estimator ``k1``
  (log p - log q), ``k3`` ((r - 1) - log r with r = q/p), or ``pg`` (value k1, gradient
  -A * grad log p with the advantage A = log q - log p under stop-gradient);
- ``clip``: a cap on each position's value (capped positions get no gradient).

p is the student, q the teacher, both at softmax ``temperature``. The student's logits are
computed chunk by chunk from its last hidden states, and each chunk's gradient is taken in the
forward pass, so neither model's [tokens, vocab] logits ever exist whole and nothing is recomputed.

The teacher comes as ``DenseScores`` (its hidden states and head: logits chunk by chunk, like the
student's) or ``SparseScores`` (its top-k and the target's log-probability, from a server). Top-k
support takes the teacher's top-k from either through one code path; the sampled-token estimators
need only log q(target). ``check_teacher`` refuses what sparse scores cannot give (the full
vocabulary; re-tempering a distribution that was sent at temperature 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from trd_lightning.scores import DenseScores, SparseScores, TeacherScores, head_logits

Direction = Literal["forward", "reverse", "jsd"]
Support = Literal["full", "topk", "sampled"]
Estimator = Literal["k1", "k3", "pg"]
Reduction = Literal["token", "sequence"]
TAIL_FLOOR = 1e-30  # the least teacher tail mass: log(0) would make 0 * log 0 a NaN


@dataclass
class DivergenceOutput:
    loss: Tensor  # scalar, differentiable
    per_token: Tensor  # [N], detached: each target position's value (after the clip)
    clipped: Tensor  # [N] bool: positions the clip capped
    student_logprobs: Tensor  # [N]: log p(target token), softmax temperature 1
    teacher_logprobs: Tensor  # [N]: log q(target token), softmax temperature 1
    teacher_lse: Tensor  # [N]: the teacher's log-normaliser, so any token's q is exp(logit - lse); NaN for sparse scores


class Divergence:
    """A per-token divergence, reduced over the batch's target tokens.

    Args:
        direction: ``forward`` KL(teacher || student), ``reverse`` KL(student || teacher), or ``jsd`` (the generalized
            Jensen-Shannon divergence, mixed by ``beta``). Ignored with ``support: sampled``, which has ``estimator``.
        support: the tokens it is computed over: ``full`` (the whole vocabulary), ``topk`` (the teacher's ``top_k``
            tokens, both distributions renormalised on them) or ``sampled`` (the target token only, by ``estimator``).
        beta: the ``jsd`` mixture weight, in [0, 1]: M = beta * teacher + (1 - beta) * student; 0 is forward KL and 1
            reverse KL, as in TRL/GKD. Used only by ``direction: jsd``.
        top_k: how many of the teacher's most likely tokens ``support: topk`` keeps (> 0; at most the vocabulary).
        tail: with ``support: topk``, add one outcome holding each distribution's mass outside the top-k (as TRL
            does) instead of renormalising on the top-k; needs ``support: topk``.
        estimator: the ``support: sampled`` estimate from p(target) and q(target): ``k1`` (log p - log q), ``k3``
            ((r - 1) - log r, r = q/p) or ``pg`` (value k1; gradient -A * grad log p with A = log q - log p).
        clip: cap each position's value at this (> 0); capped positions get no gradient. Null: no cap.
        temperature: the softmax temperature of both student and teacher (> 0; 1: the raw distributions).
        reduction: ``token`` (every target token of the step weighs the same) or ``sequence`` (each sequence's mean,
            averaged over sequences).
        chunk_size: target positions whose logits are computed at once; it bounds memory: about
            ``8 * chunk_size * vocab`` fp32 values live at once.
    """

    def __init__(
        self,
        direction: Direction = "reverse",
        support: Support = "full",
        beta: float = 0.5,
        top_k: int = 32,
        tail: bool = False,
        estimator: Estimator = "k3",
        clip: float | None = None,
        temperature: float = 1.0,
        reduction: Reduction = "token",
        chunk_size: int = 256,
    ):
        if direction not in ("forward", "reverse", "jsd"):
            raise ValueError(f"divergence direction must be forward, reverse or jsd (got {direction!r})")
        if support not in ("full", "topk", "sampled"):
            raise ValueError(f"divergence support must be full, topk or sampled (got {support!r})")
        if estimator not in ("k1", "k3", "pg"):
            raise ValueError(f"divergence estimator must be k1, k3 or pg (got {estimator!r})")
        if reduction not in ("token", "sequence"):
            raise ValueError(f"divergence reduction must be token or sequence (got {reduction!r})")
        if not 0 <= beta <= 1:
            raise ValueError(f"jsd beta must be in [0, 1] (got {beta})")
        if top_k <= 0:
            raise ValueError(f"divergence top_k must be > 0 (got {top_k})")
        if tail and support != "topk":
            raise ValueError(f"divergence tail: true keeps the mass outside the teacher's top-k, so it needs support: topk (got {support!r})")
        if clip is not None and not clip > 0:
            raise ValueError(f"divergence clip must be > 0 or null (got {clip})")
        if not temperature > 0:
            raise ValueError(f"divergence temperature must be > 0 (got {temperature})")
        if chunk_size <= 0:
            raise ValueError(f"divergence chunk_size must be > 0 (got {chunk_size})")
        self.direction, self.support, self.beta, self.top_k, self.tail = direction, support, beta, top_k, tail
        self.estimator, self.clip, self.temperature = estimator, clip, temperature
        self.reduction, self.chunk_size = reduction, chunk_size

    def __repr__(self) -> str:
        return f"Divergence({self.describe()})"

    def describe(self) -> str:
        if self.support == "sampled":
            kind = f"sampled-token {self.estimator}"
        else:
            kind = f"{self.direction}" + (f"(beta={self.beta})" if self.direction == "jsd" else "") + " KL" * (self.direction != "jsd")
            kind += (f" over the teacher's top-{self.top_k}" + " and the tail" * self.tail) if self.support == "topk" else " over the full vocabulary"
        clip = f", clip {self.clip}" if self.clip is not None else ""
        return f"{kind}{clip}, T={self.temperature}, {self.reduction}-mean"

    def check_vocab(self, vocab_size: int) -> None:
        if self.support == "topk" and self.top_k > vocab_size:
            raise ValueError(f"divergence top_k={self.top_k} is larger than the vocabulary ({vocab_size} tokens)")
        if self.tail and self.top_k >= vocab_size:
            raise ValueError(f"divergence tail: true needs top_k below the vocabulary size ({vocab_size}), or there is no tail")

    def check_teacher(self, scores: str, top_k: int | None = None, teacher: str = "this teacher") -> None:
        """Refuse, saying why, a divergence that ``scores`` ("dense" or "sparse", with ``top_k`` per position)
        cannot compute. Dense scores compute every divergence."""
        if scores == "dense":
            return
        if self.support == "full":
            raise ValueError(
                f"divergence support: full needs the teacher's whole distribution at every position, and {teacher} sends only "
                f"its top-{top_k} and the target token's log-probability. Use support: topk (forward or reverse KL over the "
                "teacher's top-k, renormalised; tail: true keeps the rest as one bucket) or support: sampled (k1, k3 or pg, "
                "exact from the target token's log-probability)"
            )
        if self.temperature != 1.0 and (self.support == "sampled" or self.tail):
            what = "the target token's" if self.support == "sampled" else "the tail's"
            raise ValueError(
                f"divergence temperature={self.temperature} re-tempers the teacher's distribution, and {what} probability at "
                f"another temperature needs the whole vocabulary, which {teacher} does not send; use temperature 1.0"
            )
        if self.support == "topk" and (top_k or 0) < self.top_k:
            raise ValueError(f"divergence top_k={self.top_k} needs the teacher's top-{self.top_k}, and {teacher} sends its top-{top_k}; "
                             f"raise the teacher's top_k (within the server's --max-logprobs) or lower the divergence's")

    # -- the reduction ---------------------------------------------------------------------
    def weights(self, target_lengths: Tensor, device=None, tokens: int | None = None, sequences: int | None = None) -> Tensor:
        """Each target token's weight in the loss: 1/N (token-mean) or 1/(S * len) (sequence-mean).

        N and S default to this batch's target tokens and non-empty sequences; a step split into micro-batches
        (and over ranks) passes the whole step's counts, so every token of the step weighs the same.
        """
        lengths = target_lengths.to(device)
        tokens = int(lengths.sum()) if tokens is None else tokens
        if tokens == 0:
            raise ValueError("the batch has no target tokens to train on")
        if self.reduction == "token":
            return torch.full((int(lengths.sum()),), 1.0 / tokens, dtype=torch.float32, device=device)
        sequences = int((lengths > 0).sum()) if sequences is None else sequences
        per_sequence = 1.0 / (lengths.clamp(min=1).to(torch.float32) * sequences)
        return per_sequence.repeat_interleave(lengths)

    # -- the math, on one chunk of logits ---------------------------------------------------
    def values_and_grads(self, student_logits: Tensor, teacher: Tensor | SparseScores, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row values, their gradients with respect to the (raw, untempered) student logits, and
        [3, C] log p(target), log q(target) and the teacher's log-normaliser at temperature 1 (NaN for sparse scores).

        ``teacher`` is fp32 [C, V] logits (dense) or one chunk of sparse scores. ``student_logits`` and dense teacher
        logits are consumed (overwritten).
        """
        dense = isinstance(teacher, Tensor)
        if dense:
            observed = token_logprobs(student_logits, teacher, targets)
        else:
            student_logprob = student_logits.gather(-1, targets[:, None]).squeeze(-1) - student_logits.logsumexp(-1)
            observed = torch.stack([student_logprob, teacher.target_logprob, torch.full_like(student_logprob, math.nan)])
        t = self.temperature
        if t != 1.0:
            student_logits.div_(t)
            if dense:
                teacher.div_(t)
        if self.support == "full":
            values, grads = self._dense(student_logits, teacher)
        elif self.support == "sampled":
            teacher_logprob = teacher.gather(-1, targets[:, None]).squeeze(-1) - teacher.logsumexp(-1) if dense else teacher.target_logprob
            values, grads = self._sampled(student_logits, teacher_logprob, targets)
        else:
            if dense:  # the same top-k a server sends, taken here from the full logits
                top, ids = _log_softmax_(teacher).topk(min(self.top_k, teacher.shape[-1]), dim=-1)
            else:  # sent at temperature 1: on the top-k alone, re-tempering is a division (renormalised below)
                ids, top = teacher.ids[:, : self.top_k], teacher.logprobs[:, : self.top_k] / t
            values, grads = self._top_k(student_logits, ids, top)
        if t != 1.0:
            grads.div_(t)
        return values, grads, observed

    def _top_k(self, student_logits: Tensor, ids: Tensor, teacher_logprobs: Tensor) -> tuple[Tensor, Tensor]:
        """The divergence on the teacher's top-k tokens ``ids`` [C, k], both distributions renormalised on them, or
        (``tail``) on k + 1 outcomes: those tokens and the rest of the vocabulary as one, each model's mass outside
        the top-k in it. Gradients with respect to the full [C, V] student logits."""
        student_top = student_logits.gather(-1, ids)
        if not self.tail:
            values, grads_k = self._dense(student_top, teacher_logprobs)
            return values, torch.zeros_like(student_logits).scatter_(-1, ids, grads_k)
        # The tail outcome's logit is the logsumexp of the student's logits outside the top-k, and the teacher's
        # log-probability is log(1 - its top-k mass), floored so that a top-k holding all the mass stays finite.
        rest = student_logits.scatter_(-1, ids, -math.inf)
        rest_lse = rest.logsumexp(-1, keepdim=True)
        teacher_tail = torch.log((1 - teacher_logprobs.exp().sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR))
        values, grads_b = self._dense(torch.cat([student_top, rest_lse], -1), torch.cat([teacher_logprobs, teacher_tail], -1))
        # Chain rule: a top-k logit is its own outcome's; d rest_lse / d s_j = softmax(rest)_j outside the top-k.
        grads = rest.sub_(rest_lse).exp_().mul_(grads_b[:, -1:])
        return values, grads.scatter_(-1, ids, grads_b[:, :-1])

    def _dense(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        s = _log_softmax_(student_logits)  # log p, in place: no second [C, V] buffer per model
        t = _log_softmax_(teacher_logits)  # log q
        p = s.exp()
        beta = self.beta if self.direction == "jsd" else (1.0 if self.direction == "reverse" else 0.0)
        if beta == 0.0:  # forward KL(q || p): value sum q (log q - log p), gradient p - q
            q = t.exp()
            values = _rowdot(q, t.sub_(s))
            return values, p.sub_(q)
        if beta == 1.0:  # reverse KL(p || q): gradient p * (log p - log q - KL)
            diff = s.sub_(t)
            values = _rowdot(p, diff)
            return values, diff.sub_(values[:, None]).mul_(p)
        # JSD(beta): d/dp = (1 - beta)(log p - log m); through the softmax, g = p * (d - sum p d).
        log_m = torch.logaddexp(t + math.log(beta), s + math.log(1.0 - beta))
        values = beta * _rowdot(t.exp(), t - log_m) + (1 - beta) * _rowdot(p, s - log_m)
        d = s.sub_(log_m).mul_(1 - beta)
        return values, d.sub_(_rowdot(p, d)[:, None]).mul_(p)

    def _sampled(self, student_logits: Tensor, q_y: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``q_y``: the teacher's log-probability of each row's target token."""
        s_lse = student_logits.logsumexp(-1)
        s_y = student_logits.gather(-1, targets[:, None]).squeeze(-1) - s_lse
        # grad of log p(y) with respect to the logits: onehot(y) - p
        score = student_logits.sub_(s_lse[:, None]).exp_().neg_().scatter_add_(-1, targets[:, None], torch.ones_like(s_y[:, None]))
        log_ratio = s_y - q_y  # log p(y) - log q(y)
        if self.estimator == "k1":
            return log_ratio, score
        if self.estimator == "k3":
            r = torch.exp(-log_ratio)
            return (r - 1) + log_ratio, score.mul_((1 - r)[:, None])
        return log_ratio, score.mul_(log_ratio[:, None])  # pg: -A * grad log p, with A = log q - log p

    # -- the fused head + loss ----------------------------------------------------------------
    def __call__(
        self,
        student_hidden: Tensor,
        student_head: Tensor,
        teacher_hidden: Tensor,
        teacher_head: Tensor,
        targets: Tensor,
        target_lengths: Tensor,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> DivergenceOutput:
        """Against a teacher given as hidden states and head (``against`` with ``DenseScores``)."""
        return self.against(DenseScores(teacher_hidden, teacher_head, teacher_bias), student_hidden, student_head, targets,
                            target_lengths, student_bias, weights)

    def against(
        self,
        teacher: TeacherScores,
        student_hidden: Tensor,
        student_head: Tensor,
        targets: Tensor,
        target_lengths: Tensor,
        student_bias: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> DivergenceOutput:
        """``student_hidden`` [N, H] holds the student's last hidden states at the N positions that predict
        ``targets`` [N], and ``teacher`` the teacher's scores at the same positions; ``student_head`` is the [V, H]
        output weight. ``weights`` [N] (default: ``self.weights(target_lengths)``) is each token's weight in the loss."""
        if not student_hidden.shape[0] == len(teacher) == targets.shape[0]:
            raise ValueError(
                f"student ({student_hidden.shape[0]}), teacher ({len(teacher)}) and targets "
                f"({targets.shape[0]}) must cover the same positions"
            )
        if isinstance(teacher, DenseScores):
            if student_head.shape[0] != teacher.weight.shape[0]:
                raise ValueError(f"student and teacher vocabularies differ: {student_head.shape[0]} vs {teacher.weight.shape[0]}")
            teacher = DenseScores(teacher.hidden.detach(), teacher.weight.detach(), None if teacher.bias is None else teacher.bias.detach())
        else:
            self.check_teacher("sparse", teacher.top_k)
            if teacher.ids.numel() and int(teacher.ids.max()) >= student_head.shape[0]:
                raise ValueError(f"the teacher scored token id {int(teacher.ids.max())}, outside the student's vocabulary "
                                 f"({student_head.shape[0]} tokens): they do not share one")
            teacher = teacher.to(student_hidden.device)
        weights = self.weights(target_lengths, device=student_hidden.device) if weights is None else weights.to(student_hidden.device)
        loss, per_token, clipped, observed = _FusedHeadDivergence.apply(
            student_hidden, student_head, student_bias, teacher, targets, weights, self,
        )
        return DivergenceOutput(loss, per_token, clipped, *observed)


def token_logprobs(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """[3, C]: log p(target), log q(target), and the teacher's log-normaliser, at temperature 1."""
    teacher_lse = teacher_logits.logsumexp(-1)
    column = targets[:, None]
    return torch.stack([
        student_logits.gather(-1, column).squeeze(-1) - student_logits.logsumexp(-1),
        teacher_logits.gather(-1, column).squeeze(-1) - teacher_lse,
        teacher_lse,
    ])


def _log_softmax_(logits: Tensor) -> Tensor:
    return logits.sub_(logits.logsumexp(-1, keepdim=True))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b, -1) without a [C, V] product: one batched matrix product."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def _teacher_chunk(teacher: TeacherScores, rows: slice) -> Tensor | SparseScores:
    """The teacher at these rows, as the divergence's math takes it: fp32 logits (dense) or sparse scores."""
    if isinstance(teacher, DenseScores):
        return head_logits(teacher.hidden[rows], teacher.weight, teacher.bias)
    return teacher.select(rows)


class _FusedHeadDivergence(torch.autograd.Function):
    """loss = sum_i w_i * D_i(softmax(h_i W^T), teacher_i), with the gradients for h, W (and the
    bias) accumulated chunk by chunk during the forward pass and scaled in the backward pass."""

    @staticmethod
    def forward(ctx, h, w, b, teacher: TeacherScores, targets, weights, divergence: Divergence):
        n = h.shape[0]
        per_token = torch.empty(n, dtype=torch.float32, device=h.device)
        clipped = torch.zeros(n, dtype=torch.bool, device=h.device)
        observed = torch.empty(3, n, dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if h.requires_grad else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if w.requires_grad else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if b is not None and b.requires_grad else None
        with torch.no_grad():
            for start in range(0, n, divergence.chunk_size):
                rows = slice(start, start + divergence.chunk_size)
                values, grads, observed[:, rows] = divergence.values_and_grads(
                    head_logits(h[rows], w, b), _teacher_chunk(teacher, rows), targets[rows]
                )
                if divergence.clip is not None:
                    over = values > divergence.clip
                    values = values.clamp(max=divergence.clip)
                    grads.mul_((~over)[:, None])
                    clipped[rows] = over
                per_token[rows] = values
                grads.mul_(weights[rows, None])  # now d loss / d logits for these rows
                if grad_h is not None:
                    grad_h[rows] = (grads.to(w.dtype) @ w).to(h.dtype)
                if grad_w is not None:  # accumulate in fp32, in place: no [V, H] temporary per chunk
                    grad_w.addmm_(grads.T, h[rows].float())
                if grad_b is not None:
                    grad_b += grads.sum(0)
                del grads
        loss = (per_token * weights).sum()
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        ctx.mark_non_differentiable(per_token, clipped, observed)
        return loss, per_token, clipped, observed

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token, _grad_clipped, _grad_observed):
        grads = []
        for saved, has, dtype in zip(ctx.saved_tensors, ctx.has, ctx.dtypes):
            # In place: the saved gradients are used once (the graph is not retained).
            grads.append(saved.mul_(grad_loss).to(dtype) if has else None)
        grad_h, grad_w, grad_b = grads
        return grad_h, grad_w, grad_b, None, None, None, None
