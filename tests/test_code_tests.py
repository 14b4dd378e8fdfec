"""Code tests as the datasets store them: outputs compared as the benchmarks do, and compressed cases never unpickled as objects."""

from __future__ import annotations

import base64
import json
import math
import pickle
import time
import zlib

import pytest

from trd_lightning.code_tests import BadTestsError, jobs, parse_tests, passed, same_output
from trd_lightning.sandbox import Limits


def test_outputs_compare_as_the_benchmarks_do():
    assert same_output("3  \n\n", "3\n", 1e-6)
    assert same_output("1 2\n3", "1 2 \n 3\n", 1e-6)
    assert same_output("0.3333333", "0.33333333333", 1e-6)
    assert not same_output("0.33", "0.3333333", 1e-6)
    assert not same_output("1 2", "1 2 3", 1e-6)
    assert not same_output("YES", "yes", 1e-6)


def test_compressed_cases_never_unpickle_objects():
    evil = base64.b64encode(zlib.compress(pickle.dumps(BadTestsError("x")))).decode()
    with pytest.raises(BadTestsError, match="neither JSON"):
        parse_tests.__wrapped__(json.dumps({"tests": evil}))


# -- verdicts from evidence (real sandbox runs) -------------------------------------------------------
ASSERTION = parse_tests.__wrapped__(json.dumps({
    "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 4\n    assert candidate(3) == 6\n",
    "entry_point": "double"}))
CALLS = parse_tests.__wrapped__(json.dumps({"tests": json.dumps({"fn_name": "double", "inputs": [[1], [2], [3]], "outputs": [2, 4, 6]})}))
CORRECT = "def double(x):\n    return 2 * x\n"
ALWAYS_EQUAL = ("class Yes:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n        return False\n"
                "    __hash__ = object.__hash__\n")
WRONG = {
    "sys.exit(0) at import": "import sys\nsys.exit(0)\n" + CORRECT,
    "os._exit(0) at import": "import os\nos._exit(0)\n" + CORRECT,
    "sys.exit(0) in the function": "import sys\ndef double(x):\n    sys.exit(0)\n",
    "os._exit(0) in the function": "import os\ndef double(x):\n    os._exit(0)\n",
    "an always-equal object": ALWAYS_EQUAL + "def double(x):\n    return Yes()\n",
    "an always-equal int": ALWAYS_EQUAL.replace("class Yes:", "class Yes(int):") + "def double(x):\n    return Yes(0)\n",
    "right on the first case only": "def double(x):\n    return 2 if x == 1 else 0\n",
    # The right value printed on the harness's stdout, never returned: the old call harness read it as the result.
    "printing the result and exiting": "import os\ndef double(x):\n    os.write(1, f'{2 * x}\\n'.encode())\n    os._exit(0)\n",
    # A failed assertion exits with 1, then the exit handler turns it to 0: passed, when the exit status counted.
    "an exit handler": "import atexit, os\natexit.register(lambda: os._exit(0))\ndef double(x):\n    return 0\n",
    # So does an excepthook that exits with 0.
    "patched builtins and excepthook": ("import builtins, os, sys\nbuiltins.isinstance = lambda *args: True\n"
                                        "sys.excepthook = lambda *args: os._exit(0)\ndef double(x):\n    return 0\n"),
    "sleeping past the wall clock": "import time\ndef double(x):\n    time.sleep(60 if x == 2 else 0)\n    return 2 * x\n",
}
# Opens what it can of every other process it sees (stdin: the harness's token and checks; memory; stdout:
# the verdict), copies what it read to stderr, writes a result on each stdout, and lists what it opened.
# Every process: under unshare, /proc is the host's, where the harness has another pid.
THIEF = """import os, sys
def double(x):
    me, opened = os.readlink("/proc/self"), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for path, flags in ((f"/proc/{pid}/fd/0", os.O_RDONLY), (f"/proc/{pid}/mem", os.O_RDONLY), (f"/proc/{pid}/fd/1", os.O_WRONLY)):
            try:
                fd = os.open(path, flags | os.O_NONBLOCK)
            except OSError:
                continue
            if pid != me:
                opened.append(path)
            try:
                if flags == os.O_WRONLY:
                    os.write(fd, b"2\\n")
                else:
                    sys.stderr.write(repr(os.read(fd, 1 << 16)))
            except OSError:
                pass
            os.close(fd)
    sys.stderr.write(f"opened: {opened}\\n")
    return 0
"""


