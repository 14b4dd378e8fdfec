"""A callback that records each process's step times and peak memory, for benchmarks."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from lightning.pytorch import Callback


class StepProfiler(Callback):
    """Writes ``profile_rank<N>.json`` into ``directory``: wall time of every training step (from batch
    start to batch end) and the process's peak resident memory at the end of fit.

    Args:
        directory: the folder the reports are written to (created if missing), one file per process.
    """

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.steps: list[float] = []
        self.start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(time.perf_counter() - self.start)

    def on_fit_end(self, trainer, pl_module):
        self.directory.mkdir(parents=True, exist_ok=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size, "step_seconds": self.steps, "peak_rss_bytes": peak}
        (self.directory / f"profile_rank{trainer.global_rank}.json").write_text(json.dumps(report))
