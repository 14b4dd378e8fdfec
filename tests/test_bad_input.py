"""Bad input through ``trd``: each case refused in one ``trd: error:`` line that names the input (setting, file, row,
field) and the fix, with no traceback and before any model weights load, so before any training or validation step.
A training row the verifier cannot read is warned about by file and row, and training goes on."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest

from tests.conftest import DEMO, fit_args
from trd_lightning.cli import main
from trd_lightning.models import resolve_path
from trd_lightning.module import DistillationModule

pytestmark = pytest.mark.slow  # each runs `trd` through the CLI


@pytest.fixture
def no_compute(monkeypatch) -> list[str]:
    """Records (and stops) anything that would load weights or run a step; a bad input must never get there."""
    started: list[str] = []

    def refuse(name):
        def hook(self, *args, **kwargs):
            started.append(name)
            raise AssertionError(f"{name} ran for a bad input")
        return hook

    for name in ("configure_model", "training_step", "validation_step", "test_step"):
        monkeypatch.setattr(DistillationModule, name, refuse(name))
    return started


def refused(args: list[str], capsys, started: list[str]) -> str:
    """Run ``trd`` with ``args``; it must exit with one ``trd: error:`` line, no traceback, and nothing computed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as error:
        main(args)
    err = capsys.readouterr().err
    message = str(error.value)
    assert error.value.code == 2, error.value.code
    assert message.startswith("trd: error: ") and "\n" not in message, message
    assert "Traceback" not in err and message in err
    assert not started, started
    return message


