"""The optimizer step at scale, on real tiny models: token-budget micro-batches, packing without padding, the
global token-mean loss (over micro-batches and over DDP ranks), and metrics logged only where measured."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from tests.conftest import DEMO, ROOT, SMOLLM2, TINY, fit_args, scalars, tiny_overrides
from trd_lightning.cli import main
from trd_lightning.micro_batches import balanced_groups, first_fit_count, plan_in_lockstep, plan_micro_batches, sorted_runs
from trd_lightning.models import ModelSpec, last_hidden_at, load_model, output_head, packs_correctly
from trd_lightning.refiners import Refiner, Targets
from trd_lightning.views import build_views, pack


# -- the plan ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_every_sequence_lands_once_and_micro_batches_respect_the_budget(seed):
    generator = torch.Generator().manual_seed(seed)
    costs = torch.randint(1, 300, (int(torch.randint(1, 40, (1,), generator=generator)),), generator=generator).tolist()
    budget = 256
    groups = plan_micro_batches(costs, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(costs)))
    for group in groups:
        assert group, "one process alone never gets an empty micro-batch"
        load = sum(costs[i] for i in group)
        assert load <= budget or len(group) == 1, (group, load)  # only a lone sequence may exceed the budget
    assert len(groups) == first_fit_count(costs, budget)  # as few micro-batches as first-fit decreasing needs here


def test_longest_first_into_the_least_loaded_micro_batch():
    # 4 micro-batches for 8 sequences: each pair is a long and a short one, evenly filled.
    assert balanced_groups([10, 90, 20, 80, 30, 70, 40, 60], budget=100, count=4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan_micro_batches([500, 10, 10], budget=100) == [[0], [1, 2]]  # over the budget: alone
    assert plan_micro_batches([5, 6, 7], budget=None) == [[0, 1, 2]]


@pytest.mark.parametrize("seed", range(10))
def test_padded_micro_batches_are_length_sorted_runs_within_the_budget(seed):
    generator = torch.Generator().manual_seed(seed)
    costs = torch.randint(1, 300, (30,), generator=generator).tolist()
    groups = plan_micro_batches(costs, 600, padded=True)
    assert sorted(i for g in groups for i in g) == list(range(len(costs)))
    for group in groups:
        assert len(group) * max(costs[i] for i in group) <= 600 or len(group) == 1  # rows x longest: what padding computes
    # Sorted runs: no sequence of one micro-batch lies strictly between the lengths of another's.
    spans = sorted((min(costs[i] for i in g), max(costs[i] for i in g)) for g in groups)
    assert all(low_b >= high_a for (_, high_a), (low_b, _) in zip(spans, spans[1:]))
    assert sorted_runs([300, 100, 290, 110], 600) == [[0, 2], [1, 3]]


def test_every_rank_runs_the_same_number_of_micro_batches():
    long_rank, short_rank = [900, 800, 700, 600, 500, 400], [20, 30, 10]
    plans = plan_in_lockstep([long_rank, short_rank], budget=1000)
    assert len(plans[0]) == len(plans[1]) == first_fit_count(long_rank, 1000) == 5  # 900 | 800 | 700 | 600+400 | 500
    assert sorted(i for g in plans[1] for i in g) == [0, 1, 2]
    assert sum(1 for g in plans[1] if not g) == 2  # 3 sequences, 5 micro-batches: two filler passes
    assert sorted(i for g in plans[0] for i in g) == list(range(6))


# -- packing ------------------------------------------------------------------------------------------------
def packed_and_alone(model, sequences, split):
    contexts, targets = [s[:split] for s in sequences], [s[split:] for s in sequences]
    weight, _ = output_head(model)
    packed = last_hidden_at(model, pack(contexts, targets, 0, packed=True)) @ weight.T
    alone = torch.cat([last_hidden_at(model, pack([c], [t], 0)) @ weight.T for c, t in zip(contexts, targets)])
    return packed, alone


def check_packing(model, vocab, logit_atol=1e-5):
    torch.manual_seed(0)
    sequences = [torch.randint(0, vocab, (n,)).tolist() for n in (13, 9, 21)]
    with torch.no_grad():
        packed, alone = packed_and_alone(model.eval(), sequences, split=4)
        torch.testing.assert_close(packed, alone, atol=logit_atol, rtol=1e-5)
        torch.testing.assert_close(packed.softmax(-1), alone.softmax(-1), atol=1e-5, rtol=0)
        # No target token sees another sequence: rewrite the first sequence entirely, the others' logits stay put.
        changed = [[(t + 1) % vocab for t in sequences[0]], *sequences[1:]]
        moved, _ = packed_and_alone(model, changed, split=4)
    others = slice(len(sequences[0]) - 4, None)
    torch.testing.assert_close(moved[others], packed[others], atol=1e-6, rtol=0)
    assert not torch.allclose(moved[: len(sequences[0]) - 4], packed[: len(sequences[0]) - 4])
    assert packs_correctly(model, "cpu", vocab)


def test_packed_forward_equals_each_sequence_alone_demo_qwen3():
    check_packing(load_model(ModelSpec(path="demo:student")), TINY["vocab_size"])


@pytest.mark.slow
def test_packed_forward_equals_each_sequence_alone_smollm2_llama():
    model = load_model(SMOLLM2)
    # 30 layers of fp32 rounding on logits up to ~36: 8.5e-5 apart at most (2.4e-6 of their range), probabilities 3e-6.
    check_packing(model, model.config.vocab_size, logit_atol=1e-4)


def test_a_model_that_mixes_packed_sequences_is_caught(student_dir):
    """A model whose forward drops the position ids runs the packed row as one sequence: the check must see it."""
    model = load_model(ModelSpec(path=student_dir))
    forward = model.forward
    model.forward = lambda *args, position_ids=None, **kwargs: forward(*args, **kwargs)
    assert not packs_correctly(model, "cpu", TINY["vocab_size"])


def test_views_hold_the_same_target_ids_packed_or_padded(tokenizer):
    student, teacher, targets = [[1, 2], [3, 4, 5]], [[6], [7, 8, 9, 10]], [[11, 12, 13], [14]]
    for packed in ((True, True), (False, False), (True, False)):
        views = build_views(student, teacher, targets, 0, packed)
        for inputs in (views.student, views.teacher):
            assert inputs.input_ids[inputs.target_mask].tolist() == [11, 12, 13, 14]
            assert int(inputs.target_mask.sum()) == 4  # the mask covers the targets and nothing else
    packed = build_views(student, teacher, targets, 0, (True, True)).student
    assert packed.input_ids.tolist() == [[1, 2, 11, 12, 13, 3, 4, 5, 14]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]] and packed.attention_mask is None


# -- the loss over the whole step ------------------------------------------------------------------------
class GradientCapture(Callback):
    """Saves the student's gradients as the optimizer sees them at the first step (after any DDP all-reduce)."""

    def __init__(self, path: str):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0 and trainer.is_global_zero:
            torch.save({n: p.grad.detach().clone() for n, p in pl_module.student.named_parameters() if p.grad is not None}, self.path)


