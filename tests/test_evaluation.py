"""Evaluation: unparsable reference answers refused before compute, metrics under 2-process DDP equal to one process's,
and `trd test` on the code config reporting each dataset (tiny stand-ins, and SmolLM2 writing real code in the sandbox)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, needs_smollm2, save_tiny_model
from trd_lightning.cli import main
from trd_lightning.data import PromptDataModule
from trd_lightning.data.chain import sample_problems
from trd_lightning.verifiers import MathVerifier


def test_unparsable_answers_fail_before_compute(tmp_path, student_dir, teacher_dir):
    from lightning.pytorch import Trainer

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


def run_test(args, cwd):
    return subprocess.run([sys.executable, "-m", "trd_lightning.cli", "test", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
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
        results[devices] = json.loads((tmp_path / f"ddp{devices}_test" / "version_0" / "results.json").read_text())
    single, double = results[1], results[2]
    assert [r["problems"] for r in single["results"]] == [5, 5] == [r["problems"] for r in double["results"]]
    assert single["results"] == double["results"]
    # The chain verifier checks every step, so the results carry steps_valid; a valid derivation ends in the right answer.
    assert all(0.0 <= r["steps_valid"] <= r["avg@1"] for r in single["results"])
    for name in single["divergence_by_relative_position"]:
        assert single["divergence_by_relative_position"][name] == pytest.approx(double["divergence_by_relative_position"][name], abs=1e-5)


@pytest.mark.slow
def test_the_code_config_trains_and_tests_through_trd(tmp_path, monkeypatch):
    """configs/code/smollm2_trd.yaml with tiny random models in place of SmolLM2: a TRD step through `trd fit`
    and `trd test` results per code dataset. The tiny models write no program, so nothing runs in the sandbox
    here; test_trd_test_on_code_reports_each_dataset (below) has SmolLM2 write real code."""

    import yaml

    from trd_lightning.cli import main

    # Byte-level tiny models: code prompts take many tokens, so a longer context than the shared fixtures'.
    student_dir = save_tiny_model(tmp_path / "student", seed=1, max_position_embeddings=2048)
    teacher_dir = save_tiny_model(tmp_path / "teacher", seed=2, max_position_embeddings=2048)
    monkeypatch.chdir(ROOT)
    tiny = {"model": {"init_args": {"student": {"path": student_dir, "gguf_file": None},  # laid over the shipped config (and its bases)
                                    "teacher": {"init_args": {"model": {"path": teacher_dir, "gguf_file": None}}}}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    common = ["--config", "configs/code/smollm2_trd.yaml", "--config", str(tmp_path / "tiny.yaml"),
              "--model.init_args.max_context_tokens=2048", "--data.init_args.max_prompt_tokens=1024",
              "--model.init_args.sampling.max_new_tokens=8", "--model.init_args.refiner.init_args.sampling.max_new_tokens=8",
              "--model.init_args.eval_sampling.max_new_tokens=8", f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--trainer.enable_progress_bar=false"]
    main(["fit", *common, "--trainer.max_steps=1"])
    main(["test", *common])
    results = json.loads((tmp_path / "code_smollm2_trd_test" / "version_0" / "results.json").read_text())["results"]
    datasets = ("humaneval_plus", "mbpp_plus", "livecodebench")
    assert {(r["dataset"], r["who"]) for r in results} == {(d, w) for d in datasets for w in ("student", "teacher")}
    assert all("tests_passed" in r and r["avg@2"] == 0.0 for r in results)  # random tiny models write no program


@pytest.mark.slow
@needs_smollm2
def test_trd_test_on_code_reports_each_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names examples/code/ relative to the repository
    main(["test", "--config", "configs/code/smollm2_trd.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.enable_progress_bar=false", "--trainer.limit_test_batches=1",
          "--model.init_args.eval_sampling.n=1", "--model.init_args.eval_sampling.max_new_tokens=32",
          "--model.init_args.refiner.init_args.sampling.max_new_tokens=32", "--model.init_args.pass_k=[1]"])
    results = json.loads((tmp_path / "code_smollm2_trd_test" / "version_0" / "results.json").read_text())["results"]
    rows = {(r["dataset"], r["who"]): r for r in results}
    assert {d for d, _ in rows} == {"humaneval_plus", "mbpp_plus", "livecodebench"}
    for (dataset, who), row in rows.items():
        assert row["problems"] == {"humaneval_plus": 1, "mbpp_plus": 1, "livecodebench": 2}[dataset]
        assert 0.0 <= row["avg@1"] <= 1.0 and 0.0 <= row["pass@1"] <= 1.0
