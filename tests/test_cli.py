"""The `trd` command end to end on tiny models: fit, logs, checkpoints, resume, config round-trips, the plug-ins it lists,
and bad input refused before any compute with a message that names the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import DEMO, ROOT, fit_args, scalars, tiny_overrides
from trd_lightning.cli import main, plugins
from trd_lightning.module import DistillationModule


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_console_script_is_installed():
    out = subprocess.run(["trd", "--help"], capture_output=True, text=True, check=True).stdout
    assert "fit" in out and "validate" in out and "test" in out


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("config", ["opd", "opsd", "trd", "trd_opsd", "smollm2_trd"])
def test_code_configs_parse(config):
    """Every code config parses, uses the code templates and CodeVerifier, and names its test sets."""
    import subprocess
    import sys

    import yaml

    printed = subprocess.run([sys.executable, "-m", "trd_lightning.cli", "fit", "--config", f"configs/code/{config}.yaml", "--print_config"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["init_args"]["verifier"]["class_path"] == "trd_lightning.verifiers.CodeVerifier"
    assert "math" not in printed.replace("math_verify", "")
    tests = parsed["data"]["init_args"]["test_path"]
    assert {"humaneval_plus", "mbpp_plus"} <= set(tests) and any(name.startswith("livecodebench") for name in tests)


def test_plugins_are_discovered_from_their_base_classes():
    found = plugins()
    for name in ("trd_lightning.refiners.best_of_n.BestOfNRewrite", "trd_lightning.refiners.rewrite.TeacherRewrite",
                 "trd_lightning.teachers.vllm_server.VLLMServerTeacher", "trd_lightning.verifiers.ChainVerifier",
                 "trd_lightning.rollout.hf.HFEngine", "trd_lightning.module.DistillationModule"):
        assert name in found
    assert "refiners.base.Refiner" not in found and "teachers.base.Teacher" not in found  # abstract bases are not plug-ins


BAD_INPUTS = [
    ("malformed YAML", ["--config", "{bad_yaml}"], r"bad\.yaml:\d+:\d+: not valid YAML: "),
    ("a config file that is not there", ["--config", "configs/demo/trd.yml"],
     r"--config configs/demo/trd\.yml: no such file; did you mean configs/demo/trd\.yaml"),
    ("negative learning rate", ["--model.init_args.optimizer.init_args.lr=-0.1"], "model.optimizer: Invalid learning rate: -0.1"),
    ("unknown class_path", ["--model.init_args.refiner=trd_lightning.refiners.Nope"],
     "model.refiner: .*has no attribute 'Nope'.*unknown class_path 'trd_lightning.refiners.Nope'; the plug-ins are"),
    ("batch size zero", ["--data.init_args.batch_size=0"], "data batch_size must be > 0"),
    ("temperature zero", ["--model.init_args.sampling.temperature=0"], "sampling temperature must be > 0 .*greedy: true"),
    ("top_k over the vocabulary", ["--model.init_args.sampling.top_k=300"], "top_k=300 is larger than the vocabulary \\(259 tokens\\)"),
    ("max_new_tokens zero", ["--model.init_args.sampling.max_new_tokens=0"], "max_new_tokens must be > 0"),
    ("invalid UTF-8", ["--data.init_args.train_path={bad_utf8}"], "bad.jsonl:2: the line is not valid UTF-8"),
    ("missing field", ["--data.init_args.train_path={no_field}"], "nofield.jsonl:1: missing the field 'problem'"),
    ("no chat template", ["--model.init_args.student.tokenizer={bare_tokenizer}"], "has no chat template; set `chat_template`"),
    ("refine template without {attempt}", ["--model.init_args.refiner=trd_lightning.refiners.TeacherRewrite",
                                            "--model.init_args.refiner.template={problem} fix it"], "lacks the placeholder \\{attempt\\}"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, extra, match", BAD_INPUTS, ids=[c for c, _, _ in BAD_INPUTS])
def test_bad_input_is_refused_before_compute(case, extra, match, bad_files, tmp_path, monkeypatch, capsys):

    started = []
    monkeypatch.setattr(DistillationModule, "configure_model", lambda self: started.append(True))
    extra = [arg.format(**bad_files) if "{" in arg and "}" in arg and "{problem}" not in arg else arg for arg in extra]
    args = fit_args("opd", tmp_path, "bad", 1, *extra)
    with pytest.raises(SystemExit) as error:
        main(args)
    import re

    err = capsys.readouterr().err
    assert error.value.code == 2 and str(error.value) in err
    message = str(error.value)
    assert message.startswith("trd: error: ") and "Traceback" not in err
    assert re.search(match, message, re.S), message
    assert "Given value" not in message and "AddedToken" not in message  # the fix, not a dump of every argument
    assert not started  # refused before any model was loaded


@pytest.mark.slow
def test_bad_training_data_is_refused_before_validate_before_fit_computes(bad_files, tmp_path, monkeypatch):

    started = []
    monkeypatch.setattr(DistillationModule, "configure_model", lambda self: started.append(True))
    args = fit_args("opd", tmp_path, "bad", 1, f"--data.init_args.train_path={bad_files['bad_utf8']}")
    with pytest.raises(SystemExit, match="bad.jsonl:2: the line is not valid UTF-8"):
        main([*args, "--validate_before_fit=true"])
    assert not started
