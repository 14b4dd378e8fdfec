"""TRD against the token-level baselines on the embedded demo: same budget, seeds and data for every method.

    python benchmarks/compare_methods.py                 # 8 methods x 3 seeds, 300 steps each, 2 runs at a time
    python benchmarks/compare_methods.py --quick         # 1 seed, 30 steps, 100 test problems: checks that all run
    python benchmarks/compare_methods.py --report        # the table again, from an earlier run's files in --out

Runs go ``--jobs`` at a time, each in its own process with ``cores / jobs`` torch threads: the demo's tiny
models leave a second thread mostly idle, so two one-thread runs finish sooner than two two-thread runs in turn.
Each run is `trd fit` with a demo config (and a baseline overlay), validated every ``--val-every`` steps,
then `trd test` of its last checkpoint: ``--n`` samples per held-out problem at temperature 0.6, scored as
Avg@n and Pass@k. It prints, and writes to ``<out>/comparison.{md,json}``:

- the table of test metrics, mean ± std over the seeds, with the training diagnostics (y_o and y_r accuracy,
  fail→pass, where the teacher first disagrees with y_o) averaged over each run's steps;
- how often the untrained student's wrong rollouts fail early (first wrong step in the first third);
- ``<out>/accuracy_over_steps.png``: validation accuracy against steps, one line per method (mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# (name, configs): every method is a demo config, with a baseline overlay for the token-level variants.
METHODS = [
    ("OPD reverse KL", ["configs/demo/opd.yaml"]),
    ("OPD reverse KL top-K", ["configs/demo/opd.yaml", "configs/demo/baselines/rkl_topk.yaml"]),
    ("OPD forward KL", ["configs/demo/opd.yaml", "configs/demo/baselines/fkl.yaml"]),
    ("OPD forward KL clip 0.1", ["configs/demo/opd.yaml", "configs/demo/baselines/fkl_clip.yaml"]),
    ("TRD", ["configs/demo/trd.yaml"]),
    ("TRD best-of-4", ["configs/demo/trd.yaml", "configs/demo/refiners/best_of_n.yaml"]),
    ("OPSD", ["configs/demo/opsd.yaml"]),
    ("TRD on OPSD", ["configs/demo/trd_opsd.yaml"]),
]
# Training diagnostics averaged over a run's logged steps (TensorBoard tag, column). The demo logs no pivot
# mass: its chain task has no hesitation words (pivot_tokens: [] in the demo configs).
DIAGNOSTICS = [
    ("rollout/accuracy", "acc y_o"),
    ("rollout/steps_valid", "steps ok y_o"),
    ("refine/accuracy_y_r", "acc y_r"),
    ("refine/steps_valid_y_r", "steps ok y_r"),
    ("refine/answer_patched", "answer-patched y_r"),
    ("refine/fail_to_pass", "fail→pass"),
    ("refine/pass_to_fail", "pass→fail"),
    ("diag/first_disagreement_y_o", "1st disagree y_o"),
]
ROOT = Path(__file__).resolve().parents[1]


def slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace(".", "")


def run_cli(args: list[str]) -> None:
    """One `trd` command in this process (the imports are paid once); a failure stops the comparison."""
    from trd_lightning.cli import TRDCLI

    TRDCLI(args=args)


def common(configs: list[str], out: Path, name: str, version: str) -> list[str]:
    args = [f"--config={ROOT / c}" for c in configs]
    return args + [
        f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={name}",
        f"--trainer.logger.init_args.version={version}", "--trainer.enable_progress_bar=false",
    ]


def test_args(opts) -> list[str]:
    """Held-out evaluation: n samples per problem at temperature 0.6, Avg@n and Pass@1/Pass@n."""
    sampling = f"{{greedy: false, temperature: 0.6, top_p: 0.95, top_k: 20, max_new_tokens: 48, n: {opts.n}}}"
    args = [f"--model.init_args.eval_sampling={sampling}", f"--model.init_args.pass_k=[1, {opts.n}]"]
    return args + ([f"--trainer.limit_test_batches={opts.test_batches}"] if opts.test_batches else [])


def train_and_test(configs: list[str], name: str, seed: int, opts) -> dict:
    """`trd fit` then `trd test` of the last checkpoint; returns the test row and the run's scalars."""
    print(f"=== {name}, seed {seed}: started at {time.strftime('%X')}", flush=True)
    version = f"seed{seed}"
    fresh(opts.out / name / version, opts.out / name / f"{version}_test")
    fit = ["fit", *common(configs, opts.out, name, version), f"--seed_everything={seed}",
           f"--trainer.max_steps={opts.steps}", f"--trainer.val_check_interval={opts.val_every}",
           f"--trainer.callbacks.init_args.every_n_train_steps={opts.steps}", "--model.init_args.export_student=false"]
    started = time.perf_counter()
    run_cli(fit)
    fit_seconds = time.perf_counter() - started
    checkpoint = opts.out / name / version / "checkpoints" / "last.ckpt"
    test = ["test", *common(configs, opts.out, name, f"{version}_test"), f"--seed_everything={seed}",
            *test_args(opts), "--model.init_args.evaluate_teacher=false", f"--ckpt_path={checkpoint}"]
    run_cli(test)
    results = json.loads((opts.out / name / f"{version}_test" / "results.json").read_text())["results"]
    row = next(r for r in results if r["who"] == "student")
    return {"test": row, "scalars": read_scalars(opts.out / name / version), "fit_seconds": fit_seconds}


