"""Runs are never mixed up: ``--ckpt_path last`` resumes this run or refuses, evaluation writes beside a run and never
over its record, a resumed run's samples hold each step once, and ``default_root_dir`` is not silently ignored."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.conftest import fit_args
from trd_lightning.cli import main

CKPT_EVERY_STEP = "--trainer.callbacks.init_args.every_n_train_steps=1"


def test_resume_refuses_an_older_run_when_the_newest_has_no_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    main(fit_args("opd", tmp_path, "r", 2, CKPT_EVERY_STEP))
    # A second run, killed (SIGKILL: no handler runs) once its log folder exists, before its first checkpoint.
    killed = subprocess.Popen([sys.executable, "-m", "trd_lightning.cli", *fit_args("opd", tmp_path, "r", 100)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "r/version_1").is_dir() and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (tmp_path / "r/version_1").is_dir() and not (tmp_path / "r/version_1/checkpoints").exists()
    with pytest.raises(SystemExit) as refused:
        main(fit_args("opd", tmp_path, "r", 4, CKPT_EVERY_STEP, "--ckpt_path=last"))
    message = str(refused.value)
    assert "version_1" in message and "has no checkpoint" in message and "version_0 (step 2)" in message, message
    assert "--trainer.logger.init_args.version=N" in message
    assert not (tmp_path / "r/version_0/checkpoints/step=3.ckpt").exists()  # nothing ran
    # Named, the older run goes on, in its own folder.
    main(fit_args("opd", tmp_path, "r", 3, CKPT_EVERY_STEP, "--ckpt_path=last", "--trainer.logger.init_args.version=0"))
    assert (tmp_path / "r/version_0/checkpoints/last.ckpt").is_file()
    assert yaml.safe_load((tmp_path / "r/version_0/config.yaml").read_text())["trainer"]["max_steps"] == 3
    assert not (tmp_path / "r/version_1/checkpoints").exists()


def test_test_after_fit_keeps_the_runs_config_and_writes_beside_it(tmp_path):
    main(fit_args("opd", tmp_path, "t", 2, CKPT_EVERY_STEP))
    record = (tmp_path / "t/version_0/config.yaml").read_text()
    main(["test", *fit_args("opd", tmp_path, "t", 300)[1:], "--trainer.limit_test_batches=1", "--data.init_args.eval_batch_size=4",
          "--ckpt_path=last"])
    assert (tmp_path / "t/version_0/config.yaml").read_text() == record
    assert (tmp_path / "t/version_0/test/results.json").is_file()
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["version_0"]  # no version_1 for `--ckpt_path last` to take
    # A checkpoint from elsewhere (or none): a folder of its own, apart from the runs.
    elsewhere = tmp_path / "copied.ckpt"
    shutil.copy(tmp_path / "t/version_0/checkpoints/last.ckpt", elsewhere)
    main(["test", *fit_args("opd", tmp_path, "t", 300)[1:], "--trainer.limit_test_batches=1", "--data.init_args.eval_batch_size=4",
          f"--ckpt_path={elsewhere}"])
    assert (tmp_path / "t_test/version_0/results.json").is_file()
    # A version named for the results: written as named.
    main(["test", *fit_args("opd", tmp_path, "t", 300)[1:], "--trainer.limit_test_batches=1", "--data.init_args.eval_batch_size=4",
          f"--ckpt_path={tmp_path / 't/version_0/checkpoints/last.ckpt'}", "--trainer.logger.init_args.version=mine"])
    assert (tmp_path / "t/mine/results.json").is_file()
    assert (tmp_path / "t/version_0/config.yaml").read_text() == record


def test_a_resumed_run_writes_each_steps_samples_once(tmp_path):
    args = ["--model.init_args.log_samples_every=1"]
    main(fit_args("opd", tmp_path, "s", 3, CKPT_EVERY_STEP, *args))
    samples = tmp_path / "s/version_0/samples/rank0.jsonl"
    shutil.copy(next((tmp_path / "s/version_0/checkpoints").glob("*step=1.ckpt")), tmp_path / "early.ckpt")
    # As after a crash at step 3: resumed from the checkpoint of step 1, the run writes steps 1 and 2 again.
    main(fit_args("opd", tmp_path, "s", 3, CKPT_EVERY_STEP, *args, f"--ckpt_path={tmp_path / 'early.ckpt'}",
                  "--trainer.logger.init_args.version=0"))
    steps = [json.loads(line)["step"] for line in samples.read_text().splitlines()]
    assert sorted(set(steps)) == [0, 1, 2]
    assert steps == sorted(steps) and len(steps) == 3 * steps.count(0), steps  # every step's rows, once


def test_default_root_dir_beside_a_loggers_save_dir_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"default_root_dir=.* would move nothing.*--trainer.logger.init_args.save_dir="):
        main(fit_args("opd", tmp_path, "d", 1, f"--trainer.default_root_dir={tmp_path / 'elsewhere'}"))


def test_without_a_logger_last_is_found_where_the_checkpoints_are(tmp_path):
    no_logger = ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", CKPT_EVERY_STEP]
    args = [a for a in fit_args("opd", tmp_path, "n", 2) if "logger.init_args" not in a]
    main([*args, *no_logger])
    assert (tmp_path / "checkpoints/last.ckpt").is_file()
    main([*[a if a != "--trainer.max_steps=2" else "--trainer.max_steps=3" for a in args], *no_logger, "--ckpt_path=last"])
    import torch

    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