def gradients_of_one_step(tmp_path, config, name, budget, student_dir, teacher_dir, chain_data, *extra):
    path = tmp_path / f"{name}.pt"
    main(["fit", "--config", str(DEMO / f"{config}.yaml"), *tiny_overrides(student_dir, teacher_dir, chain_data, tmp_path, name),
          "--trainer.max_steps=1", "--data.init_args.batch_size=8", f"--model.init_args.max_tokens_per_micro_batch={budget}",
          "--trainer.callbacks+=tests.test_step.GradientCapture", f"--trainer.callbacks.path={path}", *extra])
    return torch.load(path, weights_only=True), scalars(tmp_path / name / "version_0")


@pytest.mark.parametrize("packing", ["always", "never"])
@pytest.mark.parametrize("config", ["opd", "trd"])
def test_gradients_do_not_depend_on_the_micro_batch_budget(config, packing, student_dir, teacher_dir, chain_data, tmp_path):
    mode = f"--model.init_args.packing={packing}"
    whole, logged = gradients_of_one_step(tmp_path, config, "whole", "null", student_dir, teacher_dir, chain_data, mode)
    assert logged["step/micro_batches"] == [(0, 1.0)]
    ratio = logged["step/real_token_ratio"][0][1]
    assert ratio == 1.0 if packing == "always" else 0 < ratio <= 1.0  # packed: no padding computed
    costs = 8 * 60  # about 8 sequences of context + target: a budget of a third of it makes several micro-batches
    for budget in (costs // 2, costs // 6):
        grads, logged = gradients_of_one_step(tmp_path, config, f"b{budget}", budget, student_dir, teacher_dir, chain_data, mode)
        assert logged["step/micro_batches"][0][1] > 1, budget
        assert grads.keys() == whole.keys()
        for key, value in whole.items():
            torch.testing.assert_close(grads[key], value, atol=1e-5, rtol=1e-4, msg=f"{key} at budget {budget}")


class LengthByParity(Refiner):
    """Targets of a known length per problem, so that ranks hold very different token counts: even problems get a
    long target, odd ones a short one. The teacher scores them in the student's own context (OPD)."""

    def __init__(self, long: int = 40, short: int = 2):
        self.long, self.short = long, short

    def refine(self, batch, rollouts, teacher):
        ids = [[(7 * batch.index[i] + k) % 250 for k in range(self.long if batch.index[i] % 2 == 0 else self.short)]
               for i in rollouts.prompt_index]
        n = len(rollouts)
        return Targets(ids, [""] * n, self.scoring_contexts(batch, rollouts.prompt_index, teacher), [False] * n, [False] * n)

    def teacher_solutions(self, batch, rollouts, targets, teacher, sampling):
        return rollouts


def test_global_token_mean_over_ddp_ranks_equals_one_process(student_dir, teacher_dir, tmp_path):
    """Rank 0 holds the long targets (20x rank 1's tokens): its tokens must weigh what they weigh in one process."""
    data = tmp_path / "eight.jsonl"
    from trd_lightning.data.chain import sample_problems

    data.write_text("".join(json.dumps({"problem": p.text, "answer": p.answer, "solution": p.solution}) + "\n"
                            for p in sample_problems(8, 3, seed=3)))
    common = ["fit", "--config", str(DEMO / "opd.yaml"), f"--model.init_args.student.path={student_dir}",
              f"--model.init_args.teacher.init_args.model.path={teacher_dir}", f"--data.init_args.train_path={data}",
              "--data.init_args.val_path=null", "--data.init_args.test_path=null", "--data.init_args.shuffle=false",
              "--model.init_args.refiner=tests.test_step.LengthByParity", "--model.init_args.sampling.max_new_tokens=4",
              "--model.init_args.max_tokens_per_micro_batch=80", "--trainer.max_steps=1", "--validate_before_fit=false",
              "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.callbacks+=tests.test_step.GradientCapture"]
    one = subprocess.run([sys.executable, "-m", "trd_lightning.cli", *common, "--data.init_args.batch_size=8",
                          f"--trainer.callbacks.path={tmp_path / 'one.pt'}", "--trainer.logger.init_args.name=one"],
                         capture_output=True, text=True, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "trd_lightning.cli", *common, "--data.init_args.batch_size=4",
                          "--trainer.strategy=ddp", "--trainer.devices=2", f"--trainer.callbacks.path={tmp_path / 'two.pt'}",
                          "--trainer.logger.init_args.name=two"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    alone, shared = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    for key, value in alone.items():
        torch.testing.assert_close(shared[key], value, atol=1e-5, rtol=1e-4, msg=key)
    logged_one, logged_two = scalars(tmp_path / "one/version_0"), scalars(tmp_path / "two/version_0")
    # Both see the whole global batch: 4 long and 4 short targets, one loss.
    assert logged_one["train/target_tokens"] == logged_two["train/target_tokens"] == [(0, 4 * 40 + 4 * 2.0)]
    torch.testing.assert_close(logged_two["train/loss"][0][1], logged_one["train/loss"][0][1], atol=1e-5, rtol=1e-5)
    # Rank 0 needs more micro-batches of 80 tokens for its long rows than rank 1: both ran as many (a mean over
    # ranks of their counts would not be a whole number otherwise).
    (_, count), = logged_two["step/micro_batches"]
    assert count == int(count) >= 2


# -- logs ------------------------------------------------------------------------------------------------------
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


def test_scheduled_measurements_are_written_even_between_logging_steps(tmp_path):
    """Logging every 2 steps, the diagnostics pass every 3: each step on either schedule is written, with what it measured."""
    main(fit_args("trd", tmp_path, "run", 5, "--model.init_args.diagnostics_every=3", "--trainer.log_every_n_steps=2"))
    logged = scalars(tmp_path / "run" / "version_0")
    assert [step for step, _ in logged["diag/teacher_ppl_y_o"]] == [0, 3]
    assert [step for step, _ in logged["train/loss"]] == [0, 1, 3]  # 1 and 3 by the interval, 0 and 3 by the pass
    failed = [step for step, value in logged["refine/accuracy_y_o"] if value < 1.0]
    assert [step for step, _ in logged["refine/fail_to_pass"]] == failed


@pytest.mark.parametrize("setting, fix", [("--trainer.accumulate_grad_batches=4", "data.init_args.batch_size"),
                                          ("--trainer.gradient_clip_val=1.0", "model.init_args.gradient_clip_val: 1.0")])
def test_trainer_settings_the_step_replaces_are_refused_with_the_fix(setting, fix, student_dir, teacher_dir, chain_data, tmp_path):
    with pytest.raises(SystemExit, match=fix.replace(".", r"\.")):
        main(["fit", "--config", str(DEMO / "opd.yaml"), *tiny_overrides(student_dir, teacher_dir, chain_data, tmp_path),
              "--trainer.max_steps=1", setting])
