"""Hostile programs in the code sandbox, under each isolation that works here: each is contained, ends as a
failed test within its wall-clock limit + 1 s, leaves no process and no temporary directory behind, and
the trainer (this process, and a process of the trainer's user) is unharmed. Each attack prints ``done``
only when it succeeded, so a passing test case would mean an escape.

The limits are first shown to bite on harmless programs (50 sleepers under a limit of 10 processes, 200 MB
under 100 MB, 2 MB into a 1 MB file) before the fork bomb, the 50 GB allocation and the 10 GB file run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from trd_lightning.code_tests import jobs, parse_tests, passed
from trd_lightning.sandbox import Job, Limits, Sandbox, SandboxError, sandbox_env, uid_processes

pytestmark = pytest.mark.slow  # every test starts sandboxed processes
LIMITS = Limits(cpu_seconds=2, wall_seconds=3.0, memory_mb=256, file_size_mb=8, processes=16, output_bytes=1 << 20)
ROOT = os.getuid() == 0
TESTS = parse_tests('{"inputs": [""], "outputs": ["done"]}')


def make_sandbox(isolation: str, limits: Limits = LIMITS) -> Sandbox:
    try:
        sandbox = Sandbox(isolation, limits, workers=2)
        sandbox.isolation
        return sandbox
    except SandboxError as error:
        if isolation != "bwrap" and shutil.which("python3", path="/usr/bin:/bin"):
            # As root the programs run as another uid, which may not reach the trainer's interpreter.
            sandbox = Sandbox(isolation, limits, workers=2, python=shutil.which("python3", path="/usr/bin:/bin"))
            sandbox.isolation
            return sandbox
        pytest.skip(f"{isolation} isolation does not work here: {error}")


@pytest.fixture(scope="module", params=["bwrap", "unshare", "rlimits"])
def sandbox(request):
    sandbox = make_sandbox(request.param)
    yield sandbox
    sandbox.close()


def sandbox_processes(sandbox: Sandbox) -> list[int]:
    """Live processes still running as one of the sandbox's uids (zombies cannot run)."""
    assert len(sandbox.uid_range) == sandbox.workers
    return [pid for uid in sandbox.uid_range for pid in uid_processes(uid)]


def leftover_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("trd-sandbox-*")}


def attack(sandbox: Sandbox, code: str):
    """Run ``code`` as a response's program against a one-case test; the run, its verdict, its wall time."""
    before = leftover_dirs()
    job, = jobs(code, TESTS)
    start = time.monotonic()
    result = sandbox.run(job)
    elapsed = time.monotonic() - start
    assert not passed(job, result, 1e-6), f"the attack succeeded: {result}"
    assert elapsed < sandbox.limits.wall_seconds + 1, f"took {elapsed:.1f} s"
    if ROOT:
        assert sandbox_processes(sandbox) == []
    assert leftover_dirs() <= before
    return result


# -- the limits bite (harmless programs) --------------------------------------------------------------
@pytest.mark.skipif(not ROOT, reason="RLIMIT_NPROC counts per uid: enforced per run only when the trainer (root) gives each run its own uid")
def test_the_process_limit_bites(sandbox):
    strict = make_sandbox(sandbox.requested, Limits(processes=10, wall_seconds=5.0))
    code = ("import subprocess\nchildren = []\ntry:\n    for _ in range(50):\n        children.append(subprocess.Popen(['sleep', '1']))\n"
            "except OSError:\n    pass\nprint(len(children))\nfor c in children:\n    c.wait()\n")
    result = strict.run(Job({"main.py": code}, ["{python}", "-I", "main.py"]))
    assert result.returncode == 0, result
    assert 0 < int(result.stdout) < 10


def test_the_memory_limit_bites(sandbox):
    strict = make_sandbox(sandbox.requested, Limits(memory_mb=100))
    result = strict.run(Job({"main.py": "x = bytearray(200 * 2**20)\nprint('allocated')"}, ["{python}", "-I", "main.py"]))
    assert result.returncode != 0 and "MemoryError" in result.stderr and "allocated" not in result.stdout
    result = strict.run(Job({"main.py": "x = bytearray(20 * 2**20)\nprint('allocated')"}, ["{python}", "-I", "main.py"]))
    assert result.ok and result.stdout.strip() == "allocated"


