"""Step time and peak memory per process of a demo config: 1 process, 2-process DDP, 2-process FSDP2.

    python benchmarks/scaling.py [--config configs/demo/trd.yaml] [--steps 20] [--warmup 3] [--batch 32]

Every setup trains on the same global batch (``--batch`` prompts a step, split over the processes) through
`trd fit`, with ``trd_lightning.profiling.StepProfiler`` recording each process's step times and peak
resident memory. Processes get ``cores / processes`` torch threads each, so the setups share the machine
fairly. On a CPU this measures the trainer's distributed machinery (gathers, reductions, sharded
checkpoints' layout), not a speed-up: two processes on two cores have no more compute than one.
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = [("1 process", None, 1), ("2-process DDP", "ddp", 2), ("2-process FSDP2", "fsdp", 2)]


def run(config: str, strategy: str | None, processes: int, opts, directory: Path) -> list[dict]:
    args = [sys.executable, "-m", "trd_lightning.cli", "fit", "--config", str(ROOT / config)]
    if strategy:
        args += ["--trainer", str(ROOT / f"configs/strategy/{strategy}.yaml")]
    args += [
        f"--trainer.devices={processes}", f"--trainer.max_steps={opts.steps}", "--validate_before_fit=false",
        "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={directory / 'logs'}",
        f"--data.init_args.batch_size={opts.batch // processes}", "--model.init_args.export_student=false",
        "--trainer.callbacks+=trd_lightning.profiling.StepProfiler", f"--trainer.callbacks.directory={directory}",
    ]
    threads = str(max(1, (os.cpu_count() or 1) // processes))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(p.read_text()) for p in sorted(directory.glob("profile_rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo/trd.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--batch", type=int, default=32, help="global prompts per step")
    opts = parser.parse_args()
    print(f"{opts.config}: global batch {opts.batch}, median of steps {opts.warmup + 1}-{opts.steps}, {os.cpu_count()} cores")
    print(f"{'setup':<17} {'process':>7} {'step ms':>9} {'peak RSS MiB':>13}")
    for name, strategy, processes in SETUPS:
        with tempfile.TemporaryDirectory(prefix="trd_scaling_") as folder:
            for report in run(opts.config, strategy, processes, opts, Path(folder)):
                step = statistics.median(report["step_seconds"][opts.warmup:]) * 1000
                print(f"{name:<17} {report['rank']:>7} {step:>9.1f} {report['peak_rss_bytes'] / 2**20:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
