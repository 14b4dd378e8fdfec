"""Verifiers: does a response state the reference answer (math), or does its program pass the tests (code)?
Used for metrics and by refiners choosing targets (``require_answer``, ``only_failed``, ``require_valid_steps``,
BestOfNRewrite's ``prefer_correct``); never a term of the loss."""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from trd_lightning.sandbox import Limits, Sandbox


class AnswerParseError(ValueError):
    pass


class Verifier(ABC):
    """Base class: ``extract`` pulls the final answer out of a response (None when it has none),
    ``equal`` compares it with the reference answer."""

    #: Whether the training rows' answers are read with ``check_answer`` when the data is (a row it cannot read is
    #: warned about, naming its file and row): for verifiers where such a row silently counts as failed and reading
    #: every answer is cheap. Evaluation answers are always checked.
    check_training_answers: bool = False

    @property
    def named_unreadable(self) -> set[str]:
        """Answers whose rows a warning has named already (``evaluation.warn_unreadable_answers``): not warned of again."""
        return self.__dict__.setdefault("_named_unreadable", set())

    @abstractmethod
    def extract(self, response: str) -> str | None:
        """The final answer stated in ``response``, or None."""

    @abstractmethod
    def equal(self, predicted: str, answer: str) -> bool:
        """Whether the extracted answer matches the reference."""

    def check_answer(self, answer: str) -> None:
        """Raise ``AnswerParseError`` when a dataset's reference answer cannot be compared at all."""

    def score(self, response: str, answer: str) -> bool:
        predicted = self.extract(response)
        return predicted is not None and self.equal(predicted, answer)

    def score_many(self, responses: list[str], answers: list[str]) -> list[bool]:
        """``score`` of each pair; verifiers with slow checks run them concurrently."""
        return [self.score(r, a) for r, a in zip(responses, answers)]

    def grade_many(self, responses: list[str], answers: list[str]) -> tuple[list[bool], list[float] | None]:
        """Verdicts and, for verifiers that run tests, the fraction of each row's tests passed (else None)."""
        return self.score_many(responses, answers), None

    def steps_valid(self, problem: str, response: str) -> bool | None:
        """Whether every step of the response's derivation is right, for tasks whose steps can be checked
        (None: this verifier cannot judge steps). A right answer reached by wrong steps is not valid."""
        return None


class ExactMatch(Verifier):
    """The last match of ``pattern``'s first group, compared with the answer as stripped strings.

    Args:
        pattern: a regular expression whose first capture group is the answer; the response's last match counts.
            The default reads the demo task's ``a:<answer>``.
    """

    def __init__(self, pattern: str = r"a:\s*(\S+)"):
        self.pattern = re.compile(pattern)
        if self.pattern.groups < 1:
            raise ValueError(f"ExactMatch pattern {pattern!r} needs a capture group around the answer")

    def extract(self, response: str) -> str | None:
        matches = self.pattern.findall(response)
        if not matches:
            return None
        last = matches[-1]
        return (last[0] if isinstance(last, tuple) else last).strip()

    def equal(self, predicted: str, answer: str) -> bool:
        return predicted.strip() == str(answer).strip()

    def check_answer(self, answer: str) -> None:
        if not str(answer).strip():
            raise AnswerParseError("an empty reference answer can never be matched")


class ChainVerifier(ExactMatch):
    """The demo's chain task: the answer as ``ExactMatch`` reads it, and every step checked.

    Each step starts from the previous value (the start digit first), applies the problem's next operator and
    operand, and states the right result mod 10; the answer is the last value, after exactly as many steps as
    operations.

    Args:
        pattern: as in ``ExactMatch``: a regular expression whose first capture group is the answer (default:
            ``a:<answer>``). The steps are checked on the whole response, whatever the pattern.
    """

    def steps_valid(self, problem: str, response: str) -> bool | None:
        from trd_lightning.data.chain import parse_problem, render_steps

        try:
            chain = parse_problem(problem.strip())
        except ValueError:
            return None  # not a chain problem: nothing to judge the steps against
        # The one valid derivation is the worked solution, step for step (whitespace aside).
        return "".join(response.split()) == render_steps(chain.start, chain.ops, chain.values())


@functools.lru_cache(maxsize=65536)
def _parse_gold(text: str):
    """Reference answers repeat across samples and steps: parse each once."""
    return MathVerifier._parse(text if "$" in text or "\\boxed" in text else f"${text}$", anchored=False)


