"""A teacher's scores: token log-probabilities and pivot mass from a head whose distribution is known."""

from __future__ import annotations

import math

import pytest
import torch

from trd_lightning.diagnostics import trajectory_stats
from trd_lightning.scores import pivot_mass, token_stats


def test_pivot_mass_and_token_stats_on_a_constructed_head(tokenizer):
    # A head whose logits make the distribution known: token 5 and 7 are pivots.
    hidden = torch.eye(4)
    head = torch.zeros(10, 4)
    head[5, 0] = math.log(9.0)  # row 0: p(5) = 9 / (9 + 9) = 0.5
    head[7, 1] = math.log(9.0)  # row 1: p(7) = 0.5
    targets = torch.tensor([5, 0, 7, 3])
    logprobs, lse = token_stats(hidden, head, None, targets, chunk_size=3)
    assert torch.allclose(lse, torch.log(torch.tensor([18.0, 18.0, 10.0, 10.0])))
    assert torch.allclose(logprobs.exp(), torch.tensor([0.5, 1 / 18, 0.1, 0.1]))
    mass = pivot_mass(hidden, head, None, lse, [5, 7])
    assert torch.allclose(mass, torch.tensor([0.5 + 1 / 18, 1 / 18 + 0.5, 0.2, 0.2]))
    stats = trajectory_stats(torch.tensor([4]), logprobs, 0.05, pivots=mass)
    assert stats["pivot_permille"] == pytest.approx(1000 * (0.5 + 1 / 18 + 1 / 18 + 0.5 + 0.4) / 4)
