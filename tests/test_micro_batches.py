"""The micro-batch planner: every sequence once, within the token budget, longest first into the least-loaded micro-batch,
length-sorted runs when padded, and the same count on every rank."""

from __future__ import annotations

import pytest
import torch

from trd_lightning.micro_batches import balanced_groups, first_fit_count, plan_in_lockstep, plan_micro_batches, sorted_runs


@pytest.mark.parametrize("seed", range(20))
def test_every_sequence_lands_once_and_micro_batches_respect_the_budget(seed):
    generator = torch.Generator().manual_seed(seed)
    costs = torch.randint(1, 300, (int(torch.randint(1, 40, (1,), generator=generator)),), generator=generator).tolist()
    budget = 256
    groups = plan_micro_batches(costs, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(costs)))
    for group in groups:
        assert group, "one process alone never gets an empty micro-batch"
        load = sum(costs[i] for i in group)
        assert load <= budget or len(group) == 1, (group, load)  # only a lone sequence may exceed the budget
    assert len(groups) == first_fit_count(costs, budget)  # as few micro-batches as first-fit decreasing needs here


def test_longest_first_into_the_least_loaded_micro_batch():
    # 4 micro-batches for 8 sequences: each pair is a long and a short one, evenly filled.
    assert balanced_groups([10, 90, 20, 80, 30, 70, 40, 60], budget=100, count=4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan_micro_batches([500, 10, 10], budget=100) == [[0], [1, 2]]  # over the budget: alone
    assert plan_micro_batches([5, 6, 7], budget=None) == [[0, 1, 2]]


@pytest.mark.parametrize("seed", range(10))
def test_padded_micro_batches_are_length_sorted_runs_within_the_budget(seed):
    generator = torch.Generator().manual_seed(seed)
    costs = torch.randint(1, 300, (30,), generator=generator).tolist()
    groups = plan_micro_batches(costs, 600, padded=True)
    assert sorted(i for g in groups for i in g) == list(range(len(costs)))
    for group in groups:
        assert len(group) * max(costs[i] for i in group) <= 600 or len(group) == 1  # rows x longest: what padding computes
    # Sorted runs: no sequence of one micro-batch lies strictly between the lengths of another's.
    spans = sorted((min(costs[i] for i in g), max(costs[i] for i in g)) for g in groups)
    assert all(low_b >= high_a for (_, high_a), (low_b, _) in zip(spans, spans[1:]))
    assert sorted_runs([300, 100, 290, 110], 600) == [[0, 2], [1, 3]]


def test_every_rank_runs_the_same_number_of_micro_batches():
    long_rank, short_rank = [900, 800, 700, 600, 500, 400], [20, 30, 10]
    plans = plan_in_lockstep([long_rank, short_rank], budget=1000)
    assert len(plans[0]) == len(plans[1]) == first_fit_count(long_rank, 1000) == 5  # 900 | 800 | 700 | 600+400 | 500
    assert sorted(i for g in plans[1] for i in g) == [0, 1, 2]
    assert sum(1 for g in plans[1] if not g) == 2  # 3 sequences, 5 micro-batches: two filler passes
    assert sorted(i for g in plans[0] for i in g) == list(range(6))


def test_auto_budget_splits_a_step_into_about_four_length_sorted_micro_batches():
    from trd_lightning.micro_batches import auto_budget, plan_micro_batches

    costs = [10, 400, 35, 120, 64, 64, 300, 12, 90, 250, 18, 40]
    assert auto_budget(costs) == 400  # a quarter of 1,403 is 351, below the longest sequence
    groups = plan_micro_batches(costs, "auto", padded=True)
    assert sorted(i for g in groups for i in g) == list(range(len(costs))) and 3 <= len(groups) <= 6
    padded = sum(len(g) * max(costs[i] for i in g) for g in groups)
    assert padded < len(costs) * max(costs)  # far less padding than one micro-batch of the whole step
    assert auto_budget([5000, 3]) == 5000  # never below the longest sequence
