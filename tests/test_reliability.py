"""Reliability: exact resume after an interruption (in one process and in 2-process DDP), atomic and checked checkpoints,
non-finite steps skipped, and degenerate rollouts survived."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tests.conftest import ROOT, fit_args, scalars
from trd_lightning.cli import main
from trd_lightning.reliability import CheckpointError, SafeCheckpointIO


class InterruptAt(Callback):
    """Sends this process a signal at the end of the given step (0-based), as a scheduler or a user would."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            os.kill(os.getpid(), self.signum)


class PoisonSteps(Callback):
    """Fault injection: at the listed steps, make the loss (``what="loss"``) or the gradients non-finite."""

    def __init__(self, steps: list[int], what: str = "loss"):
        self.steps, self.what, self.hook = set(steps), what, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step not in self.steps:
            return
        if self.what == "loss":
            pl_module.divergence = NaNLoss(pl_module.divergence)
        else:
            param = next(p for p in pl_module.student.parameters() if p.requires_grad)
            self.hook = param.register_hook(lambda grad: grad * float("inf"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(pl_module.divergence, NaNLoss):
            pl_module.divergence = pl_module.divergence.inner
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


class NaNLoss:
    """Wraps a divergence so that its loss comes out NaN (the per-token values stay as they are)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def against(self, *args, **kwargs):  # what the module calls, with the teacher's scores
        out = self.inner.against(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out


@pytest.mark.slow
@pytest.mark.parametrize("config, signum", [("trd", signal.SIGTERM), ("trd_opsd", signal.SIGINT)], ids=["trd-sigterm", "trd_opsd-sigint"])
def test_interrupted_run_resumes_to_exactly_the_uninterrupted_one(config, signum, tmp_path):
    # Sampled validation mid-run draws random numbers too: it must not shift the training stream.
    common = ["--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--data.init_args.eval_batch_size=4",
              "--model.init_args.eval_sampling={greedy: false, n: 2, max_new_tokens: 48}"]
    common.append("--trainer.callbacks.init_args.every_n_train_steps=3")
    main(fit_args(config, tmp_path, "straight", 6, *common))
    with pytest.raises(SystemExit) as stopped:
        main(fit_args(config, tmp_path, "broken", 6, *common, "--trainer.callbacks+=tests.test_reliability.InterruptAt",
                      "--trainer.callbacks.step=2", f"--trainer.callbacks.signum={int(signum)}"))
    assert f"stopped by {'Ctrl-C (SIGINT)' if signum == signal.SIGINT else 'SIGTERM'} after a checkpoint" in str(stopped.value)
    interrupted = torch.load(tmp_path / "broken/version_0/checkpoints/last.ckpt", weights_only=True)
    assert interrupted["global_step"] == 3, sorted(p.name for p in (tmp_path / "broken/version_0/checkpoints").iterdir())
    main(fit_args(config, tmp_path, "broken", 6, *common, "--ckpt_path=last"))

    straight = torch.load(tmp_path / "straight/version_0/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "broken/version_0/checkpoints/last.ckpt", weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 6
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    a, b = scalars(tmp_path / "straight/version_0"), scalars(tmp_path / "broken/version_0")
    for tag in ("train/loss", "rollout/accuracy", "refine/accuracy_y_r", "val/student/avg@2"):
        assert sorted(a[tag]) == sorted(set(b[tag])), tag  # the resumed run logged every step once more, identically


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves neither a partial file nor the old one damaged."""
    target = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"w": torch.ones(3)}, target)
    before = target.read_bytes()
    original_save = torch.save

    def dying_save(obj, file):
        original_save(obj, file)
        file.truncate(file.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        SafeCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


WRITER = """
import sys, torch
from trd_lightning.reliability import SafeCheckpointIO
io, target = SafeCheckpointIO(), sys.argv[1]
io.save_checkpoint({"fill": 0.0, "w": torch.zeros(50_000_000)}, target)
print("first", flush=True)
fill = 1.0
while True:
    io.save_checkpoint({"fill": fill, "w": torch.full((50_000_000,), fill)}, target)
    fill += 1
"""


@pytest.mark.slow
def test_a_kill_during_the_write_with_tmpdir_on_another_filesystem_leaves_a_whole_checkpoint(tmp_path):
    """TMPDIR in /dev/shm (tmpfs), the checkpoint on disk: SIGKILL while a 200 MB write is under way, three times."""
    import subprocess
    import sys
    import tempfile
    import time

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the tests' temporary folder")
    target = tmp_path / "checkpoints" / "last.ckpt"
    with tempfile.TemporaryDirectory(dir=shm) as elsewhere:
        for attempt in range(3):
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "TMPDIR": elsewhere})
            if attempt == 0:
                assert writer.stdout.readline().strip() == "first"
            deadline = time.monotonic() + 120
            while not any(p.stat().st_size > 0 for p in target.parent.glob(".last.ckpt.*.partial")) and time.monotonic() < deadline:
                time.sleep(0.01)
            writer.kill()
            writer.wait()
            state = torch.load(target, weights_only=True)  # whole: it loads, and holds one write's values throughout
            assert torch.equal(state["w"], torch.full_like(state["w"], state["fill"])), attempt
            assert list(Path(elsewhere).iterdir()) == []
        SafeCheckpointIO().save_checkpoint({"w": torch.ones(1)}, target)
        assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # the killed writes' leftovers gone


@pytest.mark.slow
def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "run.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match=f"checkpoint {path} cannot be loaded: it is truncated, corrupt"):
        SafeCheckpointIO().load_checkpoint(path)
    with pytest.raises(SystemExit, match=f"trd: error: checkpoint {path} cannot be loaded"):
        main(fit_args("opd", tmp_path, "x", 1, f"--ckpt_path={path}"))


