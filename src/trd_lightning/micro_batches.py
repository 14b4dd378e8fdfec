"""Micro-batches of one optimizer step: its sequences grouped by a token budget, the same count on every rank.

A sequence's cost is the tokens a forward pass over it computes in the model that sees the longer context
(the teacher's refine prompt under TRD): context + target. Packed (one row, no padding), a micro-batch costs
the sum of its sequences: they go longest first into the least-loaded micro-batch they fit in, so
micro-batches come out evenly filled. Right-padded, it costs rows x its longest sequence: sequences are
sorted by length and cut into consecutive runs, so each micro-batch pads little. Either way a sequence
over the budget goes alone.
Every rank must run as many micro-batches (each forward of a sharded model, and each synchronised backward,
is a collective), so the count is agreed on (the maximum over ranks) before anything runs; a rank with
fewer sequences than that count gets empty micro-batches, which the trainer fills with a zero-weight pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from trd_lightning.distributed import max_over_ranks
from trd_lightning.views import ModelInputs, pack


def first_fit_count(costs: Sequence[int], budget: int) -> int:
    """How many micro-batches first-fit decreasing needs: close to the fewest that hold ``costs`` under ``budget``."""
    loads: list[int] = []
    for cost in sorted(costs, reverse=True):
        slot = next((b for b, load in enumerate(loads) if load + cost <= budget), None)
        if slot is None:
            loads.append(cost)
        else:
            loads[slot] += cost
    return len(loads)


def balanced_groups(costs: Sequence[int], budget: int, count: int) -> list[list[int]]:
    """Indices of ``costs`` in at least ``count`` groups: longest first, each into the least-loaded group it fits
    in (an empty group takes anything); a new group opens only when none fits. Groups keep ascending indices."""
    groups: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        fits = [g for g in range(len(groups)) if not groups[g] or loads[g] + costs[index] <= budget]
        if not fits:
            groups.append([])
            loads.append(0)
            fits = [len(groups) - 1]
        slot = min(fits, key=lambda g: (loads[g], g))
        groups[slot].append(index)
        loads[slot] += costs[index]
    return [sorted(group) for group in groups]


def sorted_runs(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``costs``, longest first, cut into runs whose rows x longest cost stays within ``budget``."""
    groups: list[list[int]] = []
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        if groups and (len(groups[-1]) + 1) * costs[groups[-1][0]] <= budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    return [sorted(group) for group in groups]


AUTO_SPLIT = 4  # with no memory plan (CPUs), ``auto`` cuts a step into about this many micro-batches


def auto_budget(costs: Sequence[int]) -> int:
    """``max_tokens_per_micro_batch: auto`` where no memory plan sets it: a quarter of the step's tokens (at least
    its longest sequence), so the step still splits into length-sorted micro-batches that pad little."""
    return max(max(costs, default=1), -(-sum(costs) // AUTO_SPLIT))


def plan_micro_batches(costs: Sequence[int], budget: int | str | None, agree: Callable[[int], int] = lambda n: n,
                       padded: bool = False) -> list[list[int]]:
    """The step's micro-batches (lists of sequence indices). ``budget`` None puts everything in one; ``auto``: see
    ``auto_budget``.

    ``agree(n)`` returns the maximum of ``n`` over ranks (identity in one process); every rank calls it the
    same number of times, so the returned count is the same on all of them. ``padded``: the micro-batches
    will be right-padded (costed as rows x longest), else packed (costed as the sum).
    """
    if budget is None:
        return [list(range(len(costs)))]
    if budget == "auto":
        budget = auto_budget(costs)
    if budget <= 0:
        raise ValueError(f"max_tokens_per_micro_batch must be > 0 (got {budget})")
    if padded:
        groups = sorted_runs(costs, budget)
        return groups + [[] for _ in range(agree(len(groups)) - len(groups))]  # empty: filler passes
    count = agree(max(1, first_fit_count(costs, budget)))
    while True:
        groups = balanced_groups(costs, budget, count)
        agreed = agree(len(groups))
        if agreed == count:  # the same test on every rank: they leave the loop together
            return groups
        count = agreed


def plan_in_lockstep(costs_per_rank: Sequence[Sequence[int]], budget: int | None, padded: bool = False) -> list[list[list[int]]]:
    """Every rank's plan, each rank planning in its own thread with ``agree`` a real maximum over the threads, as
    all_reduce(MAX) is over processes: what a multi-process step would plan, run in one process (benchmarks, tests)."""
    import threading

    world = len(costs_per_rank)
    barrier, slots, plans = threading.Barrier(world), [0] * world, [[] for _ in range(world)]

    def run(rank: int) -> None:
        def agree(n: int) -> int:
            slots[rank] = n
            barrier.wait()
            agreed = max(slots)
            barrier.wait()
            return agreed

        plans[rank] = plan_micro_batches(costs_per_rank[rank], budget, agree, padded)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return plans


@dataclass
class MicroBatcher:
    """Cuts one step's sequences on this rank into micro-batches under ``max_tokens`` (None: one micro-batch; ``auto``:
    ``auto_budget``), the same count on every rank (``device`` carries the agreeing collective)."""

    max_tokens: int | str | None
    pad_id: int
    device: torch.device

    def plan(self, costs: Sequence[int], packed: bool) -> Iterator[tuple[list[int], list[int]]]:
        """(rows, rows to run) per micro-batch. A rank with fewer sequences gets empty micro-batches: it runs its
        cheapest row there, to be discarded (a filler pass keeps sharded forwards and synced backwards in step)."""
        for rows in plan_micro_batches(costs, self.max_tokens, lambda n: max_over_ranks(n, self.device), padded=not packed):
            yield rows, rows or [min(range(len(costs)), key=costs.__getitem__)]

    def inputs(self, contexts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], packed: bool) -> Iterator[tuple[list[int], ModelInputs]]:
        """(rows, one model's inputs) per micro-batch of these (context, target) pairs; ``rows`` empty: a filler."""
        for rows, run in self.plan([len(c) + len(t) for c, t in zip(contexts, targets)], packed):
            yield rows, pack([contexts[r] for r in run], [targets[r] for r in run], self.pad_id, packed)
