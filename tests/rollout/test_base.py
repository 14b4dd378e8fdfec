"""The rollout interface: sampling options checked, and a completion cut at its first stop token or at max_new_tokens."""

from __future__ import annotations

import pytest

from trd_lightning.rollout import Sampling
from trd_lightning.rollout.base import split_completion


def test_split_completion():
    assert split_completion([5, 6, 2, 9, 9], {2}, 8) == ([5, 6, 2], False)
    assert split_completion([5, 6, 7], {2}, 3) == ([5, 6, 7], True)
    assert split_completion([2], {2}, 3) == ([2], False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be > 0"),
        ({"top_p": 0.0}, "top_p"),
        ({"n": 0}, "n \\(samples per prompt\\)"),
    ],
)
def test_bad_sampling_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_top_k_beyond_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="top_k=1000 is larger than the vocabulary \\(259 tokens\\)"):
        Sampling(top_k=1000).check_vocab(259)
