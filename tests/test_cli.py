"""The `trd` command end to end on tiny models: fit, logs, checkpoints, resume, config round-trips."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import DEMO, ROOT, scalars, tiny_overrides
from trd_lightning.cli import main


def test_fit_logs_checkpoints_exports_and_resumes_at_the_right_step(student_dir, teacher_dir, chain_data, tmp_path):
    args = ["fit", "--config", str(DEMO / "opd.yaml"), *tiny_overrides(student_dir, teacher_dir, chain_data, tmp_path),
            "--trainer.max_steps=3", "--trainer.callbacks.init_args.every_n_train_steps=3"]
    main(args)
    run = tmp_path / "run" / "version_0"
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard event file"
    logged = scalars(run)
    for tag in ("train/loss", "rollout/length", "rollout/truncated", "rollout/accuracy", "time/rollout", "time/backward"):
        assert [step for step, _ in logged[tag]] == [0, 1, 2], tag
    assert all(value > 0 for _, value in logged["train/loss"])
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.exists() and list((run / "checkpoints").glob("*step=3.ckpt"))
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run / "student_hf")
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    for key, value in exported.state_dict().items():
        assert torch.equal(value, state[f"student.{key}"]), key
    assert not any(k.startswith("teacher_model.") for k in state)  # a separate teacher reloads from its path

    main([*args[:-2], "--trainer.max_steps=5", f"--ckpt_path={checkpoint}"])
    resumed = scalars(tmp_path / "run" / "version_1")
    assert [step for step, _ in resumed["train/loss"]] == [3, 4]
    assert torch.load(run.parent / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


@pytest.mark.parametrize("config", ["demo/trd.yaml", "demo/trd_server.yaml", "trd_server.yaml"])
def test_print_config_round_trips(config, tmp_path):
    first = subprocess.run([sys.executable, "-m", "trd_lightning.cli", "fit", "--config", str(ROOT / "configs" / config), "--print_config"],
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout
    saved = tmp_path / "printed.yaml"
    saved.write_text(first)
    second = subprocess.run([sys.executable, "-m", "trd_lightning.cli", "fit", "--config", str(saved), "--print_config"],
                            capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert first == second
    config = yaml.safe_load(first)
    assert config["model"]["init_args"]["refiner"]["class_path"] == "trd_lightning.refiners.TeacherRewrite"
    assert config["model"]["init_args"]["divergence"]["init_args"]["direction"] == "forward"


def test_the_console_script_is_installed():
    out = subprocess.run(["trd", "--help"], capture_output=True, text=True, check=True).stdout
    assert "fit" in out and "validate" in out and "test" in out


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--model.init_args.student.path=/missing/model"], "model path '/missing/model' does not exist"),
        (["--data.init_args.train_path=/missing/train.jsonl"], "data path '/missing/train.jsonl' does not exist"),
        (["--data.init_args.problem_field=question"], "missing the field 'question'"),
    ],
)
def test_bad_input_fails_with_a_message_naming_the_fix(extra, match, student_dir, teacher_dir, chain_data, tmp_path, capsys):
    args = ["fit", "--config", str(DEMO / "opd.yaml"), *tiny_overrides(student_dir, teacher_dir, chain_data, tmp_path), *extra]
    with pytest.raises((SystemExit, FileNotFoundError, ValueError)) as error:
        main(args)
    assert match in str(error.value) + capsys.readouterr().err
