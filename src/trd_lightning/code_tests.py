"""The tests of a code problem, as the datasets store them, turned into sandbox runs and judged.

A row's ``answer`` (see ``PromptDataModule.answer_field``) is a JSON object with some of these keys:

- ``tests``: stdin/stdout or function-call cases, either TACO/APPS style
  (``{"inputs": [...], "outputs": [...], "fn_name": ...}``) or LiveCodeBench style
  (``[{"input": ..., "output": ..., "testtype": "stdin" | "functional"}, ...]``, as JSON or in LiveCodeBench's
  compressed form); a list of several such values (public and private cases) is merged;
- ``fn_name``: the function the call-style cases call (a name, or LiveCodeBench's ``metadata`` JSON holding
  ``func_name``); TACO carries it inside ``tests``;
- ``test`` and ``entry_point``: an assertion program (HumanEval+/MBPP+); ``check(<entry_point>)`` is called
  when it defines ``check``;
- ``prelude``: code placed before the solution (EvalPlus: the prompt, for its imports).

A plain (non-object) answer is read as ``tests``.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import pickle
import re
import zlib
from dataclasses import dataclass

from trd_lightning.sandbox import Job

KEYS = ("tests", "fn_name", "test", "entry_point", "prelude")
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
PROGRAM = "solution.py"

# Call-style cases: the solution runs as a module, its output discarded; the call's result is printed as JSON.
CALL_HARNESS = r"""
import io, json, sys
args = json.loads(open("args.json").read())
real_stdout, sys.stdout = sys.stdout, io.StringIO()
namespace = {"__name__": "solution"}
exec(compile(open("solution.py").read(), "solution.py", "exec"), namespace)
name = json.loads(open("fn.json").read())
function = namespace.get(name)
if function is None and "Solution" in namespace:
    function = getattr(namespace["Solution"](), name)
if function is None:
    raise SystemExit(f"the solution defines no function {name!r}")
result = function(*args)
if isinstance(result, tuple):
    result = list(result)
sys.stdout = real_stdout
print(json.dumps(result))
"""


class BadTestsError(ValueError):
    pass


@dataclass(frozen=True)
class Case:
    """One stdin/stdout case (``fn_name`` None) or one call (``input`` is the JSON list of arguments)."""

    input: str
    output: str
    fn_name: str | None = None


@dataclass(frozen=True)
class Tests:
    cases: tuple[Case, ...] = ()
    assertion: str | None = None  # a whole test program, run after the solution
    entry_point: str | None = None
    prelude: str = ""

    def __len__(self) -> int:
        return len(self.cases) + (self.assertion is not None)


def extract_program(response: str) -> str | None:
    """The last fenced code block (a Python-labelled one when there is any), or None."""
    blocks = _FENCE.findall(response)
    if not blocks:
        return None
    python = [code for language, code in blocks if language.lower() in ("python", "py", "python3")]
    code = (python or [code for _, code in blocks])[-1]
    return code if code.strip() else None


class _OnlyData(pickle.Unpickler):
    """LiveCodeBench's compressed cases are a pickled string: refuse anything but plain data."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test case")


def _decode(value):
    """JSON text, or LiveCodeBench's base64(zlib(pickle(json))), into data."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        inner = _OnlyData(io.BytesIO(zlib.decompress(base64.b64decode(text)))).load()
    except Exception:
        raise BadTestsError(f"test cases are neither JSON nor LiveCodeBench's compressed form: {text[:80]!r}") from None
    return _decode(inner)


def _text(value) -> str:
    """A case's input/output: lists of lines (APPS) joined."""
    if isinstance(value, list):
        return "\n".join(map(str, value))
    return str(value)


def _cases(data, fn_name: str | None) -> list[Case]:
    data = _decode(data)
    if data is None:
        return []
    if isinstance(data, dict) and "inputs" in data:  # TACO / APPS
        inputs, outputs = data["inputs"], data.get("outputs")
        if not isinstance(outputs, list) or len(outputs) != len(inputs):
            raise BadTestsError("TACO-style tests need as many outputs as inputs")
        name = data.get("fn_name") or fn_name
        if name:
            return [Case(json.dumps(i if isinstance(i, list) else [i]), json.dumps(o), name) for i, o in zip(inputs, outputs)]
        return [Case(_text(i), _text(o)) for i, o in zip(inputs, outputs)]
    if isinstance(data, list) and all(isinstance(c, dict) and "input" in c for c in data):  # LiveCodeBench
        cases = []
        for case in data:
            if case.get("testtype") == "functional":
                if not fn_name:
                    raise BadTestsError("functional test cases need a function name (map `fn_name` to the metadata column)")
                args = [json.loads(line) for line in case["input"].split("\n") if line.strip()]
                cases.append(Case(json.dumps(args), json.dumps(json.loads(case["output"])), fn_name))
            else:
                cases.append(Case(_text(case["input"]), _text(case["output"])))
        return cases
    if isinstance(data, list):  # several columns mapped to `tests`
        return [case for part in data for case in _cases(part, fn_name)]
    raise BadTestsError(f"unrecognised test cases (expected TACO's inputs/outputs or LiveCodeBench's cases): {str(data)[:80]!r}")


