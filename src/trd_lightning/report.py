"""What a ``trd fit`` did, told at its end: the validation metrics before, during and after training, the steps, the
wall time, the tokens trained, and where the logs, the checkpoint and the exported student are."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

# Validations kept in the table when there were more: the first, the last, and this many in between, evenly spread.
MAX_COLUMNS = 5


class FitReport(Callback):
    """Records every validation's metrics (those TensorBoard receives, by the optimizer step they describe) and the
    fit's start; ``trd fit`` calls ``print`` once training and its final validation are done."""

    def __init__(self):
        self.validations: dict[int, dict[str, float]] = {}  # optimizer step -> val/* metrics
        self.started: float | None = None
        self.first_step: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.started is None:  # validate_before_fit enters first: its time is part of the run
            self.started = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_step = trainer.global_step  # 0, or the step a resumed run starts from

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
        if metrics:
            self.validations[trainer.global_step] = metrics

    def validated_at(self, step: int) -> bool:
        return step in self.validations

    def columns(self) -> list[int]:
        steps = sorted(self.validations)
        if len(steps) <= MAX_COLUMNS:
            return steps
        inner = steps[1:-1]
        picked = [inner[round(i * (len(inner) - 1) / (MAX_COLUMNS - 3))] for i in range(MAX_COLUMNS - 2)]
        return [steps[0], *dict.fromkeys(picked), steps[-1]]

    def facts(self, trainer, pl_module) -> list[tuple[str, str]]:
        """(what, value) lines under the table."""
        lines = [("steps", f"{trainer.global_step}" + (f" (this run: {self.first_step} → {trainer.global_step})" if self.first_step else ""))]
        if self.started is not None:
            lines.append(("wall time", duration(time.monotonic() - self.started)))
        tokens = getattr(pl_module, "tokens_trained", None)
        if tokens:
            lines.append(("target tokens trained", f"{tokens:,}"))
        log_dir = trainer.log_dir  # a broadcast under DDP: read once
        if log_dir is not None:
            lines.append(("logs", str(log_dir)))
        checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        last = next((c.last_model_path or c.best_model_path for c in checkpoints if c.last_model_path or c.best_model_path), None)
        if last:
            lines.append(("checkpoint", last))
        exported = Path(log_dir or trainer.default_root_dir) / "student_hf"
        if getattr(pl_module, "export_student", False) and exported.is_dir():
            lines.append(("exported student", str(exported)))
        board = next((logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)
        if board is not None:
            lines.append(("see the curves", f"tensorboard --logdir {board.save_dir}"))
        return lines

    def print(self, trainer, pl_module) -> None:
        """On every rank (``trainer.log_dir`` is a collective under DDP); rank 0 prints."""
        lines = self.facts(trainer, pl_module)
        if trainer.is_global_zero:
            self.render(trainer, lines)

    def render(self, trainer, lines: list[tuple[str, str]]) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        steps = self.columns()
        if steps:
            table = Table(title="validation")
            table.add_column("metric", no_wrap=True)
            for step in steps:
                when = "before" if step == 0 else "after" if step == trainer.global_step else ""
                table.add_column(f"step {step}\n{when}", justify="right", no_wrap=True)
            names = list(dict.fromkeys(name for step in steps for name in self.validations[step]))
            for name in names:
                table.add_row(name, *(f"{self.validations[s][name]:.4f}" if name in self.validations[s] else "" for s in steps))
            console.print(table)
        width = max(len(what) for what, _ in lines)
        console.print("fit done", style="bold")
        for what, value in lines:  # plain lines, never cut to the terminal's width: paths are to be copied
            console.print(f"  {what:<{width}}  {value}", soft_wrap=True, highlight=False)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