def evaluation_args(subcommand: str, tmp_path, *extra: str) -> list[str]:
    return [subcommand, "--config", str(DEMO / "trd.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", *extra]


def demo_rows(n: int) -> list[dict]:
    with open(resolve_path("demo:data/val.jsonl", "data")) as handle:
        return [json.loads(line) for line in handle][:n]


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def demo_teacher_copy(tmp_path, name: str):
    return shutil.copytree(resolve_path("demo:teacher"), tmp_path / name)


def edited_vocabulary(tmp_path, name: str, edit) -> str:
    """The demo teacher with its tokenizer.json's vocabulary changed by ``edit(vocab, token_of_id)``."""
    folder = demo_teacher_copy(tmp_path, name)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    edit(vocab, {index: token for token, index in vocab.items()})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return str(folder)


# -- 1. a data file that is not there, for each split ------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "val"])
def test_a_missing_data_file_is_named_with_its_setting(split, tmp_path, capsys, no_compute):
    message = refused(fit_args("trd", tmp_path, "bad", 1, f"--data.init_args.{split}_path={tmp_path}/nope.jsonl"), capsys, no_compute)
    assert re.search(rf"data\.init_args\.{split}_path: {split} data path '.*/nope\.jsonl' does not exist; .*point it at a local copy", message)


def test_a_missing_test_file_is_named_in_trd_test(tmp_path, capsys, no_compute):
    message = refused(evaluation_args("test", tmp_path, f"--data.init_args.test_path={tmp_path}/nope.jsonl"), capsys, no_compute)
    assert re.search(r"data\.init_args\.test_path: test data path '.*/nope\.jsonl' does not exist", message)


# -- 2-4. model folders that cannot load ----------------------------------------------------------------------------
def test_a_missing_teacher_path_is_named_with_its_setting(tmp_path, capsys, no_compute):
    message = refused(fit_args("trd", tmp_path, "bad", 1, "--model.init_args.teacher.init_args.model.path=/nope"), capsys, no_compute)
    assert "model.init_args.teacher.init_args.model.path: teacher model path '/nope' does not exist" in message


@pytest.mark.parametrize("role, setting", [("teacher", "--model.init_args.teacher.init_args.model.path"),
                                           ("student", "--model.init_args.student.path")])
def test_a_model_folder_without_weights_is_refused(role, setting, tmp_path, capsys, no_compute):
    folder = demo_teacher_copy(tmp_path, "weightless")
    (folder / "model.safetensors").unlink()
    message = refused(fit_args("trd", tmp_path, "bad", 1, f"{setting}={folder}"), capsys, no_compute)
    assert f"{setting[2:]}: the {role} model folder {folder} has no weights (*.safetensors or *.bin); it holds " in message
    assert "config.json" in message and "tokenizer.json" in message and "Point it at a complete model folder" in message


def test_an_empty_folder_as_the_student_says_what_it_lacks(tmp_path, capsys, no_compute):
    (tmp_path / "empty").mkdir()
    message = refused(fit_args("trd", tmp_path, "bad", 1, f"--model.init_args.student.path={tmp_path / 'empty'}"), capsys, no_compute)
    assert (f"model.init_args.student.path: the student model folder {tmp_path / 'empty'} has no config.json, no weights "
            "(*.safetensors or *.bin), no tokenizer (tokenizer.json or tokenizer_config.json); it is empty") in message
    assert "sentencepiece" not in message


# -- 5. a teacher whose tokenizer differs from the student's -------------------------------------------------------
def swap_two_ids(vocab, token_of):
    vocab[token_of[40]], vocab[token_of[41]] = 41, 40


def rename_a_token(vocab, token_of):
    del vocab[token_of[50]]
    vocab["zz"] = 50


@pytest.mark.parametrize("edit, difference", [
    (swap_two_ids, "token id 40 is '(' for the student and ')' for the teacher (2 ids differ)"),
    (rename_a_token, "token id 50 is '2' for the student and 'zz' for the teacher (1 id differs)"),
], ids=["two ids swapped", "another vocabulary"])
def test_a_teacher_with_another_tokenizer_is_refused_naming_the_first_differing_id(edit, difference, tmp_path, capsys, no_compute):
    teacher = edited_vocabulary(tmp_path, "teacher", edit)
    message = refused(fit_args("trd", tmp_path, "bad", 1, f"--model.init_args.teacher.init_args.model.path={teacher}"), capsys, no_compute)
    assert f"the student (demo:student) and the teacher ({teacher}) have different tokenizers: {difference}" in message
    assert "set model.init_args.teacher.init_args.model.path to a model of the student's family" in message


# -- 6. a problem too long for max_context_tokens ----------------------------------------------------------------------
@pytest.mark.parametrize("validate_before_fit", [False, True])
def test_a_problem_too_long_for_the_teacher_context_is_refused_when_the_data_is_read(validate_before_fit, tmp_path, capsys, no_compute):
    args = fit_args("trd", tmp_path, "bad", 1, "--model.init_args.max_context_tokens=20", f"--validate_before_fit={validate_before_fit}")
    message = refused(args, capsys, no_compute)
    assert re.search(r"demo:data/train\.jsonl:1: the teacher's context from the refine template 'demo_refine' is (\d+) tokens for this "
                     r"problem with the attempt and reference solution cut to nothing \(the student's prompt is \d+ tokens\), over "
                     r"model\.init_args\.max_context_tokens=20; \d+ more problems of it are too; raise max_context_tokens to at "
                     r"least \d+, or shorten or drop the problem", message), message


# -- 7-8. evaluation rows that cannot be read ----------------------------------------------------------------------------
CODE_ROWS = [
    {"problem": "Read two integers and print their sum.", "answer": {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}, "solution": "s"},
    {"problem": "Print the input.", "answer": {"inputs": ["1\n", "2\n", "3\n"], "outputs": ["1\n", "2\n"]}, "solution": "s"},
]


def test_an_evaluation_row_with_more_inputs_than_outputs_is_named_by_file_and_row(tmp_path, capsys, no_compute):
    path = write_jsonl(tmp_path / "code.jsonl", CODE_ROWS)
    args = evaluation_args("validate", tmp_path, "--model.init_args.verifier=trd_lightning.verifiers.CodeVerifier",
                           f"--data.init_args.val_path={path}")
    message = refused(args, capsys, no_compute)
    assert (f"{path}:2: TACO-style tests need as many outputs as inputs (got 3 inputs, 2 outputs) (in the answer field `answer`); "
            "fix the row or drop it") in message


def test_a_null_answer_is_said_to_be_null_not_missing(tmp_path, capsys, no_compute):
    rows = demo_rows(4)
    rows[2]["answer"] = None
    path = write_jsonl(tmp_path / "val.jsonl", rows)
    message = refused(evaluation_args("validate", tmp_path, f"--data.init_args.val_path={path}"), capsys, no_compute)
    assert f"{path}:3: the field 'answer' (set by `answer_field`) is null; give the row its answer, or drop the row" in message
    assert "missing" not in message


# -- 9. a training row the verifier cannot read: warned about by file and row, and training goes on -----------------------
def test_a_training_row_without_usable_tests_is_warned_about_by_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", CODE_ROWS)
    args = fit_args("trd", tmp_path, "rows", 1, "--model.init_args.verifier=trd_lightning.verifiers.CodeVerifier",
                    f"--data.init_args.train_path={path}", "--data.init_args.val_path=null", "--model.init_args.log_samples_every=0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(args)
    said = [str(w.message) for w in caught]
    named = [m for m in said if f"({path}:2: TACO-style tests need as many outputs as inputs (got 3 inputs, 2 outputs))" in m]
    assert len(named) == 1 and named[0].startswith("1 train row(s): the answer field `answer` cannot be read by CodeVerifier"), said
    assert "responses to it count as failed; fix or drop it" in named[0]
    assert not [m for m in said if m.startswith("a row's tests cannot be read")]  # not said again, without the row, at a step
    assert list((tmp_path / "rows").rglob("student_hf"))  # training went on, to the end
