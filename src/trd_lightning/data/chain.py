"""The embedded demo task: chained single-digit arithmetic, mod 10, solved left to right.

A problem is a start digit and a chain of operations, e.g. ``7+3*2-5+8*4``.
Its worked solution goes one step at a time, each step starting from the previous result:
``7+3=0;0*2=0;0-5=5;5+8=3;3*4=2;a:2``. An early slip changes every later step, so a
wrong step near the start dooms the answer: the "prefix failure" TRD is built to repair.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

OPS = "+-*"
ANSWER_MARK = "a:"
_STEP = re.compile(r"^(\d)([+\-*])(\d)=(\d)$")


def apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return (a + b) % 10
    if op == "-":
        return (a - b) % 10
    return (a * b) % 10


@dataclass(frozen=True)
class ChainProblem:
    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        return str(self.start) + "".join(f"{op}{b}" for op, b in self.ops)

    def values(self) -> list[int]:
        """The running value after each step."""
        out, value = [], self.start
        for op, b in self.ops:
            value = apply(value, op, b)
            out.append(value)
        return out

    @property
    def answer(self) -> str:
        return str(self.values()[-1])

    @property
    def solution(self) -> str:
        return render_steps(self.start, self.ops, self.values())


def render_steps(start: int, ops, results) -> str:
    steps, value = [], start
    for (op, b), result in zip(ops, results):
        steps.append(f"{value}{op}{b}={result}")
        value = result
    return ";".join(steps) + f";{ANSWER_MARK}{value}"


def parse_problem(text: str) -> ChainProblem:
    if not re.fullmatch(r"\d([+\-*]\d)+", text):
        raise ValueError(f"not a chain problem: {text!r}")
    return ChainProblem(int(text[0]), tuple((text[i], int(text[i + 1])) for i in range(1, len(text), 2)))


def sample_problem(rng: random.Random, steps: int) -> ChainProblem:
    return ChainProblem(rng.randrange(10), tuple((rng.choice(OPS), rng.randrange(10)) for _ in range(steps)))


def sample_problems(n: int, steps: int, seed: int, exclude: set[str] | None = None) -> list[ChainProblem]:
    """``n`` distinct problems, none of whose texts is in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude or ()), []
    while len(out) < n:
        problem = sample_problem(rng, steps)
        if problem.text not in seen:
            seen.add(problem.text)
            out.append(problem)
    return out


CORRUPTIONS = ("slip", "copy", "noise", "truncate")


def flawed_attempt(problem: ChainProblem, rng: random.Random, kinds: tuple[str, ...] = ("slip",)) -> tuple[str, int]:
    """A worked solution with mistakes, as a weak student writes it. Returns the text and the index of
    its first wrong step. Kinds of mistake (one is drawn from ``kinds``):

    - ``slip``: one wrong result, then every later step computed consistently from it;
    - ``copy``: one operator or operand miscopied from the problem, then consistent;
    - ``noise``: several wrong results and miscopied operands;
    - ``truncate``: a slip, and the attempt cut off before its end.
    """
    kind = kinds[0] if len(kinds) == 1 else rng.choice(kinds)  # one kind draws nothing, keeping old streams
    first = min(int(rng.expovariate(1.0 / 1.5)), len(problem.ops) - 1)  # early slips are the common ones
    results, ops, value = [], [], problem.start
    for i, (op, b) in enumerate(problem.ops):
        if (kind == "copy" and i == first) or (kind == "noise" and i >= first and rng.random() < 0.3):
            op, b = (rng.choice(OPS.replace(op, "")), b) if rng.random() < 0.5 else (op, (b + rng.randrange(1, 10)) % 10)
        value = apply(value, op, b)
        if (kind != "copy" and i == first) or (i > first and rng.random() < (0.3 if kind == "noise" else 0.2)):
            value = (value + rng.randrange(1, 10)) % 10
        results.append(value)
        ops.append((op, b))
    text = render_steps(problem.start, ops, results)
    if kind == "truncate":
        text = text[: rng.randrange(1, len(text))]
    return text, first_error_step(problem, text)


def first_error_step(problem: ChainProblem, response: str) -> int | None:
    """Index of the first step of ``response`` that is malformed or wrong (None when all are right).

    A step is right when it starts from the true running value, applies the problem's operation
    and gets the true result, so a slip and everything after it count from the slip.
    """
    steps = response.split(ANSWER_MARK)[0].rstrip(";").split(";")
    value = problem.start
    for i, (op, b) in enumerate(problem.ops):
        match = _STEP.match(steps[i].strip()) if i < len(steps) else None
        expected = apply(value, op, b)
        if not match or (int(match[1]), match[2], int(match[3]), int(match[4])) != (value, op, b, expected):
            return i
        value = expected
    return None


def extract_answer(response: str) -> str | None:
    """The text after the last answer mark, up to the end of its line."""
    index = response.rfind(ANSWER_MARK)
    if index < 0:
        return None
    answer = response[index + len(ANSWER_MARK):].strip().split()
    return answer[0] if answer else None
