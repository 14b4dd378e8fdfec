"""Code verification throughput: verified responses per second for 256 responses x 10 tests (one sandbox run
per test, through CodeVerifier's worker pool), under each isolation that works here, and the sandbox's
overhead against a bare subprocess running the same programs with the same pool width. ``--style`` picks the
tests: stdin/stdout cases, function calls (TACO's ``fn_name``), or one assertion program holding all the
checks (EvalPlus; one run per response).

    python benchmarks/verify_throughput.py [--style stdin|call|assert] [--responses 256] [--tests 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from trd_lightning.code_tests import jobs, parse_tests
from trd_lightning.sandbox import Limits, SandboxError
from trd_lightning.verifiers import CodeVerifier

STDIN = "```python\nn = int(input())\nxs = list(map(int, input().split()))\nprint(sum(xs) {} n)\n```"
FUNCTION = "```python\ndef f(n, xs):\n    return sum(xs) {} n\n```"
PROGRAMS = {"stdin": STDIN, "call": FUNCTION, "assert": FUNCTION}  # right with "*", wrong with "+"


def problem(style: str, tests: int) -> str:
    cases = [(i + 1, list(range(i + 3))) for i in range(tests)]
    if style == "stdin":
        return json.dumps({"inputs": [f"{n}\n" + " ".join(map(str, xs)) + "\n" for n, xs in cases],
                           "outputs": [f"{n * sum(xs)}\n" for n, xs in cases]})
    if style == "call":
        tests = {"fn_name": "f", "inputs": [list(case) for case in cases], "outputs": [n * sum(xs) for n, xs in cases]}
        return json.dumps({"tests": json.dumps(tests)})  # as TACO's input_output column
    checks = "".join(f"    assert candidate({n}, {xs}) == {n * sum(xs)}\n" for n, xs in cases)
    return json.dumps({"test": "def check(candidate):\n" + checks, "entry_point": "f"})


def bare(python: str, answer: str, responses: list[str], workers: int) -> float:
    """The same programs with the same interpreter and flags as plain subprocesses (no sandbox, no limits):
    seconds for all."""
    from trd_lightning.code_tests import extract_program

    tests = parse_tests(answer)
    work = [job for r in responses for job in jobs(extract_program(r), tests)]

    def run(job):
        directory = tempfile.mkdtemp(prefix="bench-bare-")
        try:
            for name, text in job.files.items():
                with open(os.path.join(directory, name), "w") as handle:
                    handle.write(text)
            argv = [python if a == "{python}" else a for a in job.argv]
            return subprocess.run(argv, input=(job.stdin or "").encode(), capture_output=True, cwd=directory, timeout=30).returncode
        finally:
            shutil.rmtree(directory)

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, work))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--style", choices=list(PROGRAMS), default="stdin")
    parser.add_argument("--responses", type=int, default=256)
    parser.add_argument("--tests", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    answer = problem(args.style, args.tests)
    responses = [PROGRAMS[args.style].format("+" if i % 4 == 3 else "*") for i in range(args.responses)]
    expected = [i % 4 != 3 for i in range(args.responses)]
    runs = args.responses * len(parse_tests(answer))
    kind = {"stdin": "stdin/stdout", "call": "function-call", "assert": "asserted"}[args.style]
    print(f"{args.responses} responses x {args.tests} {kind} tests = {runs} runs, {args.workers} workers, {os.cpu_count()} cores")
    for isolation in ("bwrap", "unshare", "rlimits"):
        try:
            verifier = CodeVerifier(isolation=isolation, limits=Limits(), workers=args.workers)
            verifier.sandbox.isolation
        except SandboxError:
            try:  # as root the run's uid may not reach the trainer's interpreter
                verifier = CodeVerifier(isolation=isolation, limits=Limits(), workers=args.workers, python=shutil.which("python3", path="/usr/bin"))
                verifier.sandbox.isolation
            except SandboxError as error:
                print(f"{isolation:8s} unavailable: {error}")
                continue
        python = verifier.sandbox.python
        verifier.score_many(responses[:4], [answer] * 4)  # warm up
        start = time.perf_counter()
        verdicts = verifier.score_many(responses, [answer] * len(responses))
        seconds = time.perf_counter() - start
        assert verdicts == expected, "wrong verdicts"
        verifier.sandbox.close()
        plain = bare(python, answer, responses, args.workers)
        for label, took in ((isolation, seconds), ("bare", plain)):
            print(f"  {label:8s} {took:7.2f} s  {len(responses) / took:6.2f} responses/s  "
                  f"{1000 * took / runs * args.workers:6.1f} ms per run per worker")
        print(f"{isolation} ({python}): the sandbox takes {seconds / plain:.2f}x the time of a bare subprocess, "
              f"+{1000 * (seconds - plain) / runs * args.workers:.1f} ms per run")


if __name__ == "__main__":
    main()
