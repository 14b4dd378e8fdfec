"""trd's progress bar counts optimizer steps of max_steps; a bar the config chose, or none, is respected."""

from __future__ import annotations

import logging

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from tests.conftest import DEMO
from trd_lightning.cli import TRDCLI
from trd_lightning.progress import StepProgressBar
from trd_lightning.reliability import NonFiniteGuard
from trd_lightning.step_log import StepLog

pytestmark = pytest.mark.slow
OPD = DEMO / "opd.yaml"


def fit(tmp_path, *extra: str):
    cli = TRDCLI(args=["--config", str(OPD), "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}",
                       "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
                       "--trainer.limit_val_batches=0", "--data.init_args.batch_size=2", "--model.init_args.export_student=false",
                       "--model.init_args.sampling.max_new_tokens=4", *extra], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.trainer


def test_the_default_bar_counts_steps_of_max_steps(tmp_path):
    bar = fit(tmp_path).progress_bar_callback
    assert type(bar) is StepProgressBar
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.total, task.completed) == (3, 3)
    assert "Epoch" not in task.description and "step" in task.description


def test_a_bar_the_config_chose_is_kept(tmp_path):
    trainer = fit(tmp_path, "--trainer.callbacks=lightning.pytorch.callbacks.TQDMProgressBar")
    assert type(trainer.progress_bar_callback) is TQDMProgressBar
    assert not any(isinstance(c, StepProgressBar) for c in trainer.callbacks)


def test_no_bar_when_the_config_turns_bars_off(tmp_path):
    trainer = fit(tmp_path, "--trainer.enable_progress_bar=false")
    assert trainer.progress_bar_callback is None


def test_validate_then_fit_attaches_the_modules_callbacks_once(tmp_path, caplog):
    """validate_before_fit enters the trainer twice; the second entry keeps the first's callbacks, with no
    "will override existing callbacks" notice on every run."""
    cli = TRDCLI(args=["--config", str(OPD), "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                       "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.limit_val_batches=1",
                       "--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=2", "--model.init_args.export_student=false",
                       "--model.init_args.sampling.max_new_tokens=4", "--model.init_args.eval_sampling.max_new_tokens=4"], run=False)
    with caplog.at_level(logging.INFO):
        cli.trainer.validate(cli.model, datamodule=cli.datamodule)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert "will override existing callbacks" not in caplog.text
    kinds = [type(c) for c in cli.trainer.callbacks]
    for kind in (StepLog, NonFiniteGuard, StepProgressBar):
        assert kinds.count(kind) == 1, kinds
    assert cli.trainer.global_step == 1
