"""The divergence library against dense formulas written out here, independently, with autograd for the gradients."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from trd_lightning.losses import Divergence
from trd_lightning.scores import SparseScores

N, H, HT, V = 13, 8, 6, 37
LENGTHS = torch.tensor([5, 0, 8])  # a sequence with no target tokens must not change anything


def inputs(dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4).to(dtype).requires_grad_()
    h_t = torch.randn(N, HT, generator=g, dtype=torch.float64).to(dtype)
    w_t = (torch.randn(V, HT, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    return h, w, h_t, w_t, b, targets


def kl(log_a, log_b):
    """KL(a || b) per row, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def dense_reference(cfg: dict, h, w, h_t, w_t, b, targets, lengths):
    """Every variant, the plain way: full logits of both models, log_softmax, the formula, the mean."""
    temp = cfg.get("temperature", 1.0)
    zs = h.double() @ w.double().T + (0 if b is None else b.double())
    zt = h_t.double() @ w_t.double().T
    zs, zt = zs / temp, zt / temp
    support = cfg.get("support", "full")
    if support == "sampled":
        ls_y = zs.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        lt_y = zt.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        estimator = cfg.get("estimator", "k3")
        if estimator == "k1":
            values = ls_y - lt_y
        elif estimator == "k3":
            ratio = torch.exp(lt_y - ls_y)
            values = ratio - 1 - torch.log(ratio)
        else:  # pg: the value is k1, the gradient is -A * grad log p with A = log q - log p frozen
            advantage = (lt_y - ls_y).detach()
            values = (ls_y - lt_y).detach() - advantage * (ls_y - ls_y.detach())
    else:
        if support == "topk" and cfg.get("tail"):  # k + 1 outcomes: the teacher's top-k tokens, and all the rest as one
            index = zt.topk(cfg["top_k"], dim=-1).indices
            ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
            rest = torch.ones_like(zs, dtype=torch.bool).scatter(-1, index, False)
            ls = torch.cat([ls.gather(-1, index), ls.masked_fill(~rest, -math.inf).logsumexp(-1, keepdim=True)], -1)
            lt = torch.cat([lt.gather(-1, index), lt.masked_fill(~rest, -math.inf).logsumexp(-1, keepdim=True)], -1)
        elif support == "topk":
            index = zt.topk(cfg["top_k"], dim=-1).indices
            ls, lt = zs.gather(-1, index).log_softmax(-1), zt.gather(-1, index).log_softmax(-1)
        else:
            ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
        direction, beta = cfg.get("direction", "reverse"), cfg.get("beta", 0.5)
        if direction == "forward" or (direction == "jsd" and beta == 0):
            values = kl(lt, ls)
        elif direction == "reverse" or (direction == "jsd" and beta == 1):
            values = kl(ls, lt)
        else:
            lm = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
            values = beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
    if cfg.get("clip") is not None:
        values = values.clamp(max=cfg["clip"])
    if cfg.get("reduction", "token") == "token":
        return values.mean(), values
    per_sequence = [chunk.mean() for chunk in values.split(lengths.tolist()) if chunk.numel()]
    return torch.stack(per_sequence).mean(), values


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


CONFIGS = [
    dict(direction=d, support=s, **extra)
    for d, s, extra in itertools.product(
        ["forward", "reverse", "jsd"],
        ["full", "topk"],
        [{}, {"clip": 0.05}, {"temperature": 1.7}, {"reduction": "sequence"}],
    )
] + [
    dict(support="sampled", estimator=e, **extra)
    for e, extra in itertools.product(["k1", "k3", "pg"], [{}, {"clip": 0.1}, {"temperature": 0.8}, {"reduction": "sequence"}])
] + [dict(direction="jsd", beta=0.1), dict(direction="jsd", beta=0.9, clip=0.02)] + [
    dict(direction=d, support="topk", tail=True, **extra)
    for d, extra in itertools.product(["forward", "reverse", "jsd"], [{}, {"temperature": 1.7}, {"clip": 0.05}])
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_dense_formula(cfg, bias):
    cfg = {"top_k": 5, **cfg}
    h, w, h_t, w_t, b, targets = inputs(bias=bias)
    divergence = Divergence(**cfg, chunk_size=4)  # chunks that do not divide N
    out = divergence(h, w, h_t, w_t, targets, LENGTHS, student_bias=b)
    expected, expected_values = dense_reference(cfg, h, w, h_t, w_t, b, targets, LENGTHS)
    torch.testing.assert_close(out.loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.per_token.double(), expected_values.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(out.loss, [h, w, b]), grads(expected, [h, w, b])):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)


