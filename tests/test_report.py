"""The end of ``trd fit``: a final validation when the last step was not validated, and a table that says what
happened, whose "after" column is what TensorBoard received; every validation logged at the step it describes."""

from __future__ import annotations

import re

from tests.conftest import fit_args, scalars
from trd_lightning.cli import main
from trd_lightning.report import FitReport, duration

VAL = ["--trainer.limit_val_batches=1", "--data.init_args.eval_batch_size=8", "--model.init_args.eval_sampling.max_new_tokens=8",
       "--validate_after_fit=true"]


def table_row(out: str, metric: str) -> list[float]:
    line = next(line for line in out.splitlines() if metric in line)
    return [float(v) for v in re.findall(r"\d+\.\d{4}", line)]


def test_a_run_shorter_than_val_check_interval_ends_validated_with_its_table(tmp_path, capsys):
    main(fit_args("trd", tmp_path, "short", 3, *VAL, "--validate_before_fit=true", "--trainer.val_check_interval=100"))
    out = capsys.readouterr().out
    logged = scalars(tmp_path / "short/version_0")
    assert [step for step, _ in logged["val/student/avg@1"]] == [0, 3]  # before training, and after its 3 steps
    assert re.search(r"step 0 +┃ +step 3", out) and re.search(r"before +┃ +after", out)
    for tag in ("val/student/avg@1", "val/student/steps_valid"):
        assert table_row(out, tag) == [round(value, 4) for _, value in logged[tag]], tag
    facts = {line.split(None, 1)[0]: line for line in out.splitlines() if line.strip()}
    assert "target" in facts and int(re.search(r"trained\s+([\d,]+)", out).group(1).replace(",", "")) > 0
    assert f"tensorboard --logdir {tmp_path}" in out
    assert str(tmp_path / "short/version_0/checkpoints/last.ckpt") in out
    assert str(tmp_path / "short/version_0/student_hf") in out


def test_validations_land_at_the_step_they_describe_and_the_last_is_not_repeated(tmp_path, capsys):
    main(fit_args("opd", tmp_path, "every", 2, *VAL, "--validate_before_fit=true", "--trainer.val_check_interval=1"))
    out = capsys.readouterr().out
    steps = [step for step, _ in scalars(tmp_path / "every/version_0")["val/student/avg@1"]]
    assert steps == [0, 1, 2]  # not [0, 0, 1]; step 2 was validated inside fit, so not once more after it
    assert re.search(r"step 0 +┃ +step 1 +┃ +step 2", out) and re.search(r"before +┃ +┃ +after", out)


def test_no_final_validation_when_turned_off(tmp_path, capsys):
    main(fit_args("opd", tmp_path, "off", 2, *VAL[:-1], "--validate_after_fit=false", "--trainer.val_check_interval=100"))
    assert "val/student/avg@1" not in scalars(tmp_path / "off/version_0")
    assert "fit done" in capsys.readouterr().out


def test_many_validations_show_the_first_the_last_and_some_between():
    report = FitReport()
    report.validations = {step: {"val/x": float(step)} for step in range(0, 110, 10)}
    assert report.columns() == [0, 10, 50, 90, 100]
    report.validations = {0: {}, 5: {}}
    assert report.columns() == [0, 5]


def test_durations_read_as_a_clock():
    assert [duration(s) for s in (7.4, 118, 3725)] == ["7s", "1m58s", "1h02m05s"]
