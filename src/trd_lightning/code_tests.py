"""The tests of a code problem, as the datasets store them, turned into sandbox runs and judged.

A row's ``answer`` (see ``PromptDataModule.answer_field``) is a JSON object with some of these keys:

- ``tests``: stdin/stdout or function-call cases, either TACO/APPS style
  (``{"inputs": [...], "outputs": [...], "fn_name": ...}``) or LiveCodeBench style
  (``[{"input": ..., "output": ..., "testtype": "stdin" | "functional"}, ...]``, as JSON or in LiveCodeBench's
  compressed form); a list of several such values (public and private cases) is merged;
- ``fn_name``: the function the call-style cases call (a name, or LiveCodeBench's ``metadata`` JSON holding
  ``func_name``); TACO carries it inside ``tests``;
- ``test`` and ``entry_point``: an assertion program (HumanEval+/MBPP+), run against the solution's
  ``entry_point`` (the one name of the solution's it sees); ``check(<entry_point>)`` is called when it
  defines ``check``;
- ``prelude``: code placed before the solution, and run before the assertion program (EvalPlus: the prompt,
  for its imports and helpers).

A plain (non-object) answer is read as ``tests``.

**Verdicts** come from evidence, never from an exit status alone. A stdin/stdout case passes when its
output, compared here, is right. Function tests (call-style cases, assertion programs) run ``HARNESS``: the
solution runs in a child process that answers each call with its return value as plain data (exact built-in
types, copied through ``marshal``); the checks run in the parent, the harness, where no code of the
solution's ever runs; and the test passes only when the harness prints, after every check held, a token
fresh to the run (a call's result on the line before it, compared here). The token and the checks (with
their expected values) reach the harness on stdin, which it reads only after the fork; the child has no
stdin and no stdout (/dev/null), and the harness is non-dumpable, so the child (same uid) can neither ptrace
it nor open its ``/proc/<pid>/{mem,fd}``. So exiting with status 0 (at import or inside the function),
printing a result or a verdict, returning an object whose ``__eq__`` says yes, patching builtins or exit
handlers, reading the tests: all fail.

Limits: the separation is the kernel's (a program that escapes the sandbox, or gains ptrace rights over its
harness, could forge a verdict). Values cross as copies: checks that look at how the function changed its
arguments, pass it anything but plain data, or use other names the solution defines (its classes, helpers)
fail. ``marshal`` is not hardened against crafted bytes; it reads the child's replies only inside the
sandbox, where a crash is a failed test. The price: a fork per function test, and a round trip between the
processes per call (some 20-80 µs here); about 4 ms per run in all, docs/code-tasks.md.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import pickle
import re
import secrets
import zlib
from dataclasses import dataclass

from trd_lightning.sandbox import Job

KEYS = ("tests", "fn_name", "test", "entry_point", "prelude")
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
PROGRAM = "solution.py"

# Function tests: the harness (trusted) runs the prelude, then forks; the child loads the solution and answers
# calls; the harness runs the checks, the entry point standing for a call to the child, and prints the token
# last. ``plain`` copies a value into exact built-in types: in the child it converts (numpy values, subclasses
# such as namedtuple or Counter), in the harness it refuses whatever else marshal may carry. For speed (each
# is 1 ms or more a run): posix rather than os, _ctypes rather than ctypes, exec(text) rather than compile().
HARNESS = r"""
import _ctypes, gc, marshal, posix, sys

def plain(value):
    if type(value).__module__ == "numpy":
        value = value.tolist()
    if value is None:
        return None
    for kind in (bool, int, float, complex, str, bytes, tuple, list, set, frozenset, dict):
        if isinstance(value, kind):
            if kind is dict:
                return {plain(k): plain(v) for k, v in dict.items(value)}
            return kind(map(plain, value)) if kind in (tuple, list, set, frozenset) else kind(value)
    raise TypeError(f"returned a {type(value).__name__}, not plain data")

def serve(name, calls, replies):
    namespace = {"__name__": "solution"}
    exec(open("solution.py").read(), namespace)
    function = namespace.get(name)
    if function is None and "Solution" in namespace:
        function = getattr(namespace["Solution"](), name)
    if function is None:
        sys.exit(f"the solution defines no function {name!r}")
    while True:
        try:
            args = marshal.load(calls)
        except EOFError:
            posix._exit(0)
        try:
            reply = marshal.dumps((True, plain(function(*args))))
        except BaseException as error:
            reply = marshal.dumps((False, f"{type(error).__name__}: {error}"))
        replies.write(reply)
        replies.flush()

