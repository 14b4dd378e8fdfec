"""Prefix-failure diagnostics with known values: the first disagreement and the loss after it, pivot words, and the
profile by relative position."""

from __future__ import annotations

import math

import pytest
import torch

from trd_lightning.diagnostics import PositionProfile, first_disagreement, pivot_token_ids, trajectory_stats


def test_first_disagreement_and_loss_share_on_known_values():
    # Two sequences: the teacher gives token 2 of the first p=0.01, and the second nothing under 0.05.
    probs = torch.tensor([0.9, 0.8, 0.01, 0.9, 0.5, 0.7, 0.6])
    lengths = torch.tensor([4, 3])
    loss = torch.tensor([1.0, 1.0, 4.0, 2.0, 1.0, 1.0, 1.0])
    assert first_disagreement(probs.log(), lengths, 0.05).tolist() == [2, -1]
    stats = trajectory_stats(lengths, probs.log(), 0.05, student_logprobs=torch.full((7,), math.log(0.5)), per_token_loss=loss)
    assert stats["disagreement_rate"] == pytest.approx(0.5)
    assert stats["first_disagreement"] == pytest.approx(2 / 4)
    assert stats["loss_after_disagreement"] == pytest.approx((4 + 2) / (1 + 1 + 4 + 2))
    assert stats["teacher_ppl"] == pytest.approx(math.exp(-probs.log().mean().item()))
    assert stats["student_ppl"] == pytest.approx(2.0)


def test_pivot_words_map_to_single_tokens_only(tokenizer):
    with pytest.warns(UserWarning, match="no single-token spelling"):
        assert pivot_token_ids(tokenizer, ["Wait"]) == []  # the demo's byte tokenizer spells it in 4 tokens
    assert pivot_token_ids(tokenizer, ["W"]) == [tokenizer.convert_tokens_to_ids("W")]


def test_position_profile_bins_by_relative_position():
    profile = PositionProfile(bins=2)
    profile.update(torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0, 40.0]), torch.tensor([2, 4]))
    # first half: 1 (of seq 1), 10, 20 (of seq 2); second half: 3, 30, 40
    assert profile.compute().tolist() == pytest.approx([(1 + 10 + 20) / 3, (3 + 30 + 40) / 3])
