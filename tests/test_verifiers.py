"""Verifiers: math answers in their many forms, exact match, the chain task's step check, and CodeVerifier on small
problems in the three schemas (TACO, LiveCodeBench, EvalPlus), read through PromptDataModule's field mappings: a
correct solution passes, and each kind of wrong one fails."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SCHEMAS, SUM_STDIN, fenced, load_schema
from trd_lightning.metrics import SampledAccuracy
from trd_lightning.sandbox import Limits
from trd_lightning.verifiers import AnswerParseError, CodeVerifier, ExactMatch, MathVerifier

MATH_CASES = [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac12", True),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{x+1}", "1+x", True),
    ("\\boxed{(1,2)}", "(1, 2)", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("\\boxed{2^{10}}", "1024", True),
    ("\\boxed{-\\frac{1}{3}}", "-1/3", True),
    ("\\boxed{\\infty}", "\\infty", True),
    ("first \\boxed{3}, then on reflection \\boxed{4}", "4", True),  # the last box counts
    ("\\boxed{5}", "6", False),
    ("the answer is 5", "5", False),  # no box, no answer
    ("\\boxed{\\frac{2}{3}}", "0.67", False),
]


@pytest.mark.parametrize("response, answer, expected", MATH_CASES)
def test_math_verifier_answer_forms(response, answer, expected):
    assert MathVerifier().score(response, answer) is expected


@pytest.mark.parametrize("answer", ["???", "\\frac{", ""])
def test_unparsable_reference_answers_are_refused(answer):
    with pytest.raises(AnswerParseError, match="cannot parse"):
        MathVerifier().check_answer(answer)


def test_exact_match_reads_the_last_answer():
    verifier = ExactMatch()
    assert verifier.score("1+1=2;a:2", "2") and not verifier.score("a:2;a:3", "2") and not verifier.score("no answer", "2")
    with pytest.raises(ValueError, match="capture group"):
        ExactMatch(pattern="a:")


@pytest.mark.parametrize("response, answer_right, steps_right", [
    ("1-6=5;5+5=0;0*9=0;0-3=7;7*0=0;a:0", True, True),        # the worked solution
    (" 1-6=5; 5+5=0;0*9=0;0-3=7;7*0=0;a:0 ", True, True),     # whitespace aside
    ("1-6=5;5+5=0;0-9=0;0-3=7;7-0=0;a:0", True, False),       # answer-patched: wrong operators, copied values
    ("1-6=5;5+5=0;0*9=0;0-3=7;7*0=1;a:1", False, False),      # a wrong result
    ("1-6=5;5+5=0;0*9=0;7*0=0;a:0", True, False),             # a skipped step
    ("5+5=0;1-6=5;0*9=0;0-3=7;7*0=0;a:0", True, False),       # steps reordered
    ("1-6=5;5+5=0;0*9=0;0-3=7;7*0=0", False, False),          # no answer
])
def test_chain_verifier_checks_every_step(response, answer_right, steps_right):
    from trd_lightning.verifiers import ChainVerifier

    verifier = ChainVerifier()
    assert verifier.score(response, "0") == answer_right
    assert verifier.steps_valid("1-6+5*9-3*0", response) == steps_right
    assert verifier.steps_valid("not a chain", response) is None
    assert ExactMatch().steps_valid("1-6+5*9-3*0", response) is None  # answer-only verifiers cannot judge steps


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(limits=Limits(cpu_seconds=2, wall_seconds=2.0, memory_mb=512), workers=2)


@pytest.mark.slow
@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_every_verdict_is_right(schema, verifier, tmp_path, tokenizer):
    rows, items, _ = load_schema(schema, tmp_path, tokenizer)
    responses, answers, expected, labels = [], [], [], []
    for row, item in zip(rows, items):
        verifier.check_answer(item["answer"])
        for label, response in [("correct", row["correct"]), *row["wrong"].items()]:
            responses.append(response)
            answers.append(item["answer"])
            expected.append(label == "correct")
            labels.append(f"{item['source']}: {label}")
    verdicts = verifier.verdicts(responses, answers)  # all at once, through the worker pool
    assert {label: v.passed for label, v in zip(labels, verdicts)} == dict(zip(labels, expected))
    assert verifier.score_many(responses, answers) == expected
    for label, v in zip(labels, verdicts):
        assert v.fraction == (1.0 if label.endswith("correct") else v.fraction) and 0 <= v.fraction <= 1
        if label.endswith("no code block"):
            assert v.fraction == 0.0


@pytest.mark.slow
def test_fraction_counts_the_tests_passed(verifier):
    tests = json.dumps({"inputs": ["1\n", "2\n", "3\n", "4\n"], "outputs": ["1\n", "4\n", "9\n", "4\n"]})
    verdict, = verifier.verdicts([fenced("x = int(input())\nprint(x * x)")], [tests])  # right on 3 of 4 cases
    assert (verdict.passed, verdict.fraction, verdict.tests) == (False, 0.75, 4)


def test_extract_means_has_a_program(verifier):
    assert verifier.extract("no code here") is None
    assert verifier.extract("```python\n\n```") is None
    assert verifier.extract("```\nprint(1)\n```") == "print(1)\n"
    # the last Python block wins over a later block in another language
    assert verifier.extract("```python\nprint(1)\n```\n```python\nprint(2)\n```\n```text\n2\n```") == "print(2)\n"


def test_bad_tests_are_clear_errors(verifier):
    for answer, message in [("", "no tests"), ('{"inputs": ["1"], "outputs": []}', "as many outputs"),
                            ('[{"input": "1", "output": "1", "testtype": "functional"}]', "function name"),
                            ("not json, not compressed", "neither JSON"),
                            ('{"test": "def check(c): pass"}', "entry_point")]:
        with pytest.raises(AnswerParseError, match=message):
            verifier.check_answer(answer)


@pytest.mark.slow
def test_site_packages_is_a_choice():
    answer = json.dumps({"inputs": [""], "outputs": ["1"]})
    response = fenced("import sys\nprint(sys.flags.no_site)")
    assert CodeVerifier(workers=1).score(response, answer)  # standard library only: no `site`
    assert not CodeVerifier(workers=1, site_packages=True).score(response, answer)


@pytest.mark.slow
def test_tests_passed_is_reported_beside_avg_and_pass(verifier):

    tests = json.dumps({"inputs": ["1\n", "2\n", "3\n", "4\n"], "outputs": ["1\n", "4\n", "9\n", "4\n"]})
    verdicts, fractions = verifier.grade_many([fenced("x = int(input())\nprint(x * x)"), "no code"], [tests, tests])
    assert verdicts == [False, False] and fractions == [0.75, 0.0]
    metric = SampledAccuracy(n=2, ks=[1])
    metric.update([0], tests_passed=fractions)
    assert float(metric.compute()["tests_passed"]) == pytest.approx(0.375)
    math_like = SampledAccuracy(n=2, ks=[1])
    math_like.update([1])
    assert "tests_passed" not in math_like.compute()  # only verifiers that run tests report it


@pytest.mark.slow
def test_unicode_programs_and_outputs(verifier):
    answer = json.dumps({"inputs": ["naïve ✓\n"], "outputs": ["NAÏVE ✓ → ok\n"]})
    assert verifier.score(fenced("# élan: upper-case the line\nprint(input().upper(), '→ ok')"), answer)
    assert not verifier.score(fenced("print('\udcff')"), answer)  # a lone surrogate fails the test, nothing crashes


@pytest.mark.slow
def test_a_training_row_without_tests_fails_without_stopping(verifier):
    with pytest.warns(UserWarning, match="cannot be read"):
        verdict, = verifier.verdicts([fenced(SUM_STDIN)], [json.dumps({"inputs": [], "outputs": []})])
    assert (verdict.passed, verdict.fraction, verdict.tests) == (False, 0.0, 0)