def test_checkpoints_load_weights_only(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "payload": Path("/etc")}, path)  # an arbitrary object needs unpickling
    with pytest.raises(CheckpointError, match="holds more than weights"):
        SafeCheckpointIO().load_checkpoint(path)


@pytest.mark.slow
def test_resume_last_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(SystemExit, match="--ckpt_path last: no .*version_\\*/checkpoints/last.ckpt to resume from"):
        main(fit_args("opd", tmp_path, "never", 1, "--ckpt_path=last"))


@pytest.mark.slow
@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_non_finite_step_changes_no_weight_and_is_counted(what, tmp_path):
    main(fit_args("opd", tmp_path, what, 4, "--trainer.callbacks+=tests.test_reliability.PoisonSteps",
                  "--trainer.callbacks.steps=[1, 2]", f"--trainer.callbacks.what={'loss' if what == 'loss' else 'grad'}",
                  "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=1",
                  "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}"))
    checkpoints = tmp_path / what / "version_0" / "checkpoints"
    states = {s: torch.load(checkpoints / f"step={s}.ckpt", weights_only=True) for s in (1, 2, 3)}
    for key, value in states[1]["state_dict"].items():  # steps 1 and 2 were poisoned: nothing moved
        assert torch.equal(value, states[3]["state_dict"][key]), key
    assert states[1]["optimizer_states"][0]["state"].keys() == states[3]["optimizer_states"][0]["state"].keys()
    for index, state in states[1]["optimizer_states"][0]["state"].items():
        assert torch.equal(state["exp_avg"], states[3]["optimizer_states"][0]["state"][index]["exp_avg"])
    logged = scalars(tmp_path / what / "version_0")
    assert [v for _, v in logged["train/skipped_nonfinite_steps"]] == [0.0, 1.0, 2.0, 2.0]


@pytest.mark.slow
def test_consecutive_non_finite_steps_stop_the_run_with_what_was_seen(tmp_path):
    with pytest.raises(RuntimeError, match=r"stopped after 3 consecutive steps with a non-finite loss or gradient \(the last: loss nan"):
        main(fit_args("opd", tmp_path, "nan", 10, "--model.init_args.max_consecutive_skips=3",
                      "--trainer.callbacks+=tests.test_reliability.PoisonSteps", "--trainer.callbacks.steps=[0,1,2,3,4,5,6,7,8,9]"))


@pytest.mark.slow
def test_degenerate_rollouts_are_survived_and_logged(tmp_path, monkeypatch):
    from trd_lightning.rollout.hf import HFEngine

    # Every rollout ends at once: the stop token is the whole rollout; training goes on, on that token.
    original_setup = HFEngine.setup
    monkeypatch.setattr(HFEngine, "setup", lambda self, tok, stops, *rest: original_setup(self, tok, set(range(259)), *rest))
    main(fit_args("opd", tmp_path, "eos", 2))
    monkeypatch.undo()
    logged = scalars(tmp_path / "eos/version_0")
    assert [v for _, v in logged["rollout/length"]] == [1.0, 1.0] and len(logged["train/loss"]) == 2

    # Every rollout is cut off: recorded, and trained on as it is.
    main(fit_args("opd", tmp_path, "cut", 2, "--model.init_args.sampling.max_new_tokens=3"))
    assert [v for _, v in scalars(tmp_path / "cut/version_0")["rollout/truncated"]] == [1.0, 1.0]

    # Every rewrite is cut off (no answer in it): each row falls back to y_o, counted.
    main(fit_args("trd", tmp_path, "norewrite", 2, "--model.init_args.refiner.init_args.sampling.max_new_tokens=3"))
    logged = scalars(tmp_path / "norewrite/version_0")
    assert [v for _, v in logged["refine/fallbacks"]] == [4.0, 4.0] and [v for _, v in logged["refine/refined_fraction"]] == [0.0, 0.0]

    # No tokens at all: the step is skipped and counted, never trained or logged as a loss.
    original_generate = HFEngine.generate

    def empty(self, role, model, prompts, sampling):
        out = original_generate(self, role, model, prompts, sampling)
        out.token_ids = [[] for _ in out.token_ids]
        return out

    monkeypatch.setattr(HFEngine, "generate", empty)
    main(fit_args("opd", tmp_path, "empty", 2))
    logged = scalars(tmp_path / "empty/version_0")
    assert "train/loss" not in logged and [v for _, v in logged["train/skipped_empty_steps"]] == [1.0, 2.0]


@pytest.mark.slow
def test_interrupted_ddp_run_resumes_to_exactly_the_uninterrupted_one(tmp_path):
    """Two DDP processes: SIGTERM on both after step 1, then ``--ckpt_path last``, ends where a straight run ends."""
    import subprocess
    import sys

    def fit(name: str, *extra: str) -> subprocess.CompletedProcess:
        args = fit_args("opd", tmp_path, name, 4, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.limit_val_batches=0",
                        "--trainer.callbacks.init_args.every_n_train_steps=2", *extra)
        return subprocess.run([sys.executable, "-m", "trd_lightning.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)

    straight = fit("straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    broken = fit("broken", "--trainer.callbacks+=tests.test_reliability.InterruptAt", "--trainer.callbacks.step=0")
    assert broken.returncode != 0 and "resume with --ckpt_path last" in broken.stderr, broken.stderr[-3000:]
    assert torch.load(tmp_path / "broken/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 1
    resumed = fit("broken", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "straight/version_0/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "broken/version_0/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