def fresh(*directories: Path) -> None:
    """Remove an earlier run's logs: its event files would be read with the new ones, and its last.ckpt tested."""
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def reference_rows(opts) -> list[dict]:
    """The teacher and the untrained student under the same test protocol."""
    fresh(opts.out / "reference" / "untrained")
    run_cli(["test", *common(["configs/demo/opd.yaml"], opts.out, "reference", "untrained"), "--seed_everything=0",
             *test_args(opts)])
    return json.loads((opts.out / "reference" / "untrained" / "results.json").read_text())["results"]


def prefix_failures(opts) -> dict:
    """The untrained student's rollouts on the test problems at the training temperature: among the wrong
    ones, how many have their first wrong step in the first third of the solution."""
    import torch
    from lightning.pytorch import seed_everything

    from trd_lightning.cli import TRDCLI
    from trd_lightning.data.chain import first_error_step, parse_problem
    from trd_lightning.rollout.base import STUDENT, Sampling

    seed_everything(0)
    cli = TRDCLI(args=["--config", str(ROOT / "configs/demo/opd.yaml"), "--trainer.logger=false"], run=False)
    module, data = cli.model, cli.datamodule
    module.configure_model()
    data.setup("test")
    sampling = Sampling(temperature=1.0, max_new_tokens=48, n=4)
    firsts, total, steps = [], 0, None
    with torch.no_grad():
        for index, batch in enumerate(data.test_dataloader()):
            if opts.test_batches and index >= opts.test_batches:
                break
            rollouts = module.engine.generate(STUDENT, module.student, batch.prompt_ids, sampling)
            for i, text in zip(rollouts.prompt_index, rollouts.texts):
                problem = parse_problem(batch.problem[i])
                steps = len(problem.ops)
                total += 1
                if not module.verifier.score(text, batch.answer[i]):
                    first = first_error_step(problem, text)
                    firsts.append(steps if first is None else first)  # a wrong answer after right steps: the answer
    early = sum(1 for f in firsts if f / steps < 1 / 3)
    return {
        "rollouts": total, "wrong": len(firsts), "steps": steps,
        "first_wrong_step_histogram": {str(s + 1): firsts.count(s) for s in range(steps + 1)},
        "early_fraction": early / max(len(firsts), 1),
    }


def load_report(opts) -> tuple[dict, list[dict], dict[str, list[dict]], float]:
    """What a finished comparison wrote to ``--out``, with each run's scalars read again from its logs."""
    saved = json.loads((opts.out / "comparison.json").read_text())
    runs = {}
    for name, results in saved["runs"].items():
        seeds = [int(s) for s in saved["options"]["seeds"].strip("[]").split(",")]
        runs[name] = [{**r, "scalars": read_scalars(opts.out / slug(name) / f"seed{seed}")} for r, seed in zip(results, seeds)]
    return saved["prefix_failures"], saved["reference"], runs, saved.get("wall_seconds", float("nan"))


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def run_mean(scalars: dict, tag: str) -> float | None:
    points = scalars.get(tag)
    return statistics.mean(v for _, v in points) if points else None


