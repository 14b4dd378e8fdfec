"""Time per training step of a demo config, split by stage, and the trainer's overhead against a bare loop.

    python benchmarks/step_time.py [--config configs/demo/opd.yaml] [--steps 40] [--warmup 5]

The module runs under Lightning with the config's logger, as a user runs it. The bare loop does the same
work with the same building blocks (HF generate through the engine, the refiner, the views, the teacher
and student forwards, the fused divergence, AdamW with the same clipping) and nothing else: no Lightning,
no verification, no logging. Overhead = module step / bare step - 1, medians over the timed steps.
Run it on an idle machine: a second busy process slows 2-thread torch by large factors.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lightning.pytorch import Callback, seed_everything

from trd_lightning.cli import TRDCLI
from trd_lightning.module import DistillationModule
from trd_lightning.rollout.base import STUDENT

STAGES = ("rollout", "refine", "teacher", "student_forward", "backward", "optimizer")


class StepTimer(Callback):
    def __init__(self):
        self.total, self.stages, self.start = [], {s: [] for s in STAGES}, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.total.append(time.perf_counter() - self.start)
        for stage in STAGES:
            self.stages[stage].append(outputs["result"].record.seconds.get(stage, 0.0))


def build(config: str, steps: int, extra: list[str]):
    cli = TRDCLI(args=["--config", config, f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
                       "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
                       "--trainer.callbacks=[]", "--model.init_args.export_student=false", *extra], run=False)
    return cli.model, cli.datamodule, cli.trainer


def bare_loop(module: DistillationModule, datamodule, steps: int, lr: float, clip: float) -> list[float]:
    """The same work as a training step, written as a plain PyTorch loop."""
    module.configure_model()
    datamodule.setup("fit")
    optimizer = torch.optim.AdamW([p for p in module.student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    times, batches = [], iter(datamodule.train_dataloader())
    for _ in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        rollouts = module.engine.generate(STUDENT, module.student, batch.prompt_ids, module.sampling)
        targets = module.refiner.refine(batch, rollouts, module.teacher_access)
        loss = module.distill(module.make_views(batch, rollouts, targets))[0].loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.student.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo/opd.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args, extra = parser.parse_known_args()
    total = args.steps + args.warmup
    torch.set_num_threads(torch.get_num_threads())

    seed_everything(0)
    module, datamodule, trainer = build(args.config, total, extra)
    timer = StepTimer()
    trainer.callbacks.append(timer)
    trainer.fit(module, datamodule=datamodule)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    clip = module.gradient_clip_val or float("inf")

    seed_everything(0)
    bare_module, bare_data, _ = build(args.config, total, extra)
    bare = bare_loop(bare_module, bare_data, total, lr, clip)

    median = lambda xs: statistics.median(xs[args.warmup:])  # noqa: E731
    step, bare_step = median(timer.total), median(bare)
    batch = datamodule.batch_size * module.sampling.n
    print(f"\n{args.config}: {batch} rollouts per step, median over {args.steps} steps after {args.warmup} warm-up steps, "
          f"{torch.get_num_threads()} threads")
    print(f"  {'stage':<26}{'ms':>9}{'share':>8}")
    for stage in STAGES:
        value = median(timer.stages[stage])
        print(f"  {stage:<26}{value * 1e3:>9.1f}{value / step:>8.1%}")
    other = step - sum(median(timer.stages[s]) for s in STAGES)
    print(f"  {'other (metrics, hooks)':<26}{other * 1e3:>9.1f}{other / step:>8.1%}")
    print(f"  {'step, Lightning module':<26}{step * 1e3:>9.1f}")
    print(f"  {'step, bare PyTorch loop':<26}{bare_step * 1e3:>9.1f}")
    print(f"  overhead of the module: {step / bare_step - 1:+.1%} (target: under 10%)")


if __name__ == "__main__":
    main()
