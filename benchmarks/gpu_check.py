"""The prepared GPU check: one run, one table, each line a check with pass/fail and its figure.

    python benchmarks/gpu_check.py          # one H100/H200, under 8 minutes
    python benchmarks/gpu_check.py --cpu    # tiny sizes, the same code path (the test suite runs this)

Models are built from configs with random weights: on the GPU a Qwen3-0.6B-shaped student and a Qwen3-1.7B-shaped
teacher in bf16 (vocabulary 151,936), with the demo's tokenizer and data; nothing is downloaded.

The GPU machine's image holds torch, transformers, lightning, peft, tensorboard, torchmetrics, rich and matplotlib,
but not vllm, no weights and no network. Bring these wheels (``pip download --no-deps -d wheels NAME`` where PyPI is
reachable) and install them, then the project without its dependencies:

    pip install --no-deps wheels/*.whl    # jsonargparse docstring-parser typeshed-client torchdata rapidfuzz
                                          # math-verify latex2sympy2-extended antlr4-python3-runtime==4.13.2
                                          # liger-kernel (optional: the fused-JSD comparison)
    pip install --no-deps -e .
    python benchmarks/gpu_check.py

The checks:
- TRD and OPD optimizer steps with the HF engine, bf16 compute (``bf16-mixed``), a bf16 base with float32 LoRA
  adapters; the share of adapter entries that moved after 5 steps at lr 5e-6 (at least 99%: bf16 storage moves ~2%);
- packed against padded micro-batches under the reference configs' attention: the same loss, real/processed tokens
  and ms for one micro-batch of long-tailed lengths;
- the fused full-vocabulary divergence against a dense one and liger-kernel's fused linear JSD at the same beta:
  the loss, peak ``torch.cuda.max_memory_allocated`` and time of forward and backward;
- FSDP2 in one process (``ModelParallelStrategy``): one step, and the exported student loads;
- the streaming step (``streaming: true``) against the synchronous one on the same seed: one TRD step's loss and
  gradients. The teacher here is in the trainer's process, so the rewrites come in one call and only the training
  streams; the overlap with a served teacher needs vllm, which the GPU image lacks (``benchmarks/streaming.py``);
- peak ``torch.cuda.max_memory_allocated`` of the TRD and OPD steps against the memory plan's training phase
  (within 30%: the plan's activations are estimates).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback

QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "head_dim": 128, "num_key_value_heads": 8, "tie_word_embeddings": True,
         "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
GPU = {
    "student": {**QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16},
    "teacher": {**QWEN3, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16},
    "prompts": 16, "new_tokens": 256, "steps": 5, "budget": 8192, "lora_r": 64, "attention": "flex_attention",  # as the reference configs
    "divergence": {"tokens": 4096, "hidden": 1024, "vocab": 151936},
}
CPU = {
    "student": {**QWEN3, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 32},
    "teacher": {**QWEN3, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 48},
    "prompts": 4, "new_tokens": 8, "steps": 5, "budget": 96, "lora_r": 8, "attention": "sdpa",  # flex has no backward on CPUs
    "divergence": {"tokens": 128, "hidden": 64, "vocab": 151936},
}
LR = 5e-6


class Check:
    """One line of the table: a name, pass/fail/skip, and what was measured."""

    rows: list[tuple[str, str, str]] = []

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def record(self, ok: bool | None, figure: str) -> None:
        Check.rows.append((self.name, {True: "pass", False: "FAIL", None: "skip"}[ok], figure))

    def __exit__(self, kind, error, trace):
        if error is not None:
            traceback.print_exception(kind, error, trace)
            Check.rows.append((self.name, "FAIL", f"{kind.__name__}: {str(error).splitlines()[0][:90]}"))
        return True  # the next check runs all the same


def device_peak_reset(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def device_peak(on_gpu: bool) -> int | None:
    if not on_gpu:
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


# -- training steps -----------------------------------------------------------------------------------------
class StepMeter(Callback):
    """Records each optimizer step's wall time and what the step measured (tokens, loss), and the LoRA adapters as
    training starts."""

    def __init__(self):
        self.seconds: list[float] = []
        self.totals: list[dict] = []
        self.before: dict = {}

    def on_fit_start(self, trainer, module):
        self.before = {n: p.detach().clone() for n, p in module.student.named_parameters() if "lora_" in n}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.started)
        self.totals.append(dict(outputs["result"].record.totals))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step == 0:  # the first step's gradients, as the optimizer gets them
            self.gradients = {n: p.grad.detach().float().clone() for n, p in module.student.named_parameters() if p.grad is not None}


def train(sizes: dict, accelerator: str, root: Path, method: str = "trd", steps: int | None = None, packing: str = "auto",
          fsdp: bool = False, lora: bool = True, streaming: bool = False, gradient_clip_val: float | None = 1.0):
    """A few optimizer steps of ``method`` on the demo data, with random-weight models built from ``sizes``."""
    from lightning.pytorch import Trainer, seed_everything

    from trd_lightning.data import PromptDataModule
    from trd_lightning.models import LoRA, ModelSpec, Sharding
    from trd_lightning.module import DistillationModule
    from trd_lightning.refiners import TeacherRewrite
    from trd_lightning.rollout import HFEngine, Sampling
    from trd_lightning.strategy import FSDP2Strategy
    from trd_lightning.teachers import SeparateTeacher

    seed_everything(0, verbose=False)
    sampling = Sampling(temperature=1.0, max_new_tokens=sizes["new_tokens"])
    student = ModelSpec(config=sizes["student"], tokenizer="demo:tokenizer", dtype="bfloat16" if lora else "float32",
                        lora=LoRA(r=sizes["lora_r"], alpha=2 * sizes["lora_r"]) if lora else None, attn_implementation=sizes["attention"])
    module = DistillationModule(
        student=student,
        teacher=SeparateTeacher(ModelSpec(config=sizes["teacher"], tokenizer="demo:tokenizer", dtype="bfloat16",
                                          attn_implementation=sizes["attention"])),
        refiner=TeacherRewrite(template="demo_refine", sampling=sampling) if method == "trd" else None,
        engine=HFEngine(batch_size=64), sampling=sampling, optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
        max_tokens_per_micro_batch=sizes["budget"], packing=packing, gradient_clip_val=gradient_clip_val, log_samples_every=0,
        diagnostics_every=0, pivot_tokens=[], export_student=fsdp, max_context_tokens=1024,
        sharding=Sharding(param_dtype="bfloat16", reduce_dtype="float32"), streaming=streaming,
    )
    data = PromptDataModule(train_path="demo:data/train.jsonl", val_path="demo:data/val.jsonl", prompt_template="demo_student",
                            batch_size=sizes["prompts"], tokenizer=module.tokenizer)
    meter = StepMeter()
    trainer = Trainer(accelerator=accelerator, devices=1, precision="bf16-mixed", max_steps=steps or sizes["steps"],
                      strategy=FSDP2Strategy(save_distributed_checkpoint=False) if fsdp else "auto",
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[meter], default_root_dir=str(root),
                      inference_mode=not fsdp)
    trainer.fit(module, datamodule=data)
    return module, meter


def check_steps(sizes: dict, accelerator: str, root: Path, on_gpu: bool) -> None:
    from trd_lightning.memory_plan import build_plan

    for method in ("trd", "opd"):
        with Check(f"{method.upper()} steps: bf16 compute, fp32 LoRA, HF engine") as check:
            device_peak_reset(on_gpu)
            module, meter = train(sizes, accelerator, root / method, method)
            peak = device_peak(on_gpu)
            after = {n: p.detach() for n, p in module.student.named_parameters() if "lora_" in n}
            moved = sum(int((after[n] != meter.before[n]).sum()) for n in after) / sum(p.numel() for p in after.values())
            dtypes = {str(p.dtype).removeprefix("torch.") for p in after.values()}
            losses = [t.get("loss", float("nan")) for t in meter.totals]
            # All entries, or nearly: lora_B starts at zero, so a few lora_A entries may still have ~0 gradient after
            # the first steps; adapters stored in bf16 move about 2%.
            ok = moved >= 0.99 and dtypes == {"float32"} and all(l == l for l in losses)  # noqa: E741 (NaN check)
            check.record(ok, f"{len(meter.seconds)} steps at lr {LR:g}: {moved:.1%} of adapter entries moved ({', '.join(dtypes)}); "
                             f"{1000 * sum(meter.seconds[1:]) / max(1, len(meter.seconds) - 1):.0f} ms/step after the first; peak {gib(peak)}")
        with Check(f"{method.upper()} peak memory vs the memory plan") as check:
            if not on_gpu:
                check.record(None, "torch.cuda.max_memory_allocated needs a GPU")
            else:
                plan = build_plan(module.run_shape(torch.cuda.get_device_properties(0).total_memory))
                predicted = plan.phase("train") - sum(t.bytes for t in plan.terms if t.name.startswith("CUDA context"))
                check.record(abs(peak / predicted - 1) <= 0.3, f"measured {gib(peak)}, planned {gib(predicted)} (training phase, "
                                                               f"no runtime slack): {peak / predicted:.2f}x")


def check_packing(sizes: dict, accelerator: str, root: Path, device: torch.device) -> None:
    """One micro-batch of long-tailed sequence lengths (random-weight rollouts all run to the token limit, so a step's
    own would show no padding), packed into one row against right-padded rows, under the reference attention."""
    from trd_lightning.views import build_views

    with Check("packed vs padded micro-batch (reference attention), fwd+bwd") as check:
        module, _ = train(sizes, accelerator, root / "pack", "opd", steps=1)
        module.to(device)  # Lightning moves the module to the CPU after fit
        generator = torch.Generator().manual_seed(0)
        count, longest, vocab = 2 * sizes["prompts"], 4 * sizes["new_tokens"], len(module.tokenizer)
        lengths = (longest * torch.rand(count, generator=generator) ** 2).long().clamp(min=1).tolist()  # long-tailed
        contexts = [torch.randint(0, vocab, (24,), generator=generator).tolist() for _ in range(count)]
        targets = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
        real = sum(len(c) + len(t) for c, t in zip(contexts, targets))
        measured = {}
        for packed in (False, True):
            views = build_views(contexts, contexts, targets, module.tokenizer.pad_token_id, (packed, packed))
            times = []
            for _ in range(3):  # the first is warm-up
                start = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out, _ = module.distill(views)
                out.loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            module.student.zero_grad(set_to_none=True)
            measured[packed] = (real / views.student.processed_tokens, 1000 * min(times[1:]), float(out.loss))
        attention = str(module.student.get_base_model().config._attn_implementation)
        (pad_ratio, pad_ms, pad_loss), (pack_ratio, pack_ms, pack_loss) = measured[False], measured[True]
        same = abs(pack_loss - pad_loss) <= 2e-2 * max(1.0, abs(pad_loss))  # bf16 compute
        check.record(same and pack_ratio > pad_ratio,
                     f"{attention}, {count} sequences: real/processed {pad_ratio:.3f} padded, {pack_ratio:.3f} packed; "
                     f"{pad_ms:.0f} vs {pack_ms:.0f} ms; loss {pad_loss:.5f} vs {pack_loss:.5f}")


def check_divergence(sizes: dict, device: torch.device, on_gpu: bool) -> None:
    from trd_lightning.losses import Divergence

    shape = sizes["divergence"]
    tokens, hidden, vocab = shape["tokens"], shape["hidden"], shape["vocab"]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    def inputs():  # the same tensors for every implementation
        generator = torch.Generator().manual_seed(0)
        h = torch.randn(tokens, hidden, generator=generator).to(device, dtype).requires_grad_()
        w = (torch.randn(vocab, hidden, generator=generator) * hidden**-0.5).to(device, dtype).requires_grad_()
        h_t = torch.randn(tokens, hidden, generator=generator).to(device, dtype)
        w_t = (torch.randn(vocab, hidden, generator=generator) * hidden**-0.5).to(device, dtype)
        return h, w, h_t, w_t

    def dense(h, w, h_t, w_t):  # generalized JSD at beta 0.5, written out
        log_p = (h @ w.T).float().log_softmax(-1)
        log_q = (h_t @ w_t.T).float().log_softmax(-1)
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), 0) - torch.log(torch.tensor(2.0, device=h.device))
        return 0.5 * ((log_q.exp() * (log_q - log_m)).sum(-1) + (log_p.exp() * (log_p - log_m)).sum(-1)).mean()

    def fused(h, w, h_t, w_t):
        targets = torch.zeros(tokens, dtype=torch.long, device=device)
        return Divergence(direction="jsd", beta=0.5, chunk_size=256)(h, w, h_t, w_t, targets, torch.tensor([tokens])).loss

    def liger(h, w, h_t, w_t):
        from liger_kernel.transformers import LigerFusedLinearJSD

        return LigerFusedLinearJSD(jsd_beta=0.5)(h, w, h_t, w_t)

    measured = {}
    for name, run in (("dense", dense), ("fused", fused), ("liger", liger)):
        if name == "liger" and not on_gpu:
            continue
        try:
            h, w, h_t, w_t = inputs()
            device_peak_reset(on_gpu)
            base = torch.cuda.memory_allocated() if on_gpu else 0
            start = time.perf_counter()
            loss = run(h, w, h_t, w_t)
            loss.backward()
            if on_gpu:
                torch.cuda.synchronize()
            peak = device_peak(on_gpu)
            measured[name] = (float(loss), time.perf_counter() - start, None if peak is None else peak - base)
        except ImportError as error:
            measured[name] = error
    with Check(f"fused vs dense JSD(0.5), V={vocab:,}, T={tokens:,}, fwd+bwd") as check:
        (d_loss, d_s, d_peak), (f_loss, f_s, f_peak) = measured["dense"], measured["fused"]
        close = abs(f_loss - d_loss) <= 1e-2 * max(1e-3, abs(d_loss))
        lean = f_peak is None or f_peak < d_peak
        check.record(close and lean, f"loss {d_loss:.5f} vs {f_loss:.5f}; {d_s * 1000:.0f} vs {f_s * 1000:.0f} ms; "
                                     f"peak above inputs {gib(d_peak)} vs {gib(f_peak)}")
    with Check("fused vs liger-kernel fused linear JSD(0.5)") as check:
        found = measured.get("liger")
        if found is None or isinstance(found, ImportError):
            check.record(None, "needs CUDA and liger-kernel" if found is None else f"liger-kernel not installed ({found})")
        else:
            l_loss, l_s, l_peak = found
            check.record(abs(l_loss - f_loss) <= 1e-2 * max(1e-3, abs(l_loss)),
                         f"loss {l_loss:.5f} vs ours {f_loss:.5f}; {l_s * 1000:.0f} vs {f_s * 1000:.0f} ms; peak {gib(l_peak)} vs {gib(f_peak)}")


def check_fsdp2(sizes: dict, accelerator: str, root: Path) -> None:
    from transformers import AutoModelForCausalLM

    with Check("FSDP2, one process (ModelParallelStrategy): a step, then export") as check:
        module, meter = train(sizes, accelerator, root / "fsdp", "opd", steps=1, fsdp=True, lora=False)
        exported = AutoModelForCausalLM.from_pretrained(root / "fsdp" / "student_hf")
        expected = sum(p.numel() for p in module.student.parameters())
        loaded = sum(p.numel() for p in exported.parameters())
        check.record(loaded == expected and len(meter.seconds) == 1,
                     f"1 step in {meter.seconds[0]:.1f} s; exported student_hf loads with {loaded:,} parameters (trained {expected:,})")


def check_streaming(sizes: dict, accelerator: str, root: Path) -> None:
    with Check("streaming vs synchronous TRD step: loss and gradients") as check:
        # Clipping off: both steps' gradients would be clipped to the same norm, which would hide a wrong scale.
        _, sync = train(sizes, accelerator, root / "sync", "trd", steps=1, gradient_clip_val=None)
        _, streamed = train(sizes, accelerator, root / "streaming", "trd", steps=1, streaming=True, gradient_clip_val=None)
        loss, streamed_loss = sync.totals[0]["loss"], streamed.totals[0]["loss"]
        a = torch.cat([g.flatten() for g in sync.gradients.values()])
        b = torch.cat([streamed.gradients[n].flatten() for n in sync.gradients])
        cosine, scale = float(torch.nn.functional.cosine_similarity(a, b, dim=0)), float(b.norm() / a.norm())
        # bf16 compute: micro-batches cut differently round differently, so the figures agree to bf16's precision
        ok = abs(streamed_loss / loss - 1) < 1e-2 and cosine > 0.999 and abs(scale - 1) < 1e-2
        check.record(ok, f"loss {loss:.5f} vs {streamed_loss:.5f}; gradients: cosine {cosine:.6f}, norm ratio {scale:.5f}; "
                         f"step {sync.seconds[0]:.2f} s vs {streamed.seconds[0]:.2f} s ({streamed.totals[0]['micro_batches']:.0f} micro-batches)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the same code path)")
    args = parser.parse_args()
    on_gpu = not args.cpu
    if on_gpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --cpu for the tiny CPU version")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sizes, accelerator = (GPU, "gpu") if on_gpu else (CPU, "cpu")
    device = torch.device("cuda" if on_gpu else "cpu")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        root = Path(folder)
        check_steps(sizes, accelerator, root, on_gpu)
        check_packing(sizes, accelerator, root, device)
        check_divergence(sizes, device, on_gpu)
        check_fsdp2(sizes, accelerator, root)
        check_streaming(sizes, accelerator, root)

    where = torch.cuda.get_device_name() if on_gpu else "CPU (tiny sizes)"
    print(f"\ngpu_check on {where}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s")
    width = max(len(name) for name, _, _ in Check.rows)
    for name, status, figure in Check.rows:
        print(f"{name:<{width}}  {status:<4}  {figure}")
    failed = [name for name, status, _ in Check.rows if status == "FAIL"]
    print(f"gpu_check: {len(Check.rows)} checks, " + (f"{len(failed)} failed: {'; '.join(failed)}" if failed else "none failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
