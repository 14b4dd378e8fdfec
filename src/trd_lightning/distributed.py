"""The few collectives the trainer makes outside Lightning's strategy, each a no-op in a single process."""

from __future__ import annotations

import torch


def distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def gather_objects(value) -> list:
    """``value`` from every rank, in rank order (``[value]`` in one process)."""
    if not distributed():
        return [value]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def max_over_ranks(value: int, device) -> int:
    if not distributed():
        return value
    tensor = torch.tensor(value, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor)


def sum_over_ranks(values: list[float], device) -> list[float]:
    if not distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def on_all_ranks(flag: bool, device) -> bool:
    """Whether ``flag`` holds on every rank (each rank calls this at the same point of a loop they run together)."""
    if not distributed():
        return flag
    tensor = torch.tensor(int(flag), device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return bool(tensor)
