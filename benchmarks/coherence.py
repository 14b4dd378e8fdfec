"""Does the coherence signal separate answer-patched rewrites from valid ones? TRD on OPSD on the demo.

    python benchmarks/coherence.py                          # the shipped self-teacher and a slips-only one, 60 steps
    python benchmarks/coherence.py --steps 100 --out runs/coherence

The signal (``refine/coherence_gap``, logged on the diagnostics schedule) is, per rewrite y_r, the teacher's mean
log-probability per token of y_r in the student's plain prompt (the problem alone) minus the same in the refine
prompt it was written in (problem, reference, attempt). It needs no step checker, so it also serves math on real
models. On the demo the chain verifier says what each rewrite really is, so the two can be compared.

Answer-patched rewrites (right answer, a wrong step) need a self-teacher that writes them. The demo student as built
before issue #17 did: its refine-with-reference skill had seen value slips only, with the reference before the
attempt in its prompt. This script rebuilds that student (``configs/demo/sft_student.yaml`` with the old settings,
``SLIPS_ONLY``; about 5 minutes, kept in ``--out`` for later runs) unless ``--slips-only-student`` names one,
and runs TRD on OPSD with each self-teacher for ``--steps`` steps, every step
diagnosed and sampled (``diagnostics_every: 1``, ``log_samples_every: 1``). It prints, per self-teacher and per
kind of rewrite with a right answer (step-valid, answer-patched): the count, the quantiles of the gap and of the two
log-probabilities, and the AUROC of the negated gap as a detector of answer-patched rewrites.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def run_cli(args: list[str]) -> None:
    from trd_lightning.cli import TRDCLI

    TRDCLI(args=args)


# The demo student's build before issue #17: value slips only, and the reference before the attempt in the prompt.
SLIPS_ONLY = {"data.init_args.corruptions": "[slip]", "data.init_args.num_examples": "64000", "trainer.max_steps": "950",
              "data.init_args.mixture": "{plain: 1.0, privileged: 1.0, refine_reference: 1.0}"}
SLIPS_ONLY_TEMPLATE = "{problem}\nreference:{solution}\nattempt:{attempt}\nfix:"


def build_slips_only_student(out: Path) -> Path:
    target = out / "slips_only_student"
    if not (target / "model.safetensors").exists():
        run_cli(["fit", f"--config={ROOT / 'configs/demo/sft_student.yaml'}", *(f"--{key}={value}" for key, value in SLIPS_ONLY.items()),
                 f"--data.init_args.templates={{refine_reference: {template_file(out)}}}", f"--model.init_args.export_dir={target}",
                 f"--trainer.logger.init_args.save_dir={out}", "--trainer.logger.init_args.name=sft_slips_only",
                 "--trainer.enable_progress_bar=false"])
    return target


def template_file(out: Path) -> Path:
    path = out / "slips_only_refine_reference.txt"
    path.write_text(SLIPS_ONLY_TEMPLATE)
    return path


def train(student: str, name: str, opts, *extra: str) -> list[dict]:
    """TRD on OPSD with this self-teacher; every row of every step, from the samples file."""
    run = opts.out / name / "run"
    shutil.rmtree(run, ignore_errors=True)  # an earlier run's samples would be read with these
    run_cli(["fit", f"--config={ROOT / 'configs/demo/trd_opsd.yaml'}", f"--model.init_args.student.path={student}", *extra,
             f"--trainer.max_steps={opts.steps}", "--model.init_args.diagnostics_every=1", "--model.init_args.log_samples_every=1",
             "--model.init_args.export_student=false", "--validate_before_fit=false", "--trainer.val_check_interval=100000",
             "--trainer.callbacks.init_args.every_n_train_steps=100000", f"--trainer.logger.init_args.save_dir={opts.out}",
             f"--trainer.logger.init_args.name={name}", "--trainer.logger.init_args.version=run", "--trainer.enable_progress_bar=false"])
    return [json.loads(line) for line in (run / "samples" / "rank0.jsonl").read_text().splitlines()]


def quantiles(values: list[float]) -> str:
    if len(values) < 2:
        return " ".join(f"{v:+.3f}" for v in values) or "—"
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return " ".join(f"{cuts[round(q * 100) - 1]:+.3f}" for q in QUANTILES)


def auroc(positives: list[float], negatives: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney U statistic, normalised)."""
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def report(name: str, samples: list[dict]) -> dict:
    rewrites = [s for s in samples if s["y_r"] is not None and "y_r_logprob_plain" in s and s["y_r_correct"]]
    groups = {"step-valid": [s for s in rewrites if s["y_r_steps_valid"]], "answer-patched": [s for s in rewrites if not s["y_r_steps_valid"]]}
    print(f"\n{name}: {len(samples)} rows over {len({s['step'] for s in samples})} steps; rewrites with a right answer: {len(rewrites)}")
    print(f"  {'kind':<15} {'count':>6}  quantiles {', '.join(f'p{round(q * 100)}' for q in QUANTILES)}")
    summary = {}
    for kind, rows in groups.items():
        gap = [s["y_r_logprob_plain"] - s["y_r_logprob_refine"] for s in rows]
        print(f"  {kind:<15} {len(rows):>6}  gap (plain - refine)    {quantiles(gap)}")
        print(f"  {'':<15} {'':>6}  log p(y_r | refine)     {quantiles([s['y_r_logprob_refine'] for s in rows])}")
        print(f"  {'':<15} {'':>6}  log p(y_r | plain)      {quantiles([s['y_r_logprob_plain'] for s in rows])}")
        summary[kind] = {"count": len(rows), "gap": gap}
    score = auroc([-g for g in summary["answer-patched"]["gap"]], [-g for g in summary["step-valid"]["gap"]])
    print(f"  AUROC of -gap for answer-patched against step-valid: {'—' if score is None else f'{score:.3f}'}")
    return {"groups": summary, "auroc": score}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/coherence"))
    parser.add_argument("--slips-only-student", help="a self-teacher that writes answer-patched rewrites (default: rebuilt)")
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    slips_only = opts.slips_only_student or str(build_slips_only_student(opts.out))
    results = {
        "shipped self-teacher (demo:student)": report("shipped self-teacher (demo:student)", train("demo:student", "shipped", opts)),
        "slips-only self-teacher": report("slips-only self-teacher", train(
            slips_only, "slips_only", opts, f"--model.init_args.refiner.init_args.template={template_file(opts.out)}")),
    }
    (opts.out / "coherence.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
