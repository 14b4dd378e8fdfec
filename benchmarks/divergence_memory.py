"""Peak memory and time of one forward+backward of the full-vocabulary forward and reverse KL,
the library's fused, chunked divergence against a naive dense implementation.

    python benchmarks/divergence_memory.py [--vocab 151936] [--tokens 2048] [--hidden 1024] [--chunk 256]

Both get the same inputs: the student's last hidden states [T, H] and LM head [V, H] (trainable),
the teacher's hidden states and head (frozen). The naive version builds both models' logits,
takes log_softmax of both, and sums. Each measurement runs in a fresh process; "peak" is the
process's peak resident memory above what it held once the inputs existed.
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def naive(direction: str, h, w, h_t, w_t):
    log_p = (h @ w.T).log_softmax(-1)
    with torch.no_grad():
        log_q = (h_t @ w_t.T).log_softmax(-1)
    if direction == "forward":
        return (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def measure(impl: str, direction: str, vocab: int, tokens: int, hidden: int, chunk: int) -> dict:
    from trd_lightning.losses import Divergence

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * hidden**-0.5).requires_grad_()
    h_t, w_t = torch.randn(tokens, hidden), torch.randn(vocab, hidden) * hidden**-0.5
    targets, lengths = torch.randint(0, vocab, (tokens,)), torch.tensor([tokens])
    base = rss_bytes()
    start = time.perf_counter()
    if impl == "library":
        loss = Divergence(direction=direction, chunk_size=chunk)(h, w, h_t, w_t, targets, lengths).loss
    else:
        loss = naive(direction, h, w, h_t, w_t)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"seconds": seconds, "peak_bytes": peak - base, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tokens", type=int, default=2_048)
    parser.add_argument("--hidden", type=int, default=1_024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "DIRECTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.vocab, args.tokens, args.hidden, args.chunk)
    if args.one:
        print(json.dumps(measure(*args.one, *shape)))
        return
    print(f"V={args.vocab:,} T={args.tokens:,} H={args.hidden:,} batch 1, chunk {args.chunk}, "
          f"{torch.get_num_threads()} threads; forward+backward, peak memory above the inputs")
    print(f"  {'':<16}{'naive s':>9}{'naive GB':>10}{'library s':>11}{'library GB':>12}{'time':>8}{'memory':>8}")
    for direction in ("forward", "reverse"):
        result = {}
        for impl in ("naive", "library"):
            out = subprocess.run([sys.executable, __file__, *sum(([f"--{k}", str(v)] for k, v in
                                  zip(("vocab", "tokens", "hidden", "chunk"), shape)), []), "--one", impl, direction],
                                 capture_output=True, text=True, check=True)
            result[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        n, lib = result["naive"], result["library"]
        assert abs(n["loss"] - lib["loss"]) < 1e-3 * max(1.0, abs(n["loss"])), (n["loss"], lib["loss"])
        print(f"  {direction + ' KL':<16}{n['seconds']:>9.2f}{n['peak_bytes'] / 1e9:>10.2f}{lib['seconds']:>11.2f}"
              f"{lib['peak_bytes'] / 1e9:>12.2f}{lib['seconds'] / n['seconds']:>7.2f}x{lib['peak_bytes'] / n['peak_bytes']:>7.1%}")
    print("  time and memory columns: library / naive (targets: memory <= 25%, time <= 1.00x)")


if __name__ == "__main__":
    main()
