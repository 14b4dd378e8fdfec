"""StepLog: a step on the logging schedule or on a scheduled pass is written, with what it measured."""

from __future__ import annotations

import pytest

from tests.conftest import fit_args, scalars
from trd_lightning.cli import main


@pytest.mark.slow
def test_scheduled_measurements_are_written_even_between_logging_steps(tmp_path):
    """Logging every 2 steps, the diagnostics pass every 3: each step on either schedule is written, with what it measured."""
    main(fit_args("trd", tmp_path, "run", 5, "--model.init_args.diagnostics_every=3", "--trainer.log_every_n_steps=2"))
    logged = scalars(tmp_path / "run" / "version_0")
    assert [step for step, _ in logged["diag/teacher_ppl_y_o"]] == [0, 3]
    assert [step for step, _ in logged["train/loss"]] == [0, 1, 3]  # 1 and 3 by the interval, 0 and 3 by the pass
    failed = [step for step, value in logged["refine/accuracy_y_o"] if value < 1.0]
    assert [step for step, _ in logged["refine/fail_to_pass"]] == failed