def test_the_file_size_limit_bites(sandbox):
    strict = make_sandbox(sandbox.requested, Limits(file_size_mb=1))
    code = ("import os\nwith open('f', 'wb') as f:\n    f.write(b'x' * 2**20)\nprint(os.path.getsize('f'))\n"
            "with open('f', 'ab') as f:\n    f.write(b'x')\nprint('over')")
    result = strict.run(Job({"main.py": code}, ["{python}", "-I", "main.py"]))
    assert result.returncode != 0 and result.stdout.split() == [str(2**20)]  # 1 MB fits, one byte more does not


# -- hostile programs -------------------------------------------------------------------------------
def test_infinite_loop(sandbox):
    result = attack(sandbox, "while True:\n    pass\nprint('done')")
    assert result.returncode != 0 or result.timed_out


def test_sleeping_forever_is_killed_at_the_wall_clock(sandbox):
    result = attack(sandbox, "import time\ntime.sleep(10**6)\nprint('done')")
    assert result.timed_out


@pytest.mark.skipif(not ROOT, reason="needs the per-run uid (root trainer) for the process limit; never run unbounded")
def test_fork_bomb(sandbox):
    test_the_process_limit_bites(sandbox)  # refuse to go on unless the limit is shown to bite
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\nprint('done')"
    result = attack(sandbox, code)
    assert result.timed_out or result.returncode != 0


def test_allocating_50_gb(sandbox):
    code = ("chunks = []\nwhile len(chunks) < 50 * 16:\n    chunks.append(bytearray(64 * 2**20))  # 50 GB in 64 MB steps\n"
            "big = bytearray(50 * 2**30)\nprint('done')")
    result = attack(sandbox, code)
    assert "MemoryError" in result.stderr


def test_writing_a_10_gb_file(sandbox):
    code = "with open('big', 'wb') as f:\n    for _ in range(10 * 1024):\n        f.write(b'x' * 2**20)\nprint('done')"
    result = attack(sandbox, code)
    assert result.returncode != 0


def test_files_outside_its_directory_survive(sandbox):
    victims = Path(tempfile.mkdtemp(prefix="trd-victim-"))
    try:
        os.chmod(victims, 0o755)  # readable by anyone, like most of a machine
        victim = victims / "checkpoint.txt"
        victim.write_text("precious")
        os.chmod(victim, 0o644)
        code = f"""
import os, shutil
hits = []
for attempt in (lambda: os.remove({str(victim)!r}), lambda: open({str(victim)!r}, "w").write("gone"),
                lambda: os.rename({str(victim)!r}, {str(victim)!r} + ".x"), lambda: shutil.rmtree({str(victims)!r}),
                lambda: open({str(victims / "new.txt")!r}, "w").write("planted")):
    try:
        attempt()
        hits.append(1)
    except OSError:
        pass
if hits:
    print("done")
raise SystemExit(1)
"""
        attack(sandbox, code)
        assert victim.read_text() == "precious" and sorted(p.name for p in victims.iterdir()) == ["checkpoint.txt"]
    finally:
        shutil.rmtree(victims)


