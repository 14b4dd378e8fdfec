"""What one step measured, computed once from its record: logged only at the steps that measured it, and exactly what
a recount of the logged samples gives."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import fit_args, scalars
from trd_lightning.cli import main


@pytest.mark.slow
def test_a_metric_is_logged_only_at_the_steps_that_measured_it(tmp_path):
    main(fit_args("trd", tmp_path, "run", 4, "--model.init_args.diagnostics_every=3",  # the demo's own models and data
                  "--model.init_args.packing=always"))
    logged = scalars(tmp_path / "run" / "version_0")
    for tag in ("diag/teacher_ppl_y_o", "diag/pivot_permille_y_o", "time/diagnostics"):
        assert [step for step, _ in logged[tag]] == [0, 3], tag  # the extra teacher pass ran at steps 0 and 3 only
    for tag in ("train/loss", "diag/teacher_ppl_y_r", "step/micro_batches", "step/real_token_ratio", "time/refine"):
        assert [step for step, _ in logged[tag]] == [0, 1, 2, 3], tag
    assert all(value == 1.0 for _, value in logged["step/real_token_ratio"])  # packed: no padding computed
    # The chain verifier checks every step: a valid derivation has the right answer, so over the rewrites
    # accuracy = step-valid + answer-patched (right answer, a wrong step), at every step.
    for tag in ("rollout/steps_valid", "refine/steps_valid_y_r", "refine/answer_patched"):
        assert [step for step, _ in logged[tag]] == [0, 1, 2, 3], tag
    for (step, accuracy), (_, valid), (_, patched) in zip(logged["refine/accuracy_y_r"], logged["refine/steps_valid_y_r"],
                                                          logged["refine/answer_patched"]):
        assert accuracy == pytest.approx(valid + patched, abs=1e-6), step
    # fail->pass is measured over the rows whose rollout failed: present exactly where some did.
    failed = [step for step, value in logged["refine/accuracy_y_o"] if value < 1.0]
    assert [step for step, _ in logged["refine/fail_to_pass"]] == failed


def chain_steps_right(problem: str, response: str) -> bool:
    """An independent step check for the demo's chains: walk the problem's operations, compare each written step."""
    value, written = int(problem[0]), "".join(response.split()).split(";")
    for k in range(1, len(problem), 2):
        op, operand = problem[k], int(problem[k + 1])
        result = {"+": value + operand, "-": value - operand, "*": value * operand}[op] % 10
        if not written or written.pop(0) != f"{value}{op}{operand}={result}":
            return False
        value = result
    return written == [f"a:{value}"]


@pytest.mark.slow
def test_step_level_metrics_agree_with_a_recount_of_the_logged_samples(tmp_path):
    """TRD on OPSD, every row of every step in the samples file: the logged step validity, answer-patched share and
    coherence means are exactly what a recount of those rows gives."""
    main(fit_args("trd_opsd", tmp_path, "run", 3, "--model.init_args.diagnostics_every=1", "--model.init_args.log_samples_every=1"))
    run = tmp_path / "run" / "version_0"
    logged = {tag: dict(values) for tag, values in scalars(run).items()}
    samples = [json.loads(line) for line in (run / "samples" / "rank0.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [0, 1, 2] and len(samples) == 3 * 4
    for step in range(3):
        rows = [s for s in samples if s["step"] == step]
        rewrites = [s for s in rows if s["y_r"] is not None]
        assert rewrites, f"step {step}: no rewrite to check"
        valid = [chain_steps_right(s["problem"], s["y_r"]) for s in rewrites]
        right = ["a:" in s["y_r"] and s["y_r"].rpartition("a:")[2].split()[:1] == [s["answer"]] for s in rewrites]
        assert logged["rollout/steps_valid"][step] == pytest.approx(np.mean([chain_steps_right(s["problem"], s["y_o"]) for s in rows]))
        assert logged["refine/steps_valid_y_r"][step] == pytest.approx(np.mean(valid))
        assert logged["refine/answer_patched"][step] == pytest.approx(np.mean([a and not v for a, v in zip(right, valid)]))
        gaps = [s["y_r_logprob_plain"] - s["y_r_logprob_refine"] for s in rewrites]
        assert logged["refine/coherence_gap"][step] == pytest.approx(np.mean(gaps), abs=1e-6)
        assert logged["refine/y_r_logprob_refine_prompt"][step] == pytest.approx(np.mean([s["y_r_logprob_refine"] for s in rewrites]), abs=1e-6)
        assert all(s["y_r_logprob_refine"] < 0 and s["y_r_logprob_plain"] < 0 for s in rewrites)
