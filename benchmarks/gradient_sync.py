"""DDP gradient sync inside one optimizer step: an all-reduce on the last micro-batch only (what the trainer
does) against one after every micro-batch. 2 CPU processes (gloo), the demo TRD config, small micro-batches.

    python benchmarks/gradient_sync.py [--steps 8] [--budget 512]

Run it on an idle machine. The variant is a one-method subclass of the module, selected by class_path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

from trd_lightning.module import DistillationModule

ROOT = Path(__file__).resolve().parents[1]


class SyncEveryMicroBatch(DistillationModule):
    """The alternative: DDP all-reduces the accumulated gradients after every micro-batch's backward."""

    def gradient_sync(self, enabled: bool):
        return nullcontext()


def median_step_seconds(class_path: str, steps: int, budget: int) -> tuple[float, float, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as directory:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-m", "trd_lightning.cli", "fit", "--config", str(ROOT / "configs/demo/trd.yaml"),
                        "--trainer", str(ROOT / "configs/strategy/ddp.yaml"), "--trainer.devices=2", f"--trainer.max_steps={steps + 1}",
                        f"--model.class_path={class_path}", f"--model.init_args.max_tokens_per_micro_batch={budget}",
                        "--validate_before_fit=false", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                        "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.log_every_n_steps=1",
                        f"--trainer.logger.init_args.save_dir={directory}", "--model.init_args.export_student=false"],
                       check=True, cwd=ROOT, capture_output=True, env=env)
        events = EventAccumulator(str(next(Path(directory).glob("*/version_0"))))
        events.Reload()
        values = {tag: [e.value for e in events.Scalars(tag)][1:] for tag in ("time/step", "time/backward", "step/micro_batches")}
    return statistics.median(values["time/step"]), statistics.median(values["time/backward"]), statistics.median(values["step/micro_batches"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--budget", type=int, default=512)
    opts = parser.parse_args()
    last = median_step_seconds("trd_lightning.module.DistillationModule", opts.steps, opts.budget)
    every = median_step_seconds("gradient_sync.SyncEveryMicroBatch", opts.steps, opts.budget)
    print(f"2-process DDP, demo TRD, {last[2]:.0f} micro-batches of <= {opts.budget} tokens, median of {opts.steps} steps:")
    print(f"  sync on the last micro-batch: step {last[0] * 1000:.0f} ms, backward {last[1] * 1000:.0f} ms")
    print(f"  sync on every micro-batch:    step {every[0] * 1000:.0f} ms, backward {every[1] * 1000:.0f} ms")
    print(f"  backward: every / last = {every[1] / last[1]:.2f}x; step: {every[0] / last[0]:.2f}x")


if __name__ == "__main__":
    main()