def test_clip_marks_positions_and_blocks_their_gradient():
    h, w, h_t, w_t, _, targets = inputs()
    values = Divergence(direction="forward")(h, w, h_t, w_t, targets, LENGTHS).per_token
    cap = float(values.median())
    out = Divergence(direction="forward", clip=cap)(h, w, h_t, w_t, targets, LENGTHS)
    assert torch.equal(out.clipped, values > cap) and 0 < out.clipped.sum() < N
    (grad_h,) = torch.autograd.grad(out.loss, [h])
    assert torch.all(grad_h[out.clipped] == 0) and torch.all(grad_h[~out.clipped].abs().sum(-1) > 0)


@pytest.mark.parametrize("beta, direction", [(0.0, "forward"), (1.0, "reverse")])
def test_jsd_endpoints_are_the_kls(beta, direction):
    h, w, h_t, w_t, _, targets = inputs(seed=3)
    jsd = Divergence(direction="jsd", beta=beta)(h, w, h_t, w_t, targets, LENGTHS)
    kl_out = Divergence(direction=direction)(h, w, h_t, w_t, targets, LENGTHS)
    torch.testing.assert_close(jsd.per_token, kl_out.per_token, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_topk_with_k_equal_vocab_is_the_full_vocabulary(direction):
    h, w, h_t, w_t, _, targets = inputs(seed=4)
    full = Divergence(direction=direction)(h, w, h_t, w_t, targets, LENGTHS)
    top = Divergence(direction=direction, support="topk", top_k=V)(h, w, h_t, w_t, targets, LENGTHS)
    torch.testing.assert_close(full.per_token, top.per_token, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(full.loss, [h, w]), grads(top.loss, [h, w])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clip_at_infinity_is_no_clip():
    h, w, h_t, w_t, _, targets = inputs(seed=5)
    plain = Divergence(direction="forward")(h, w, h_t, w_t, targets, LENGTHS)
    capped = Divergence(direction="forward", clip=math.inf)(h, w, h_t, w_t, targets, LENGTHS)
    assert torch.equal(plain.per_token, capped.per_token) and not capped.clipped.any()
    for a, b in zip(grads(plain.loss, [h, w]), grads(capped.loss, [h, w])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_bf16_inputs_stay_within_1e2(direction):
    h, w, h_t, w_t, _, targets = inputs(seed=6)
    expected, _ = dense_reference({"direction": direction}, h, w, h_t, w_t, None, targets, LENGTHS)
    want = grads(expected, [h, w])
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    out = Divergence(direction=direction, chunk_size=5)(hb, wb, h_t.bfloat16(), w_t.bfloat16(), targets, LENGTHS)
    assert out.loss.dtype == torch.float32
    assert abs(float(out.loss) - float(expected)) < 1e-2
    for got, ref in zip(grads(out.loss, [hb, wb]), want):
        assert got.dtype == torch.bfloat16
        assert float((got.double() - ref).abs().max()) < 1e-2


def test_padding_and_context_tokens_reach_the_loss_only_through_attention(student_dir):
    """Two right-padded rows through a real model: whatever ids the padding holds, the loss is the same, and the
    gradient reaches every context and target position's input (through attention) but no padding position."""
    from trd_lightning.models import ModelSpec, last_hidden_at, load_model, output_head
    from trd_lightning.views import build_views

    model = load_model(ModelSpec(path=str(student_dir)))
    contexts, targets = [[5, 6, 7, 8, 9], [10, 11]], [[12, 13, 14], [15, 16, 17, 18]]
    views = build_views(contexts, [[4, *c] for c in contexts], targets, 0)  # the teacher reads one more token: a nonzero loss
    weight, _ = output_head(model)
    divergence = Divergence(direction="forward")
    seen = {}
    def keep(module, args, out):  # the student pass's embedded inputs, to read their gradient
        if out.requires_grad:
            out.retain_grad()
            seen["embedded"] = out

    model.get_input_embeddings().register_forward_hook(keep)

    def loss(student_ids):
        with torch.no_grad():
            teacher = last_hidden_at(model, views.teacher)
        student = last_hidden_at(model, replace(views.student, input_ids=student_ids))
        out = divergence(student, weight, teacher, weight.detach(), views.target_ids, views.target_lengths)
        out.loss.backward()
        return out.loss.detach(), seen["embedded"].grad.abs().sum(-1)

    padding = views.student.attention_mask == 0
    assert padding.any() and views.student.target_mask.sum() == 7
    base, reached = loss(views.student.input_ids)
    poked = views.student.input_ids.clone()
    poked[padding] = 250
    assert torch.equal(loss(poked)[0], base)
    assert torch.all(reached[padding] == 0)
    # every read position but the last target token (whose prediction is past the end) is reached
    last = views.student.target_mask & ~torch.roll(views.student.target_mask, -1, dims=1)
    assert torch.all(reached[~padding & ~last] > 0)


def test_no_target_tokens_is_an_error_not_a_zero_loss():
    h, w, h_t, w_t, _, targets = inputs()
    with pytest.raises(ValueError, match="no target tokens"):
        Divergence()(h[:0], w, h_t[:0], w_t, targets[:0], torch.tensor([0, 0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"direction": "sideways"}, "direction"),
        ({"support": "some"}, "support"),
        ({"beta": 1.5}, "beta"),
        ({"clip": 0.0}, "clip"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"estimator": "k2"}, "estimator"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Divergence(**kwargs)


SPARSE_CONFIGS = [c for c in CONFIGS if c.get("support") in ("topk", "sampled")
                  and (c.get("temperature", 1.0) == 1.0 or (c.get("support") == "topk" and not c.get("tail")))]


@pytest.mark.parametrize("cfg", SPARSE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sparse_scores_from_full_logits_equal_the_dense_path(cfg):
    """What a server teacher sends (its top-k, here 8 of them, and the target's log-probability), computed from a local
    teacher's full logits, gives the dense path's values and gradients for every divergence sparse scores support."""
    cfg = {"top_k": 5, **cfg}
    h, w, h_t, w_t, b, targets = inputs(bias=True, seed=7)
    divergence = Divergence(**cfg, chunk_size=4)
    dense = divergence(h, w, h_t, w_t, targets, LENGTHS, student_bias=b)
    sparse = divergence.against(SparseScores.from_logits(h_t @ w_t.T, targets, top_k=8), h, w, targets, LENGTHS, b)
    torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse.per_token, dense.per_token, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse.teacher_logprobs, dense.teacher_logprobs, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads(sparse.loss, [h, w, b]), grads(dense.loss, [h, w, b])):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, top_k, match",
    [
        ({"support": "full"}, 8, "support: full needs the teacher's whole distribution"),
        ({"support": "sampled", "temperature": 0.8}, 8, "temperature"),
        ({"support": "topk", "tail": True, "temperature": 0.8}, 8, "temperature"),
        ({"support": "topk", "top_k": 16}, 8, "top_k=16 needs the teacher's top-16"),
    ],
)
def test_what_sparse_scores_cannot_compute_is_refused_with_the_reason(kwargs, top_k, match):
    divergence = Divergence(**kwargs)
    divergence.check_teacher("dense")  # a local teacher computes anything
    with pytest.raises(ValueError, match=match):
        divergence.check_teacher("sparse", top_k, "the server teacher")


def test_tail_needs_topk_and_a_tail():
    with pytest.raises(ValueError, match="needs support: topk"):
        Divergence(support="full", tail=True)
    with pytest.raises(ValueError, match="no tail"):
        Divergence(support="topk", top_k=V, tail=True).check_vocab(V)