@functools.lru_cache(maxsize=4096)
def parse_tests(answer: str) -> Tests:
    """A row's tests from its answer (see the module docs); raises ``BadTestsError``."""
    try:
        spec = json.loads(answer)
    except (json.JSONDecodeError, TypeError):
        spec = None
    if not (isinstance(spec, dict) and set(spec) & set(KEYS)):
        spec = {"tests": answer}
    fn_name = _decode(spec["fn_name"]) if isinstance(spec.get("fn_name"), str) and spec["fn_name"].strip().startswith("{") else spec.get("fn_name")
    if isinstance(fn_name, dict):
        fn_name = fn_name.get("func_name") or fn_name.get("fn_name")
    cases = _cases(spec["tests"], fn_name or None) if spec.get("tests") is not None else []
    assertion = spec.get("test") or None
    prelude = spec.get("prelude") or ""
    if isinstance(prelude, list):  # import lines as a list (MBPP's test_imports)
        prelude = "\n".join(map(str, prelude))
    tests = Tests(tuple(cases), assertion, spec.get("entry_point") or None, prelude)
    if not len(tests):
        raise BadTestsError("the row has no tests")
    if assertion and "def check(" in assertion and not tests.entry_point:
        raise BadTestsError("an assertion test defining check() needs the `entry_point` it checks")
    return tests


def jobs(program: str, tests: Tests, site_packages: bool = False) -> list[Job]:
    """One sandbox run per case, and one for the assertion program. Without ``site_packages`` the
    interpreter skips ``site`` (the standard library only; a start several times faster)."""
    python = ["{python}", "-I"] if site_packages else ["{python}", "-I", "-S"]
    out = []
    for case in tests.cases:
        if case.fn_name is None:
            out.append(Job({PROGRAM: program}, [*python, PROGRAM], stdin=case.input, meta={"case": case}))
        else:
            files = {PROGRAM: program, "args.json": case.input, "fn.json": json.dumps(case.fn_name), "harness.py": CALL_HARNESS}
            out.append(Job(files, [*python, "harness.py"], meta={"case": case}))
    if tests.assertion is not None:
        text = tests.prelude + "\n\n" + program + "\n\n" + tests.assertion + "\n"
        if "def check(" in tests.assertion:
            text += f"\ncheck({tests.entry_point})\n"
        out.append(Job({PROGRAM: text}, [*python, PROGRAM], meta={"case": None}))
    return out


def passed(job: Job, result, tolerance: float) -> bool:
    if not result.ok:
        return False
    case = job.meta["case"]
    if case is None:
        return True  # the assertion program ran to the end
    if case.fn_name is not None:
        return same_result(result.stdout, case.output, tolerance)
    return same_output(result.stdout, case.output, tolerance)


def same_output(got: str, expected: str, tolerance: float) -> bool:
    """stdout as the TACO/APPS/LiveCodeBench checkers compare it: line by line with surrounding whitespace
    ignored, then token by token with numbers equal within ``tolerance``."""
    got_lines = [line.strip() for line in got.strip().splitlines()]
    expected_lines = [line.strip() for line in expected.strip().splitlines()]
    if got_lines == expected_lines:
        return True
    got_tokens, expected_tokens = " ".join(got_lines).split(), " ".join(expected_lines).split()
    return len(got_tokens) == len(expected_tokens) and all(_same_token(a, b, tolerance) for a, b in zip(got_tokens, expected_tokens))


def _same_token(a: str, b: str, tolerance: float) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=tolerance, abs_tol=tolerance)


def same_result(got: str, expected: str, tolerance: float) -> bool:
    """A call's JSON result against the expected value; TACO wraps some expected results in a list."""
    try:
        value = json.loads(got.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return False
    target = json.loads(expected)
    return _same_value(value, target, tolerance) or (isinstance(target, list) and len(target) == 1 and _same_value(value, target[0], tolerance))


def _same_value(a, b, tolerance: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k], tolerance) for k in a)
    return a == b
