"""FSDP2 as a Lightning strategy: ``ModelParallelStrategy`` with every process a data-parallel rank."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn

from trd_lightning.models import is_sharded


@contextmanager
def gradient_sync(strategy: Strategy, model: nn.Module, enabled: bool) -> Iterator[None]:
    """Around one micro-batch's backward. DDP reduces gradients on the step's last backward only (``no_sync`` before
    it): one all-reduce per step. FSDP2 reduce-scatters after every micro-batch, since skipping that would keep whole
    unsharded gradients on every rank."""
    block = getattr(strategy, "block_backward_sync", None)  # parallel strategies only
    if enabled or block is None or is_sharded(model):
        yield
    else:
        with block():
            yield


class FSDP2Strategy(ModelParallelStrategy):
    """Pure FSDP2 over all processes, on any number of devices and nodes (no tensor parallelism).

    ``ModelParallelStrategy`` reads ``"auto"`` sizes as tensor parallelism within a node and data parallelism
    across nodes, which would feed every process of a node the same batch. Here the data-parallel size is the
    world size and the tensor-parallel size 1; ``DistillationModule.configure_model`` applies ``fully_shard``
    over that one dimension.

    Args:
        save_distributed_checkpoint: each rank saves its shard of the weights and optimizer state, and a checkpoint
            is a folder with one file per rank; false assembles everything on rank 0 into a single file.
        process_group_backend: the ``torch.distributed`` backend (``nccl``, ``gloo``, ...); null: the default for the
            device (``nccl`` on CUDA, ``gloo`` on CPU).
        timeout: how long a collective may wait before it fails; null: Lightning's default (30 minutes).
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None, timeout: timedelta | None = None):
        kwargs = {"timeout": timeout} if timeout is not None else {}
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
