"""Scoring passes without autograd: against a plain forward of each (context, target) pair on its own."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_module

# Uneven pairs, so a small budget cuts them into several micro-batches (padded: the tiny models use sdpa attention).
CONTEXTS = [[5, 9, 17, 3], [40, 41], [7] * 9, [100, 101, 102]]
TARGETS = [[60, 61, 62], [70], [80, 81, 82, 83, 84, 85], []]


def plain_logprobs(model, context: list[int], target: list[int]) -> torch.Tensor:
    """log p(target_t | context, target_<t) from one unpadded forward of this pair alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + target])).logits[0].float()
    return logits[len(context) - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(target)[:, None]).squeeze(-1)


@pytest.mark.parametrize("budget", [None, 12])
def test_teacher_mean_logprobs_match_a_plain_forward(budget, student_dir, teacher_dir):
    module = make_module(student_dir, teacher_dir, max_tokens_per_micro_batch=budget)
    means = module.scorer.teacher_mean_logprobs(CONTEXTS, TARGETS)
    for context, target, mean in zip(CONTEXTS, TARGETS, means):
        if target:
            assert mean == pytest.approx(float(plain_logprobs(module.teacher_model, context, target).mean()), abs=1e-5)
        else:
            assert mean == float("-inf")


@pytest.mark.parametrize("budget", [None, 12])
def test_student_logprobs_match_a_plain_forward_in_row_order(budget, student_dir, teacher_dir):
    module = make_module(student_dir, teacher_dir, max_tokens_per_micro_batch=budget)
    module.student.train()
    found = module.scorer.student_logprobs(CONTEXTS, TARGETS)
    assert module.student.training  # scored in eval mode (no dropout), then put back as it was
    expected = torch.cat([plain_logprobs(module.student.eval(), c, t) for c, t in zip(CONTEXTS, TARGETS) if t])
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)


def test_a_small_budget_does_cut_these_pairs_into_several_micro_batches(student_dir, teacher_dir):
    module = make_module(student_dir, teacher_dir, max_tokens_per_micro_batch=12)
    plan = list(module.batcher.plan([len(c) + len(t) for c, t in zip(CONTEXTS, TARGETS)], packed=False))
    assert len(plan) > 1 and sorted(r for rows, _ in plan for r in rows) == [0, 1, 2, 3]