@pytest.fixture(scope="module")
def sandbox():
    from tests.test_sandbox import make_sandbox

    sandbox = make_sandbox("auto", Limits(cpu_seconds=2, wall_seconds=2.0, memory_mb=512))
    yield sandbox
    sandbox.close()


def verdict(sandbox, program: str, tests) -> tuple[bool, list]:
    """Whether ``program`` passes every test; each run alone, each within the wall clock + 1 s."""
    verdicts, results = [], []
    for job in jobs(program, tests):
        start = time.monotonic()
        result = sandbox.run(job)
        assert time.monotonic() - start < sandbox.limits.wall_seconds + 1, result
        verdicts.append(passed(job, result, 1e-6))
        results.append((job, result))
    return all(verdicts), results


@pytest.mark.slow
@pytest.mark.parametrize("tests", [ASSERTION, CALLS], ids=["assertion", "calls"])
def test_a_correct_solution_passes(sandbox, tests):
    assert verdict(sandbox, CORRECT, tests)[0]
    assert verdict(sandbox, "class Solution:\n    def double(self, x):\n        return x + x\n", tests)[0]


@pytest.mark.slow
@pytest.mark.parametrize("tests", [ASSERTION, CALLS], ids=["assertion", "calls"])
@pytest.mark.parametrize("attack", list(WRONG))
def test_a_wrong_solution_fails(sandbox, tests, attack):
    passes, results = verdict(sandbox, WRONG[attack], tests)
    assert not passes, results


@pytest.mark.slow
def test_values_compare_as_plain_data(sandbox):
    tests = parse_tests.__wrapped__(json.dumps({"test": "assert pair(2) == (2, 4) and count('aab') == {'a': 2, 'b': 1}\n", "entry_point": "pair"}))
    program = ("import collections\nPair = collections.namedtuple('Pair', 'x y')\ndef pair(x):\n    return Pair(x, 2 * x)\n"
               "def count(s):\n    return collections.Counter(s)\n")
    assert not verdict(sandbox, program, tests)[0]  # the checks see only the entry point, not the solution's other names
    tests = parse_tests.__wrapped__(json.dumps({"test": "assert pair(2) == (2, 4)\n", "entry_point": "pair"}))
    assert verdict(sandbox, program, tests)[0]  # a namedtuple counts as the tuple it is
    # A call's result compares as JSON data, as before: tuples as lists, keys as strings, infinities by value.
    calls = parse_tests.__wrapped__(json.dumps({"tests": json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [[[1, 2], {"1": math.inf}]]})}))
    assert verdict(sandbox, "def f(x):\n    return (x, 2), {x: float('inf')}\n", calls)[0]
    assert not verdict(sandbox, "def f(x):\n    return (x, 2), {x: 1e308}\n", calls)[0]


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["bwrap", "unshare", "rlimits"])
@pytest.mark.parametrize("tests", [ASSERTION, CALLS], ids=["assertion", "calls"])
def test_the_token_and_the_checks_stay_out_of_reach(isolation, tests):
    """The solution cannot read the harness's stdin (token, expected values) or memory, nor write its stdout."""
    from tests.test_sandbox import ROOT, make_sandbox

    if isolation == "rlimits" and not ROOT:
        pytest.skip("under rlimits without root the run has the trainer's uid: the thief would reach this user's processes")

    sandbox = make_sandbox(isolation, Limits(cpu_seconds=2, wall_seconds=3.0, memory_mb=512))
    try:
        passes, results = verdict(sandbox, THIEF, tests)
    finally:
        sandbox.close()
    assert not passes
    for job, result in results:
        assert "opened: []" in result.stderr and job.meta["token"] not in result.stderr, result.stderr


@pytest.mark.slow
def test_failed_checks_leave_no_zombie_behind():
    """Outside a PID namespace (rlimits) nothing reaps an orphan soon: a harness that left its child behind when
    a check failed would, a few failures later, find the run's uid at its process limit and fail every test."""
    from tests.test_sandbox import ROOT, make_sandbox

    if not ROOT:
        pytest.skip("the process limit counts per uid: it bites per run only when the trainer (root) gives each run its own uid")
    sandbox = make_sandbox("rlimits", Limits(cpu_seconds=2, wall_seconds=3.0, memory_mb=512, processes=4))
    try:
        for _ in range(10):
            assert not verdict(sandbox, WRONG["right on the first case only"], ASSERTION)[0]
        assert verdict(sandbox, CORRECT, ASSERTION)[0]
    finally:
        sandbox.close()
