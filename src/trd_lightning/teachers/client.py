"""JSON over HTTP to one or more inference servers: requests spread over them, each with a timeout, retried with backoff.

A request that meets a connection error, a timeout, or an answer saying the server is busy or broken (HTTP 429,
5xx) is retried on the next server, after ``backoff * 2**attempt`` seconds; after ``max_retries`` retries it fails
with ``ServerUnavailableError``, which the trainer treats as resumable (it writes ``last.ckpt`` and stops). An
answer refusing the request itself (HTTP 4xx) fails at once with the server's message: sending it again cannot help.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import requests

from trd_lightning.reliability import ResumableError

RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)


class ServerUnavailableError(ResumableError):
    """No server answered a request within its retries."""


class ServerRequestError(ValueError):
    """A server refused a request (HTTP 4xx); the message is the server's."""


class ServerClient:
    """Requests to the servers at ``urls`` (base URLs, e.g. ``http://node3:8000``).

    ``timeout``: seconds to wait to connect, and then for each read of the answer; ``max_retries``: retries of a
    failed request; ``backoff``: the first wait before a retry, doubled each time; ``max_concurrent``: requests in
    flight at once in ``map``; ``what``: what the servers serve, for messages.
    """

    def __init__(self, urls: Sequence[str], timeout: float, max_retries: int, backoff: float, max_concurrent: int, what: str = "server"):
        self.urls, self.what = [url.rstrip("/") for url in urls], what
        self.timeout, self.max_retries, self.backoff, self.max_concurrent = timeout, max_retries, backoff, max_concurrent
        self.turn = itertools.count()  # which server a request tries first: round-robin (next() on a count is atomic in CPython)
        self.local = threading.local()  # a requests.Session per thread: sessions are not thread-safe

    def __getstate__(self) -> dict:  # picklable (spawned processes): sessions and the turn counter start afresh
        return {k: v for k, v in self.__dict__.items() if k not in ("turn", "local")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, turn=itertools.count(), local=threading.local())

    def session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def request(self, method: str, path: str, payload: dict | None = None, url: str | None = None) -> dict:
        """The server's JSON answer to one request: to ``url`` only when given, else starting at the next server in
        turn and moving to the following one at each retry."""
        first = next(self.turn)
        errors, start = [], time.monotonic()
        for attempt in range(self.max_retries + 1):
            base = url or self.urls[(first + attempt) % len(self.urls)]
            try:
                response = self.session().request(method, base + path, json=payload, timeout=self.timeout)
            except requests.RequestException as error:  # refused, reset, timed out
                errors.append(f"{base}: {type(error).__name__}: {error}")
            else:
                if response.ok:
                    return response.json()
                if response.status_code not in RETRYABLE_STATUS:
                    raise ServerRequestError(f"{base}{path} refused the request: HTTP {response.status_code}: {server_message(response)}")
                errors.append(f"{base}: HTTP {response.status_code}: {server_message(response)}")
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2**attempt)
        raise ServerUnavailableError(
            f"the {self.what} gave no answer to {method} {path} after {self.max_retries + 1} attempts over {time.monotonic() - start:.0f} s "
            f"(timeout {self.timeout:g} s each); the last: {errors[-1]}"
        )

    def map(self, path: str, payloads: Sequence[dict]) -> list[dict]:
        """The answers to POSTing each payload, in order; sent concurrently, spread over the servers."""
        if len(payloads) <= 1:
            return [self.request("POST", path, payload) for payload in payloads]
        with ThreadPoolExecutor(min(self.max_concurrent, len(payloads))) as pool:
            return list(pool.map(lambda payload: self.request("POST", path, payload), payloads))


def server_message(response: requests.Response) -> str:
    """What the server said: the ``error.message`` of an OpenAI-style error body, else the start of the body."""
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        return str(error.get("message", error) if isinstance(error, dict) else error)[:500]
    except ValueError:
        return response.text[:500]
