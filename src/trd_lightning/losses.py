"""Per-token divergences between the student and the teacher, fused with the student's LM head.

One component, three axes:
- direction: ``forward`` KL(teacher || student), ``reverse`` KL(student || teacher), or the
  generalized ``jsd`` with mixture M = beta * teacher + (1 - beta) * student,
  JSD = beta * KL(teacher || M) + (1 - beta) * KL(student || M); as in TRL/GKD, beta = 0 is
  defined as forward KL and beta = 1 as reverse KL;
- support: the ``full`` vocabulary; the teacher's ``topk`` tokens, both distributions
  renormalised on them; or the ``sampled`` token only, with estimator ``k1`` (log p - log q),
  ``k3`` ((r - 1) - log r with r = q/p), or ``pg`` (value k1, gradient -A * grad log p with the
  advantage A = log q - log p under stop-gradient);
- ``clip``: a cap on each position's value (capped positions get no gradient).

p is the student, q the teacher, both at softmax ``temperature``. The student's logits are
computed chunk by chunk from its last hidden states, and each chunk's gradient is taken in the
forward pass, so neither model's [tokens, vocab] logits ever exist whole and nothing is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import math

import torch
from torch import Tensor

Direction = Literal["forward", "reverse", "jsd"]
Support = Literal["full", "topk", "sampled"]
Estimator = Literal["k1", "k3", "pg"]
Reduction = Literal["token", "sequence"]


@dataclass
class DivergenceOutput:
    loss: Tensor  # scalar, differentiable
    per_token: Tensor  # [N], detached: each target position's value (after the clip)
    clipped: Tensor  # [N] bool: positions the clip capped
    student_logprobs: Tensor  # [N]: log p(target token), softmax temperature 1
    teacher_logprobs: Tensor  # [N]: log q(target token), softmax temperature 1
    teacher_lse: Tensor  # [N]: the teacher's log-normaliser, so any token's q is exp(logit - lse)


class Divergence:
    """A per-token divergence, reduced over the batch's target tokens.

    ``chunk_size`` bounds memory: about ``8 * chunk_size * vocab`` fp32 values live at once.
    """

    def __init__(
        self,
        direction: Direction = "reverse",
        support: Support = "full",
        beta: float = 0.5,
        top_k: int = 32,
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
        if clip is not None and not clip > 0:
            raise ValueError(f"divergence clip must be > 0 or null (got {clip})")
        if not temperature > 0:
            raise ValueError(f"divergence temperature must be > 0 (got {temperature})")
        if chunk_size <= 0:
            raise ValueError(f"divergence chunk_size must be > 0 (got {chunk_size})")
        self.direction, self.support, self.beta, self.top_k = direction, support, beta, top_k
        self.estimator, self.clip, self.temperature = estimator, clip, temperature
        self.reduction, self.chunk_size = reduction, chunk_size

    def __repr__(self) -> str:
        return f"Divergence({self.describe()})"

    def describe(self) -> str:
        if self.support == "sampled":
            kind = f"sampled-token {self.estimator}"
        else:
            kind = f"{self.direction}" + (f"(beta={self.beta})" if self.direction == "jsd" else "") + " KL" * (self.direction != "jsd")
            kind += f" over the teacher's top-{self.top_k}" if self.support == "topk" else " over the full vocabulary"
        clip = f", clip {self.clip}" if self.clip is not None else ""
        return f"{kind}{clip}, T={self.temperature}, {self.reduction}-mean"

    def check_vocab(self, vocab_size: int) -> None:
        if self.support == "topk" and self.top_k > vocab_size:
            raise ValueError(f"divergence top_k={self.top_k} is larger than the vocabulary ({vocab_size} tokens)")

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
            return torch.full((int(lengths.sum()),), 1.0 / tokens, device=device)
        sequences = int((lengths > 0).sum()) if sequences is None else sequences
        per_sequence = 1.0 / (lengths.clamp(min=1) * sequences)
        return per_sequence.repeat_interleave(lengths)

    # -- the math, on one chunk of logits ---------------------------------------------------
    def values_and_grads(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row values, their gradients with respect to the (raw, untempered) student logits, and
        [3, C] log p(target), log q(target) and the teacher's log-normaliser at temperature 1.

        ``student_logits`` and ``teacher_logits`` are fp32 [C, V] and are consumed (overwritten).
        """
        observed = token_logprobs(student_logits, teacher_logits, targets)
        t = self.temperature
        if t != 1.0:
            student_logits.div_(t)
            teacher_logits.div_(t)
        if self.support == "sampled":
            values, grads = self._sampled(student_logits, teacher_logits, targets)
        elif self.support == "topk":
            k = min(self.top_k, teacher_logits.shape[-1])
            teacher_top, index = teacher_logits.topk(k, dim=-1)
            values, grads_k = self._dense(student_logits.gather(-1, index), teacher_top)
            grads = torch.zeros_like(student_logits).scatter_(-1, index, grads_k)
        else:
            values, grads = self._dense(student_logits, teacher_logits)
        if t != 1.0:
            grads.div_(t)
        return values, grads, observed

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

    def _sampled(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        s_lse = student_logits.logsumexp(-1)
        s_y = student_logits.gather(-1, targets[:, None]).squeeze(-1) - s_lse
        q_y = teacher_logits.gather(-1, targets[:, None]).squeeze(-1) - teacher_logits.logsumexp(-1)
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
        """``student_hidden`` [N, H] and ``teacher_hidden`` [N, H_t] are the last hidden states at
        the N positions that predict ``targets`` [N]; the heads are the [V, H] output weights. ``weights`` [N]
        (default: ``self.weights(target_lengths)``) is each token's weight in the loss."""
        if student_hidden.shape[0] != teacher_hidden.shape[0] or student_hidden.shape[0] != targets.shape[0]:
            raise ValueError(
                f"student ({student_hidden.shape[0]}), teacher ({teacher_hidden.shape[0]}) and targets "
                f"({targets.shape[0]}) must cover the same positions"
            )
        if student_head.shape[0] != teacher_head.shape[0]:
            raise ValueError(f"student and teacher vocabularies differ: {student_head.shape[0]} vs {teacher_head.shape[0]}")
        weights = self.weights(target_lengths, device=student_hidden.device) if weights is None else weights.to(student_hidden.device)
        loss, per_token, clipped, observed = _FusedHeadDivergence.apply(
            student_hidden, student_head, student_bias, teacher_hidden.detach(), teacher_head.detach(),
            None if teacher_bias is None else teacher_bias.detach(), targets, weights, self,
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


def _logits(hidden: Tensor, head: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden @ head.T
    if bias is not None:
        logits = logits + bias
    return logits.float()


class _FusedHeadDivergence(torch.autograd.Function):
    """loss = sum_i w_i * D_i(softmax(h_i W^T), teacher_i), with the gradients for h, W (and the
    bias) accumulated chunk by chunk during the forward pass and scaled in the backward pass."""

    @staticmethod
    def forward(ctx, h, w, b, h_t, w_t, b_t, targets, weights, divergence: Divergence):
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
                    _logits(h[rows], w, b), _logits(h_t[rows], w_t, b_t), targets[rows]
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
        return grad_h, grad_w, grad_b, None, None, None, None, None, None
