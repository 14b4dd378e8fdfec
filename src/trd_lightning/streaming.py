"""The streaming step's parts (``DistillationModule(streaming=True)``): rewrites sent to the teacher ahead and taken as
they finish, and micro-batches closed as their sequences arrive.

The step itself stays in the module (``learn_streaming``): each finished rewrite becomes its row's target, the
planner closes a micro-batch once the next sequence would not fit, and a closed micro-batch is trained at once while
later rewrites are still being written. Its loss weighs every target token 1; the summed gradients are scaled by
1/N once N (the step's target tokens over all ranks) is known, before clipping: the same token mean as the
synchronous step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextvars import copy_context
from dataclasses import dataclass

import torch

from trd_lightning.rollout.base import Rollouts, Sampling
from trd_lightning.teachers.base import GENERATION_SEEDS


class StreamPlanner:
    """Micro-batches closed in the order sequences arrive: one closes when the next sequence would take it past
    ``budget`` (packed: the sum of costs; ``padded``: rows x the longest); a sequence over the budget goes alone;
    ``budget`` None closes nothing before ``flush``."""

    def __init__(self, budget: int | None, padded: bool):
        self.budget, self.padded = budget, padded
        self.rows: list[int] = []
        self.costs: list[int] = []

    def cost(self, costs: Sequence[int]) -> int:
        return len(costs) * max(costs) if self.padded else sum(costs)

    def add(self, row: int, cost: int) -> list[list[int]]:
        """Take one sequence; the micro-batches that closed."""
        closed = []
        if self.rows and self.budget is not None and self.cost([*self.costs, cost]) > self.budget:
            closed = self.flush()
        self.rows.append(row)
        self.costs.append(cost)
        return closed

    def flush(self) -> list[list[int]]:
        """The open micro-batch, closed (nothing when it is empty)."""
        closed, self.rows, self.costs = ([self.rows] if self.rows else []), [], []
        return closed


@dataclass
class StreamClock:
    """Where a streaming step's time went (seconds): waiting for the teacher with nothing to train, training while
    requests were still out, and the span from the first request to the last answer."""

    waiting: float = 0.0
    overlapped: float = 0.0
    teacher_span: float = 0.0
    first_answer: float = 0.0
    requests: int = 0
    max_in_flight: int = 0

    def record(self, record) -> None:
        """Into the step's record: times as ``time/stream_wait``, ``time/stream_overlap``, ``time/refine`` (the teacher's
        span), ``time/stream_first_answer``, the slowest rank's; request counts summed over ranks."""
        if self.requests:
            record.seconds.update({"stream_wait": self.waiting, "stream_overlap": self.overlapped, "refine": self.teacher_span,
                                   "stream_first_answer": self.first_answer})
        record.totals.update({"stream_requests": float(self.requests), "stream_max_in_flight": float(self.max_in_flight)})


class Prefetch:
    """Generation requests sent to the teacher as their rows are known (``add``: as each rollout finishes), on up to
    ``max_in_flight`` threads. Seeds: one per row of the step, drawn from torch's RNG in row order when the first
    row comes (after the engine's own draws), so a row's seed never depends on when its rollout finished; where
    every row asks for a rewrite these are the draws of the synchronous step's one call. ``finished`` gives every
    added row: those that ask for nothing first, then each as its request finishes. ``generate`` answers a refiner's
    call from the requests when it asks for the same prompts and sampling, and calls ``teacher_generate`` itself
    otherwise."""

    def __init__(self, teacher_generate: Callable[[Sequence[Sequence[int]], Sampling], Rollouts], max_in_flight: int, clock: StreamClock,
                 rows: int):
        self.teacher_generate, self.max_in_flight, self.clock, self.rows = teacher_generate, max_in_flight, clock, rows
        self.seeds: list[int] | None = None
        self.pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="teacher-request")
        self.requests: dict[int, tuple[list[list[int]], Sampling]] = {}
        self.immediate: list[int] = []
        self.futures: dict[Future, int] = {}
        self.pending: set[Future] = set()
        self.unyielded: list[Future] = []
        self.results: dict[int, Rollouts] = {}
        self.start: float | None = None  # the first request
        self.answered: list[float] = []  # when each request finished (its thread's clock, not when this thread saw it)

    def add(self, row: int, prompts: list[list[int]] | None = None, sampling: Sampling | None = None) -> None:
        """A row of the step, and the teacher generation its refinement will ask for (none: it asks for nothing)."""
        if self.seeds is None:
            self.seeds = torch.randint(0, 2**31 - 1, (self.rows,)).tolist()
        if prompts is None:
            self.immediate.append(row)
            return
        seeds = [self.seeds[row] + j for j in range(len(prompts))]  # a request of several prompts (none of ours): one each
        self.start = time.perf_counter() if self.start is None else self.start
        self.requests[row] = (prompts, sampling)
        future = self.pool.submit(copy_context().run, self.call, prompts, sampling, seeds)
        future.add_done_callback(lambda _: self.answered.append(time.perf_counter() - self.start))
        self.futures[future] = row
        self.clock.requests += 1
        self.clock.max_in_flight = max(self.clock.max_in_flight, min(self.max_in_flight, sum(not f.done() for f in self.futures)))

    def call(self, prompts, sampling, seeds) -> Rollouts:
        GENERATION_SEEDS.set(seeds)
        return self.teacher_generate(prompts, sampling)

    def finished(self) -> Iterator[int]:
        """The rows that ask for nothing, then each row as its request finishes (a failed request raises here)."""
        while self.immediate:
            yield self.immediate.pop(0)
        self.pending = set(self.futures)
        while self.pending:
            start = time.perf_counter()
            done, self.pending = wait(self.pending, return_when=FIRST_COMPLETED)
            self.clock.waiting += time.perf_counter() - start
            self.unyielded = sorted(done, key=self.futures.__getitem__)
            while self.unyielded:
                future = self.unyielded.pop(0)
                row = self.futures[future]
                self.results[row] = future.result()
                yield row
        self.clock.first_answer, self.clock.teacher_span = min(self.answered, default=0.0), max(self.answered, default=0.0)

    def submit(self, call: Callable, *args) -> Future:
        """Another request (a row's scoring pass) on the same threads."""
        return self.pool.submit(call, *args)

    def ready(self) -> bool:
        """Whether ``finished`` has a row to give now, without waiting."""
        return bool(self.immediate or self.unyielded) or any(future.done() for future in self.pending)

    def in_flight(self) -> bool:
        return any(not future.done() for future in self.futures)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Rollouts:
        for row in list(self.results):  # answers not yet taken: the row just finished, as a rule
            sent, sent_sampling = self.requests[row]
            if sent_sampling == sampling and [list(p) for p in prompts] == sent:
                return self.results.pop(row)
        return self.teacher_generate(prompts, sampling)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
