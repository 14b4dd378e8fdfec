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


def test_steps_longer_than_rich_s_30_second_window_still_give_a_rate(tmp_path):
    """At the reference scale a step takes minutes; rich's default window then holds one sample and no rate."""
    bar = fit(tmp_path).progress_bar_callback
    clock = iter(range(0, 10_000, 90))  # a step every 90 s
    bar.progress.get_time = lambda: float(next(clock))
    task_id = bar.progress.add_task("steps", total=10)
    for step in range(1, 6):
        bar.progress.update(task_id, completed=step)
    assert bar.progress.tasks[task_id].speed == pytest.approx(1 / 90)


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


def test_the_step_count_clock_and_rate_hold_across_epoch_boundaries(tmp_path):
    """70 steps of 2 prompts over 16 training problems: 8 batches an epoch, so 8 epoch boundaries. The bar's count
    rises step by step to 70, its elapsed time is the training's wall time, its rate steps over that time."""
    import time

    from lightning.pytorch import Callback

    class Watch(Callback):
        def __init__(self):
            self.counts = []

        def on_train_start(self, trainer, module):
            self.started = time.monotonic()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            bar = trainer.progress_bar_callback
            self.counts.append(bar.progress.tasks[bar.train_progress_bar_id].completed)

        def on_train_end(self, trainer, module):
            self.seconds = time.monotonic() - self.started

    watch = Watch()
    cli = TRDCLI(args=["--config", str(OPD), "--trainer.max_steps=70", f"--trainer.default_root_dir={tmp_path}",
                       "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
                       "--trainer.limit_val_batches=0", "--data.init_args.batch_size=2", "--model.init_args.export_student=false",
                       "--model.init_args.sampling.max_new_tokens=4", "--validate_before_fit=false",
                       "--data.init_args.train_path=demo:data/val.jsonl"], run=False)  # the demo's 100 val rows: 50 batches
    cli.trainer.callbacks.append(watch)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.current_epoch >= 1  # an epoch boundary was crossed
    assert watch.counts == list(range(1, 71))
    task = cli.trainer.progress_bar_callback.progress.tasks[cli.trainer.progress_bar_callback.train_progress_bar_id]
    assert abs(task.elapsed - watch.seconds) <= 0.1 * watch.seconds, (task.elapsed, watch.seconds)
    assert abs(task.speed - 70 / watch.seconds) <= 0.1 * 70 / watch.seconds, (task.speed, 70 / watch.seconds)


def test_no_litlogger_tip_and_no_weight_loading_bars_at_demo_scale(tmp_path, capfd):
    fit(tmp_path, "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger", f"--trainer.logger.save_dir={tmp_path}")
    out, err = capfd.readouterr()
    assert "step" in out + err  # the run printed its bar
    assert "litlogger" not in out + err and "Loading weights" not in out + err
