"""The demo's chain task: worked solutions, flawed attempts wrong from their first error, distinct sampled problems."""

from __future__ import annotations

import pytest

from trd_lightning.data.chain import CORRUPTIONS, ChainProblem, extract_answer, first_error_step, flawed_attempt, parse_problem, sample_problems


def test_chain_task_solution_and_verifier():
    problem = parse_problem("7+3*2-5+8*4")
    assert problem.solution == "7+3=0;0*2=0;0-5=5;5+8=3;3*4=2;a:2" and problem.answer == "2"
    assert first_error_step(problem, problem.solution) is None
    assert first_error_step(problem, "7+3=0;0*2=1;1-5=6;6+8=4;4*4=6;a:6") == 1
    assert first_error_step(problem, "7+3=0;0*2=0;a:0") == 2
    assert extract_answer("7+3=0;a:2") == "2" and extract_answer("no answer") is None


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_flawed_attempts_are_wrong_from_their_first_error(kind):
    import random

    rng = random.Random(0)
    firsts = []
    for problem in sample_problems(200, 5, seed=1):
        attempt, first = flawed_attempt(problem, rng, (kind,))
        assert first is not None and first_error_step(problem, attempt) == first
        assert (extract_answer(attempt) is not None) or kind == "truncate"
        firsts.append(first)
    assert sum(f < 2 for f in firsts) > len(firsts) / 2  # most slips come early, as a weak student's do


def test_sampled_problems_are_distinct_and_respect_exclusions():
    first = sample_problems(50, 5, seed=0)
    second = sample_problems(50, 5, seed=0, exclude={p.text for p in first})
    assert len({p.text for p in first + second}) == 100
    assert isinstance(first[0], ChainProblem)