def test_the_trainers_environment_is_not_visible(sandbox, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_of_the_trainer")
    code = "import os\nprint(sorted(os.environ))\nassert 'HF_TOKEN' in os.environ\nprint('done')"
    result = attack(sandbox, code)
    seen = set(eval(result.stdout.splitlines()[0]))
    assert seen <= set(sandbox_env()) | {"PWD"} and "hf_secret" not in result.stdout + result.stderr


def test_no_network(sandbox):
    if sandbox.isolation == "rlimits":
        pytest.skip("rlimits isolation does not block the network (docs/code-tasks.md says so); bwrap and unshare do")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = f"""
import socket
for address in (("127.0.0.1", {port}), ("192.0.2.1", 80)):  # the trainer's listener; TEST-NET-1 (unroutable)
    try:
        socket.create_connection(address, timeout=1).sendall(b"escaped")
        print("done")
    except OSError as error:
        print(address[0], type(error).__name__)
raise SystemExit(1)
"""
        result = attack(sandbox, code)
        # bwrap brings up the namespace's own loopback (refused: nothing listens there); unshare leaves it down
        words = result.stdout.split()
        assert words[0] == "127.0.0.1" and words[1] in ("ConnectionRefusedError", "OSError") and words[2:] == ["192.0.2.1", "OSError"], result
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the trainer's socket
    finally:
        server.close()


def test_killing_its_parent_and_the_trainer(sandbox):
    bystander = subprocess.Popen(["sleep", "60"])  # a process of the trainer's user
    try:
        code = f"""
import os, signal
hits = 0
for pid in (os.getppid(), {os.getpid()}, {bystander.pid}, 1):
    try:
        os.kill(pid, signal.SIGKILL)
        hits += 1
    except OSError:
        pass
if hits:
    print("done")
raise SystemExit(1)
"""
        attack(sandbox, code)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_printing_1_gb_is_truncated(sandbox):
    code = "import sys\nblock = 'x' * 2**20\nfor _ in range(1024):\n    sys.stdout.write(block)\nprint('done')"
    result = attack(sandbox, code)
    assert result.truncated and len(result.stdout) == sandbox.limits.output_bytes


def test_a_batch_of_runs_goes_through_the_pool(sandbox):
    results = sandbox.run_many([Job({"main.py": f"print({i} * {i})"}, ["{python}", "-I", "main.py"]) for i in range(6)])
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(6)]


SCRIPT = """
import pickle, sys
class Point:
    pass
print(__name__, __file__, sys.argv, type(pickle.loads(pickle.dumps(Point()))).__name__, input())
raise SystemExit(sys.argv[1])
"""


@pytest.mark.parametrize("flags", [["-I", "-S"], ["-I"]], ids=["in the launcher", "exec'd"])
def test_a_script_runs_as_python_FILE_would(sandbox, flags):
    """``-I -S`` scripts run in the launcher's own process (an interpreter start saved), others are exec'd:
    either way the script is ``__main__`` with its own argv, its classes pickle, stdin and the exit code are its."""
    result = sandbox.run(Job({"main.py": SCRIPT}, ["{python}", *flags, "main.py", "7"], stdin="typed\n"))
    name, path, *argv, point, typed = result.stdout.split()
    assert (name, argv, point, typed) == ("__main__", ["['main.py',", "'7']"], "Point", "typed")
    assert path.startswith("/") and path.endswith("/main.py")  # absolute, as Python makes it
    assert result.returncode == 1 and result.stderr.strip().endswith("7")


def test_auto_falls_back_and_says_which(monkeypatch, caplog):
    import logging

    import trd_lightning.sandbox as module

    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None or not ROOT:
        pytest.skip("needs root and /usr/bin/python3 for the fallbacks")
    monkeypatch.setattr(module, "bwrap_binary", lambda: None)  # as on a machine without bwrap
    monkeypatch.setattr(module, "_probed", {})
    monkeypatch.setattr(module, "_announced", set())
    with caplog.at_level(logging.INFO):
        assert Sandbox("auto", LIMITS, workers=1, python=python).isolation == ("unshare" if shutil.which("unshare") else "rlimits")
        monkeypatch.setattr(module.shutil, "which", lambda *args, **kwargs: None)  # and without util-linux unshare
        monkeypatch.setattr(module, "_probed", {})
        sandbox = Sandbox("auto", LIMITS, workers=1, python=python)
        assert sandbox.isolation == "rlimits"
        Sandbox("auto", LIMITS, workers=1, python=python).isolation  # a second sandbox: no second message
    messages = [r.getMessage() for r in caplog.records if "code sandbox: resource limits" in r.getMessage()]
    assert len(messages) == 1 and "can reach the network" in messages[0]
    assert "bwrap unavailable: no bwrap binary" in messages[0] and "unshare unavailable" in messages[0]
    with pytest.raises(SandboxError, match="bwrap unavailable"):
        Sandbox("bwrap", LIMITS, workers=1).isolation
