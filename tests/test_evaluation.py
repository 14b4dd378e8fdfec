"""Evaluation and diagnostics: Pass@k and Avg@n, math verification, prefix-failure diagnostics with
known values, and exact metrics under 2-process DDP."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from trd_lightning.data.chain import sample_problems
from trd_lightning.diagnostics import PositionProfile, first_disagreement, pivot_token_ids, trajectory_stats
from trd_lightning.metrics import SampledAccuracy, pass_at_k
from trd_lightning.scores import pivot_mass, token_stats
from trd_lightning.verifiers import AnswerParseError, ExactMatch, MathVerifier


def closed_form(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n, c, k", [(16, 0, 1), (16, 0, 16), (16, 16, 1), (16, 16, 16), (16, 3, 1), (16, 3, 4),
                                     (16, 3, 16), (16, 15, 2), (5, 2, 5), (1, 1, 1), (1, 0, 1), (100, 1, 10)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 16, 1) == 1.0 and pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_avg_and_pass_over_problems():
    metric = SampledAccuracy(n=4, ks=[1, 2, 4])
    metric.update([0, 4])
    metric.update([1])
    out = metric.compute()
    assert float(out["avg@4"]) == pytest.approx((0 + 1 + 0.25) / 3)
    assert float(out["pass@1"]) == pytest.approx((0 + 1 + 0.25) / 3)
    assert float(out["pass@2"]) == pytest.approx((0 + 1 + closed_form(4, 1, 2)) / 3)
    assert float(out["pass@4"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="correct count"):
        metric.update([5])
    with pytest.raises(ValueError, match="1 <= k <= n"):
        SampledAccuracy(n=4, ks=[8])


MATH_CASES = [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac12", True),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{x+1}", "1+x", True),
    ("\\boxed{(1,2)}", "(1, 2)", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("\\boxed{2^{10}}", "1024", True),
    ("\\boxed{-\\frac{1}{3}}", "-1/3", True),
    ("\\boxed{\\infty}", "\\infty", True),
    ("first \\boxed{3}, then on reflection \\boxed{4}", "4", True),  # the last box counts
    ("\\boxed{5}", "6", False),
    ("the answer is 5", "5", False),  # no box, no answer
    ("\\boxed{\\frac{2}{3}}", "0.67", False),
]


@pytest.mark.parametrize("response, answer, expected", MATH_CASES)
def test_math_verifier_answer_forms(response, answer, expected):
    assert MathVerifier().score(response, answer) is expected


@pytest.mark.parametrize("answer", ["???", "\\frac{", ""])
def test_unparsable_reference_answers_are_refused(answer):
    with pytest.raises(AnswerParseError, match="cannot parse"):
        MathVerifier().check_answer(answer)


def test_unparsable_answers_fail_before_compute(tmp_path, student_dir, teacher_dir):
    from lightning.pytorch import Trainer

    from trd_lightning.data import PromptDataModule
    from trd_lightning.models import ModelSpec
    from trd_lightning.module import DistillationModule
    from trd_lightning.teachers import SeparateTeacher

    rows = [{"problem": "1+1", "answer": "2", "solution": "2"}, {"problem": "2+2", "answer": "???", "solution": "4"}]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = DistillationModule(student=ModelSpec(path=student_dir), teacher=SeparateTeacher(ModelSpec(path=teacher_dir)),
                                verifier=MathVerifier(), pivot_tokens=[])
    data = PromptDataModule(test_path=str(path), prompt_template="demo_student", tokenizer=module.tokenizer)
    with pytest.raises(ValueError, match=r"test.jsonl:2: math-verify cannot parse the reference answer '\?\?\?'.*model.verifier"):
        Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path).test(module, datamodule=data)


def test_exact_match_reads_the_last_answer():
    verifier = ExactMatch()
    assert verifier.score("1+1=2;a:2", "2") and not verifier.score("a:2;a:3", "2") and not verifier.score("no answer", "2")
    with pytest.raises(ValueError, match="capture group"):
        ExactMatch(pattern="a:")


def test_first_disagreement_and_loss_share_on_known_values():
    # Two sequences: the teacher gives token 2 of the first p=0.01, and the second nothing under 0.05.
    probs = torch.tensor([0.9, 0.8, 0.01, 0.9, 0.5, 0.7, 0.6])
    lengths = torch.tensor([4, 3])
    loss = torch.tensor([1.0, 1.0, 4.0, 2.0, 1.0, 1.0, 1.0])
    assert first_disagreement(probs.log(), lengths, 0.05).tolist() == [2, -1]
    stats = trajectory_stats(lengths, probs.log(), 0.05, student_logprobs=torch.full((7,), math.log(0.5)), per_token_loss=loss)
    assert stats["disagreement_rate"] == pytest.approx(0.5)
    assert stats["first_disagreement"] == pytest.approx(2 / 4)
    assert stats["loss_after_disagreement"] == pytest.approx((4 + 2) / (1 + 1 + 4 + 2))
    assert stats["teacher_ppl"] == pytest.approx(math.exp(-probs.log().mean().item()))
    assert stats["student_ppl"] == pytest.approx(2.0)


def test_pivot_mass_and_token_stats_on_a_constructed_head(tokenizer):
    # A head whose logits make the distribution known: token 5 and 7 are pivots.
    hidden = torch.eye(4)
    head = torch.zeros(10, 4)
    head[5, 0] = math.log(9.0)  # row 0: p(5) = 9 / (9 + 9) = 0.5
    head[7, 1] = math.log(9.0)  # row 1: p(7) = 0.5
    targets = torch.tensor([5, 0, 7, 3])
    logprobs, lse = token_stats(hidden, head, None, targets, chunk_size=3)
    assert torch.allclose(lse, torch.log(torch.tensor([18.0, 18.0, 10.0, 10.0])))
    assert torch.allclose(logprobs.exp(), torch.tensor([0.5, 1 / 18, 0.1, 0.1]))
    mass = pivot_mass(hidden, head, None, lse, [5, 7])
    assert torch.allclose(mass, torch.tensor([0.5 + 1 / 18, 1 / 18 + 0.5, 0.2, 0.2]))
    stats = trajectory_stats(torch.tensor([4]), logprobs, 0.05, pivots=mass)
    assert stats["pivot_permille"] == pytest.approx(1000 * (0.5 + 1 / 18 + 1 / 18 + 0.5 + 0.4) / 4)


def test_pivot_words_map_to_single_tokens_only(tokenizer):
    with pytest.warns(UserWarning, match="no single-token spelling"):
        assert pivot_token_ids(tokenizer, ["Wait"]) == []  # the demo's byte tokenizer spells it in 4 tokens
    assert pivot_token_ids(tokenizer, ["W"]) == [tokenizer.convert_tokens_to_ids("W")]


def test_per_sample_values_are_means_over_samples_and_unknown_ones_refused():
    from trd_lightning.metrics import SampledAccuracy

    metric = SampledAccuracy(n=2, ks=[1])
    metric.update([2, 0], steps_valid=[1.0, 1.0, 0.0, 0.0])
    metric.update([1], steps_valid=[0.0, 1.0])
    assert float(metric.compute()["steps_valid"]) == pytest.approx(3 / 6)
    assert "tests_passed" not in metric.compute()
    with pytest.raises(ValueError, match="unknown per-sample value 'step_valid'"):
        metric.update([1], step_valid=[1.0, 0.0])


def test_position_profile_bins_by_relative_position():
    profile = PositionProfile(bins=2)
    profile.update(torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0, 40.0]), torch.tensor([2, 4]))
    # first half: 1 (of seq 1), 10, 20 (of seq 2); second half: 3, 30, 40
    assert profile.compute().tolist() == pytest.approx([(1 + 10 + 20) / 3, (3 + 30 + 40) / 3])


def run_test(args, cwd):
    return subprocess.run([sys.executable, "-m", "trd_lightning.cli", "test", *args], capture_output=True, text=True, cwd=cwd)


def test_ddp_metric_reduction_equals_one_process(tmp_path):
    """Five problems, greedy: two processes (3 + 2 problems, none repeated) report what one process reports."""
    problems = sample_problems(5, 5, seed=11)
    path = tmp_path / "five.jsonl"
    path.write_text("".join(json.dumps({"problem": p.text, "answer": p.answer, "solution": p.solution}) + "\n" for p in problems))
    results = {}
    for devices in (1, 2):
        args = ["--config", str(ROOT / "configs/demo/opd.yaml"), f"--data.init_args.test_path={path}", "--data.init_args.eval_batch_size=2",
                f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.logger.init_args.name=ddp{devices}",
                f"--trainer.devices={devices}", "--trainer.enable_progress_bar=false",
                *(["--trainer.strategy=ddp"] if devices > 1 else [])]
        done = run_test(args, ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        results[devices] = json.loads((tmp_path / f"ddp{devices}" / "version_0" / "results.json").read_text())
    single, double = results[1], results[2]
    assert [r["problems"] for r in single["results"]] == [5, 5] == [r["problems"] for r in double["results"]]
    assert single["results"] == double["results"]
    # The chain verifier checks every step, so the results carry steps_valid; a valid derivation ends in the right answer.
    assert all(0.0 <= r["steps_valid"] <= r["avg@1"] for r in single["results"])
    for name in single["divergence_by_relative_position"]:
        assert single["divergence_by_relative_position"][name] == pytest.approx(double["divergence_by_relative_position"][name], abs=1e-5)


@pytest.mark.parametrize("response, answer_right, steps_right", [
    ("1-6=5;5+5=0;0*9=0;0-3=7;7*0=0;a:0", True, True),        # the worked solution
    (" 1-6=5; 5+5=0;0*9=0;0-3=7;7*0=0;a:0 ", True, True),     # whitespace aside
    ("1-6=5;5+5=0;0-9=0;0-3=7;7-0=0;a:0", True, False),       # answer-patched: wrong operators, copied values
    ("1-6=5;5+5=0;0*9=0;0-3=7;7*0=1;a:1", False, False),      # a wrong result
    ("1-6=5;5+5=0;0*9=0;7*0=0;a:0", True, False),             # a skipped step
    ("5+5=0;1-6=5;0*9=0;0-3=7;7*0=0;a:0", True, False),       # steps reordered
    ("1-6=5;5+5=0;0*9=0;0-3=7;7*0=0", False, False),          # no answer
])
def test_chain_verifier_checks_every_step(response, answer_right, steps_right):
    from trd_lightning.verifiers import ChainVerifier

    verifier = ChainVerifier()
    assert verifier.score(response, "0") == answer_right
    assert verifier.steps_valid("1-6+5*9-3*0", response) == steps_right
    assert verifier.steps_valid("not a chain", response) is None
    assert ExactMatch().steps_valid("1-6+5*9-3*0", response) is None  # answer-only verifiers cannot judge steps