class MathVerifier(Verifier):
    """The last ``\\boxed{...}`` of a response, compared with the reference by ``math-verify``.

    Equivalent fractions, decimals, LaTeX and symbolic forms count as equal.

    Args:
        float_rounding: the decimal places to which math-verify rounds floats before comparing them.
    """

    def __init__(self, float_rounding: int = 6):
        self.float_rounding = float_rounding

    @staticmethod
    def _parse(text: str, anchored: bool):
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

        configs = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=not anchored)]
        if not anchored:
            configs.append(ExprExtractionConfig())
        return parse(text, extraction_config=configs)

    def extract(self, response: str) -> str | None:
        index = response.rfind("\\boxed")
        if index < 0:
            return None
        parsed = self._parse(response[index:], anchored=True)
        return parsed[-1] if parsed else None

    def _gold(self, answer: str):
        return _parse_gold(str(answer))

    def equal(self, predicted: str, answer: str) -> bool:
        from math_verify import verify

        return bool(verify(self._gold(answer), self._parse(f"\\boxed{{{predicted}}}", anchored=True), float_rounding=self.float_rounding))

    def score(self, response: str, answer: str) -> bool:
        from math_verify import verify

        index = response.rfind("\\boxed")
        if index < 0:
            return False
        return bool(verify(self._gold(answer), self._parse(response[index:], anchored=True), float_rounding=self.float_rounding))

    def check_answer(self, answer: str) -> None:
        # A parse that yields only strings fell back to raw text: nothing math-verify can compare.
        if not any(not isinstance(value, str) for value in self._gold(answer)):
            raise AnswerParseError(f"math-verify cannot parse the reference answer {answer!r}")


@dataclass
class CodeVerdict:
    """A program's result on a row's tests: ``passed`` when every test passed; ``fraction`` is diagnostic."""

    passed: bool
    fraction: float
    tests: int


class CodeVerifier(Verifier):
    """Runs the program of a response (its last fenced code block) against the row's tests.

    Each test is its own sandbox run (``trd_lightning.sandbox``); a response passes when every test passes. The
    row's ``answer`` holds the tests (``trd_lightning.code_tests`` lists the forms read: TACO, LiveCodeBench,
    EvalPlus).

    Args:
        isolation: ``auto`` (the strongest that works here), ``bwrap``, ``unshare`` or ``rlimits``; logged once.
        limits: per-run limits (CPU, wall clock, memory, file size, processes, output).
        workers: sandbox runs at once (default: the cores this process may use).
        python: the interpreter that runs programs (default: the trainer's base interpreter, not its venv).
        site_packages: let programs import the interpreter's site-packages (numpy, ...); off, they have the
            standard library only and each run starts without ``site`` (several times faster).
        float_tolerance: numbers in outputs are equal within this relative or absolute difference.
    """

    check_training_answers = True  # a training row without usable tests (TACO has some) counts as failed: named at setup

    def __init__(self, isolation: str = "auto", limits: Limits | None = None, workers: int | None = None,
                 python: str | None = None, site_packages: bool = False, float_tolerance: float = 1e-6):
        self.sandbox = Sandbox(isolation, limits, workers, python)
        self.site_packages = site_packages
        self.float_tolerance = float_tolerance

    def extract(self, response: str) -> str | None:
        from trd_lightning.code_tests import extract_program

        return extract_program(response)

    def equal(self, predicted: str, answer: str) -> bool:
        return self.verdicts([f"```python\n{predicted}\n```"], [answer])[0].passed

    def check_answer(self, answer: str) -> None:
        from trd_lightning.code_tests import BadTestsError, parse_tests

        try:
            parse_tests(str(answer))
        except BadTestsError as error:
            raise AnswerParseError(str(error)) from None

    def score(self, response: str, answer: str) -> bool:
        return self.verdicts([response], [answer])[0].passed

    def score_many(self, responses: list[str], answers: list[str]) -> list[bool]:
        return [v.passed for v in self.verdicts(responses, answers)]

    def grade_many(self, responses: list[str], answers: list[str]) -> tuple[list[bool], list[float] | None]:
        verdicts = self.verdicts(responses, answers)
        return [v.passed for v in verdicts], [v.fraction for v in verdicts]

    def verdicts(self, responses: list[str], answers: list[str]) -> list[CodeVerdict]:
        """Every test of every response, through the sandbox's worker pool at once."""
        from trd_lightning.code_tests import BadTestsError, jobs, parse_tests, passed

        runs, owners, counts = [], [], []
        for r, (response, answer) in enumerate(zip(responses, answers)):
            try:
                tests = parse_tests(str(answer))
            except BadTestsError as error:
                # Evaluation sets are checked before any compute; a training row without usable tests (TACO has
                # some) must not stop training over a diagnostic: it counts as failed, and is reported once (by file
                # and row when the data was read: ``evaluation.warn_unreadable_answers``).
                if str(answer) not in self.named_unreadable:
                    _warn_once(f"a row's tests cannot be read ({error}); responses to such rows count as failed")
                counts.append(0)
                continue
            counts.append(len(tests))
            program = self.extract(response)
            if program is None:
                continue
            for job in jobs(program, tests, self.site_packages):
                runs.append(job)
                owners.append(r)
        good = [0] * len(responses)
        for job, result, r in zip(runs, self.sandbox.run_many(runs), owners):
            good[r] += passed(job, result, self.float_tolerance)
        return [CodeVerdict(n > 0 and g == n, g / n if n else 0.0, n) for g, n in zip(good, counts)]


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(message)