def call(*args):
    marshal.dump(args, calls)
    calls.flush()
    ok, value = plain(marshal.load(replies))
    if ok is not True:
        raise RuntimeError(f"the solution failed: {value}")
    return value

class Int(_ctypes._SimpleCData):
    _type_ = "i"

class Function(_ctypes.CFuncPtr):
    _flags_, _restype_ = _ctypes.FUNCFLAG_CDECL, Int

name = sys.argv[1]
namespace = {"__name__": "__main__"}
exec(open("prelude.py").read(), namespace)  # before the fork: what it imports loads once
# prctl(PR_SET_DUMPABLE, 0): the child (same uid) may not ptrace the harness nor open its /proc/<pid>/{mem,fd/*}
if Function(_ctypes.dlsym(_ctypes.dlopen(None), "prctl"))(4, 0, 0, 0, 0):
    sys.exit("cannot make the harness non-dumpable")
calls_in, calls_out = posix.pipe()
replies_in, replies_out = posix.pipe()
gc.freeze()  # what exists now, neither process's collector touches: fewer pages copied after the fork
child = posix.fork()
if child == 0:
    posix.close(calls_out)
    posix.close(replies_in)
    null = posix.open("/dev/null", posix.O_RDWR)
    posix.dup2(null, 0)  # not the harness's stdin (the token, the checks)
    posix.dup2(null, 1)  # nor its stdout (the verdict)
    serve(name, open(calls_in, "rb"), open(replies_out, "wb"))
    posix._exit(1)
posix.close(calls_in)
posix.close(replies_out)
calls, replies = open(calls_out, "wb"), open(replies_in, "rb")
token, checks = sys.stdin.read().split("\n", 1)
namespace[name] = call
try:
    exec(checks, namespace)
finally:  # reaped, pass or fail: outside a PID namespace an orphan's zombie would count against the uid's processes
    posix.kill(child, 9)
    posix.waitpid(child, 0)
print(token)
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
    assertion: str | None = None  # a whole test program, run by the harness against the entry point
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
            got = f"{len(outputs)} outputs" if isinstance(outputs, list) else "no list of outputs"
            raise BadTestsError(f"TACO-style tests need as many outputs as inputs (got {len(inputs)} inputs, {got})")
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
    if assertion and not tests.entry_point:
        raise BadTestsError("an assertion test needs the `entry_point` it checks")
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
            checks = f"import json\nprint(json.dumps({case.fn_name}(*json.loads({case.input!r}))))\n"
            out.append(_function_job(program, "", checks, case.fn_name, python, case))
    if tests.assertion is not None:
        checks = tests.assertion + (f"\ncheck({tests.entry_point})\n" if "def check(" in tests.assertion else "")
        out.append(_function_job(program, tests.prelude, checks, tests.entry_point, python, None))
    return out


def _function_job(program: str, prelude: str, checks: str, name: str, python: list[str], case: Case | None) -> Job:
    """A run of ``HARNESS``; the token and the checks go on stdin, which only the harness reads."""
    token = secrets.token_hex(16)
    files = {PROGRAM: prelude + "\n\n" + program, "prelude.py": prelude, "harness.py": HARNESS}
    return Job(files, [*python, "harness.py", name], stdin=f"{token}\n{checks}", meta={"case": case, "token": token})


def passed(job: Job, result, tolerance: float) -> bool:
    """stdin/stdout cases: the output. Function tests: the harness's token on the last line (it prints it only
    after every check held), and for a call, the result it printed on the line before."""
    if not result.ok:
        return False
    case = job.meta["case"]
    if case is not None and case.fn_name is None:
        return same_output(result.stdout, case.output, tolerance)
    lines = result.stdout.splitlines()
    if not lines or lines[-1] != job.meta["token"]:
        return False
    return case is None or (len(lines) > 1 and same_result(lines[-2], case.output, tolerance))


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
        value = json.loads(got)
    except (json.JSONDecodeError, RecursionError):
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