def table(runs: dict[str, list[dict]], reference: list[dict], n: int) -> tuple[list[str], list[list[str]]]:
    metrics = [f"avg@{n}", "pass@1", f"pass@{n}", "steps_valid"]  # steps_valid: test samples right at every step
    header = ["method", f"avg@{n}", "pass@1", f"pass@{n}", "steps ok (test)", *(column for _, column in DIAGNOSTICS), "fit s/run"]
    rows = []
    for who in ("teacher", "student"):
        row = next(r for r in reference if r["who"] == who)
        rows.append([f"({'teacher' if who == 'teacher' else 'untrained student'})", *(f"{row[m]:.3f}" if m in row else "—" for m in metrics),
                     *("—" for _ in DIAGNOSTICS), "—"])
    for name, results in runs.items():
        cells = [mean_std([r["test"][m] for r in results if m in r["test"]]) for m in metrics]
        for tag, _ in DIAGNOSTICS:
            cells.append(mean_std([v for r in results if (v := run_mean(r["scalars"], tag)) is not None]))
        rows.append([name, *cells, f"{statistics.mean(r['fit_seconds'] for r in results):.0f}"])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, results in runs.items():
        curves = [dict(r["scalars"].get("val/student/avg@1", [])) for r in results]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        axes.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], marker="o", label=name)
    axes.set(xlabel="training step", ylabel="validation accuracy (greedy)", title="Demo: accuracy over steps")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_all(methods, opts) -> tuple[dict, list[dict], dict[str, list[dict]]]:
    """Every (method, seed) run, the reference rows and the prefix-failure count, ``opts.jobs`` at a time;
    the slowest runs (the rewriting ones) are started first."""
    threads = max(1, (os.cpu_count() or 1) // opts.jobs)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the workers before torch loads there
    runs = [(name, configs, seed) for seed in opts.seeds for name, configs in methods]
    runs.sort(key=lambda run: "TRD" not in run[0])
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state forked from this one
    with ProcessPoolExecutor(opts.jobs, mp_context=context, initializer=set_threads, initargs=(threads,)) as pool:
        failures, reference = pool.submit(prefix_failures, opts), pool.submit(reference_rows, opts)
        futures = [pool.submit(train_and_test, configs, slug(name), seed, opts) for name, configs, seed in runs]
        results: dict[str, list[dict]] = {name: [] for name, _ in methods}
        for (name, _, seed), future in sorted(zip(runs, futures), key=lambda item: item[0][2]):
            results[name].append(future.result())
        return failures.result(), reference.result(), results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 steps, 100 test problems, n=2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--n", type=int, default=8, help="test samples per problem")
    parser.add_argument("--test-batches", type=int, default=0, help="limit test batches (100 problems each); 0: all 200")
    parser.add_argument("--methods", nargs="+", help="a subset, by name")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--report", action="store_true", help="no training: rebuild the report from --out")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.seeds, opts.steps, opts.val_every, opts.n, opts.test_batches = opts.seeds[:1], 30, 15, 2, 1
    methods = [m for m in METHODS if not opts.methods or m[0] in opts.methods]
    if opts.methods and len(methods) != len(opts.methods):
        parser.error(f"unknown method in {opts.methods}; choose from {[name for name, _ in METHODS]}")
    opts.out = opts.out.resolve()
    started = time.perf_counter()

    if opts.report:
        failures, reference, runs, wall = load_report(opts)
    else:
        failures, reference, runs = run_all(methods, opts)
        wall = time.perf_counter() - started

    header, rows = table(runs, reference, opts.n)
    report = [
        f"steps {opts.steps}, seeds {opts.seeds}, test problems {100 * opts.test_batches or 200}, n {opts.n}, "
        f"wall {wall:.0f}s", "", markdown(header, rows), "",
        f"Untrained student, {failures['rollouts']} rollouts at T=1: {failures['wrong']} wrong; "
        f"{failures['early_fraction']:.1%} of those fail in the first third of the solution "
        f"(first wrong step of {failures['steps']}, then the answer: {failures['first_wrong_step_histogram']}).",
    ]
    print("\n" + "\n".join(report))
    (opts.out / "comparison.md").write_text("\n".join(report) + "\n")
    (opts.out / "comparison.json").write_text(json.dumps({
        "options": {k: str(v) for k, v in vars(opts).items()}, "wall_seconds": wall, "prefix_failures": failures, "reference": reference,
        "runs": {name: [{"test": r["test"], "fit_seconds": r["fit_seconds"]} for r in results] for name, results in runs.items()},
        "header": header, "rows": rows,
    }, indent=2))
    plot(runs, opts.out / "accuracy_over_steps.png")

    # --quick asserts only that every method ran and produced metrics.
    missing = [name for name, results in runs.items() for r in results
               if f"avg@{opts.n}" not in r["test"] or "val/student/avg@1" not in r["scalars"] or "train/loss" not in r["scalars"]]
    if missing or len(runs) != len(methods):
        print(f"missing metrics for {missing or 'some methods'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
