"""What keeps a long run trustworthy: exact resume, graceful interruption, non-finite steps skipped.

- ``RolloutRandomness``: every RNG rollout sampling draws from, checkpointed per process and kept out of validation;
- ``NonFiniteGuard``: a step whose loss or gradient is NaN/inf changes no weight; N in a row stop the run;
- ``GracefulInterrupt``: SIGTERM or SIGINT lets the current step finish, then writes ``last.ckpt`` (under DDP too);
- ``ResumableError`` / ``SaveOnResumableError``: a service outside the trainer (a teacher server) stayed down, so the
  run writes ``last.ckpt`` (the weights of the last finished step) and stops; ``--ckpt_path last`` goes on;
- ``SafeCheckpointIO``: writes beside the target and renames (atomic on every local filesystem, whatever ``TMPDIR``
  is), loads weights-only and names the file when it is truncated or corrupt;
- ``find_last_checkpoint``: what ``--ckpt_path last`` means, across the logger's version folders.
"""

from __future__ import annotations

import math
import os
import random
import signal
import tempfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from trd_lightning.distributed import gather_objects, rank


def rng_state() -> dict:
    """The CPU and CUDA torch generators and Python's ``random``, in a weights-only-loadable form."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fork_per_rank(rank: int) -> None:
    """Give this rank a random stream of its own: ``seed_everything`` seeds every rank alike, so without this they
    would draw the same sampling noise. Rank 0 keeps its stream, so a single process samples as it always did."""
    if rank == 0:
        return
    seed = (torch.initial_seed() * 1_000_003 + rank) % 2**63
    torch.manual_seed(seed)  # the CPU and every CUDA generator
    random.seed(seed)


class RolloutRandomness:
    """The random streams rollouts are sampled from: one per rank, kept exact across a restore and around validation.

    Every rank's stream is forked from the run's seed by its rank before it first samples (``fork_per_rank``). The
    checkpoint holds every process's RNG state (their streams part as soon as their rollouts differ in length, and
    the checkpoint is written from the first process's state). A restored state is applied at the first rollout
    after the restore, so nothing run in between shifts the stream; validation in the middle of training runs on a
    stashed copy. The same world size resumes exactly."""

    def __init__(self):
        self.resumed: dict | None = None
        self.stashed: dict | None = None
        self.forked = False

    def state_dict(self) -> dict:
        return {"rng_per_rank": gather_objects(rng_state())}  # a collective: every process saves together

    def load_state_dict(self, state: dict) -> None:
        states = state.get("rng_per_rank") or [state["rng"]]  # "rng": one process's, as the oldest checkpoints hold it
        self.resumed = states[rank() % len(states)]
        self.forked = True  # the saved streams are the ranks' own already

    def fork(self, process_rank: int) -> None:
        if not self.forked:
            fork_per_rank(process_rank)
            self.forked = True

    def before_rollout(self, process_rank: int = 0) -> None:
        if self.resumed is not None:
            set_rng_state(self.resumed)
            self.resumed = None
        self.fork(process_rank)

    def stash(self, process_rank: int = 0) -> None:
        if self.resumed is None:  # a resumed state is applied at the next rollout, validation or not
            self.fork(process_rank)
        self.stashed = rng_state()

    def restore_stash(self) -> None:
        if self.stashed is not None:
            set_rng_state(self.stashed)
            self.stashed = None


class NonFiniteGuard(Callback):
    """Skips the optimizer update of a step whose loss or gradients are not finite.

    The gradients are dropped, so AdamW leaves every weight and moment untouched; the guard counts and logs the
    step, and stops the run after ``max_consecutive`` such steps in a row. ``DistillationModule`` adds it itself
    and calls ``check`` between its backward passes and its optimizer step, before any clipping (which would turn
    an infinite gradient into a finite one).

    Args:
        max_consecutive: stop the run after this many skipped steps in a row (> 0; the module's
            ``max_consecutive_skips``).
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive <= 0:
            raise ValueError(f"max_consecutive_skips must be > 0 (got {max_consecutive})")
        self.max_consecutive = max_consecutive
        self.skipped, self.consecutive = 0, 0
        self.reason: str | None = None

    def check(self, loss: float, parameters, on_any_rank=lambda flag: flag) -> bool:
        """Whether the step must be skipped; if so, its gradients are dropped. ``on_any_rank(flag)`` is true on
        every rank when ``flag`` is true on one (sharded gradients differ per rank; all must skip together)."""
        self.reason = None if math.isfinite(loss) else f"loss {loss}"
        params = [p for p in parameters if p.grad is not None]
        if self.reason is None and params:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
            if not torch.isfinite(norm):
                self.reason = f"gradient norm {float(norm)}"
        if on_any_rank(self.reason is not None):
            self.reason = self.reason or "gradient on another rank"
            for p in params:
                p.grad = None
        return self.reason is not None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.reason is None:
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1
            rank_zero_warn(f"step {trainer.global_step}: skipped the update, non-finite {self.reason}")
        pl_module.log("train/skipped_nonfinite_steps", float(self.skipped))
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"stopped after {self.consecutive} consecutive steps with a non-finite loss or gradient (the last: "
                f"{self.reason}, at step {trainer.global_step}); lower the learning rate, check the data and the "
                "teacher's outputs, or resume from an earlier checkpoint"
            )
        self.reason = None

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = state["skipped"], state["consecutive"]


class GracefulInterrupt(Callback):
    """SIGTERM or a first SIGINT: finish the step, write ``last.ckpt`` next to the run's checkpoints, and stop
    (``SIGTERMException``). A second SIGINT interrupts at once.

    The handler only raises a flag; the processes agree on it at the end of the step (any one of them asked),
    then all save and stop together. Lightning's own SIGTERM handler runs a collective inside the handler,
    which deadlocks DDP when the processes receive the signal at different points (or twice, as a process
    started by Lightning's launcher does when the first one forwards it), so it is replaced during training.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None  # the name of the signal received
        self.previous: dict = {}

    def on_train_start(self, trainer, pl_module):
        if _main_thread():  # after Lightning installed its handlers for this run
            self.previous = {signum: signal.signal(signum, self._on_signal) for signum in self.SIGNALS}

    def on_train_end(self, trainer, pl_module):
        self.restore()

    def on_exception(self, trainer, pl_module, exception):
        self.restore()

    def restore(self) -> None:
        if self.previous and _main_thread():
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)
            self.previous = {}

    def _on_signal(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
        rank_zero_info(f"{signal.Signals(signum).name} received: finishing this step, then saving last.ckpt"
                       + (" (interrupt again to stop at once)" if signum == signal.SIGINT else ""))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.strategy.reduce_boolean_decision(bool(self.requested), all=False):
            return
        path = save_last(trainer)
        rank_zero_info(f"interrupted after step {trainer.global_step}: saved {path}; resume with --ckpt_path last")
        raise Interrupted(self.requested or "a signal to another process")  # every process at once: they agreed above


class Interrupted(SIGTERMException):
    """The run stopped on a signal after saving ``last.ckpt``; says which (Lightning's class is for SIGTERM alone)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class ResumableError(RuntimeError):
    """Something outside the trainer failed for longer than its retries (a teacher server went down). Nothing of
    the run is wrong: ``SaveOnResumableError`` writes ``last.ckpt`` (then in ``checkpoint``) and the run stops;
    resuming goes on from there."""

    checkpoint: Path | None = None


class SaveOnResumableError(Callback):
    """On a ``ResumableError`` during training, write ``last.ckpt``, so ``--ckpt_path last`` resumes.

    The error comes in the middle of a step, before its optimizer step (every teacher call of a step comes before
    it), so the weights, the optimizer and ``global_step`` are those of the last finished step. The step that
    failed is not counted; the resumed run trains ``max_steps`` in all. A failure before training started (a
    server down at start-up) writes nothing: there is nothing to keep. Under DDP every process must meet the
    failure for the checkpoint's collectives to complete; a server down for one is down for all.
    """

    def __init__(self):
        self.training = False
        self.saved: Path | None = None

    def on_train_start(self, trainer, pl_module):
        self.training = True

    def on_train_end(self, trainer, pl_module):
        self.training = False

    def on_exception(self, trainer, pl_module, exception):
        if self.training and isinstance(exception, ResumableError):
            self.saved = exception.checkpoint = save_last(trainer)
            rank_zero_info(f"{exception}\nsaved {self.saved} at step {trainer.global_step}; resume with --ckpt_path last")


def save_last(trainer) -> Path:
    """Write ``last.ckpt`` in the run's checkpoint folder, where ``--ckpt_path last`` finds it."""
    path = checkpoint_dir(trainer) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback.last_model_path = str(path)  # so it, and its restored self, overwrite this file, not version it
    trainer.save_checkpoint(path)
    for logger in trainer.loggers:
        logger.save()
    return path


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def checkpoint_dir(trainer) -> Path:
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"


class CheckpointError(RuntimeError):
    pass


def check_checkpoint(path: str | Path) -> None:
    """Fail, naming the file, unless ``path`` is a loadable checkpoint: a file, or a distributed (sharded)
    checkpoint folder whose ``meta.pt`` loads."""
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file() or not (path / "meta.pt").is_file():
            raise CheckpointError(f"checkpoint folder {path} lacks .metadata or meta.pt: it is not a complete distributed checkpoint")
        SafeCheckpointIO().load_checkpoint(path / "meta.pt", map_location="cpu")
    else:
        SafeCheckpointIO().load_checkpoint(path, map_location="cpu")


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic writes on local disks: the checkpoint is written to a temporary file in the target's own folder, flushed
    to disk, then renamed over the target, so a process killed at any point leaves the old file or the new one, never
    a part. (Lightning's write goes through a temporary file in ``TMPDIR``; when that is another filesystem, as
    ``/dev/shm`` or node-local scratch often is, its final move is a copy, and a kill during it left a 0-byte
    ``last.ckpt``.) Remote paths keep Lightning's write. Loading is weights-only, with an error that names a
    truncated or corrupt file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in target.parent.glob(f".{target.name}.*.partial"):  # a write killed before it could clean up
            leftover.unlink(missing_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)
        except Exception as error:  # torch reports truncation as a zip-reader or unpickling failure
            raise CheckpointError(
                f"checkpoint {path} cannot be loaded: it is truncated, corrupt, or holds more than weights ({error}); "
                "resume from an earlier checkpoint in the same folder"
            ) from error


def find_last_checkpoint(save_dir: str | Path, name: str, version: int | str | None = None) -> tuple[Path, int | str]:
    """What ``--ckpt_path last`` resumes: the ``last.ckpt`` of one run, ``<save_dir>/<name>/version_N``, and its N.

    The run is the one named (``version``), else the newest version folder, the run the last ``trd fit`` wrote to.
    When that run has no ``last.ckpt`` (it stopped before its first checkpoint) while older runs have, resuming one of
    those is a guess that would continue, and overwrite, another run: refused, the candidates listed.
    Raises ``CheckpointError`` when there is nothing to resume."""
    root = Path(save_dir, name)
    if version is not None:
        found = last_checkpoint(root / (version if isinstance(version, str) else f"version_{version}"))
        if not found.is_file():
            raise CheckpointError(f"--ckpt_path last: {found} does not exist")
        return found, version
    runs = sorted((int(f.name.removeprefix("version_")), f) for f in root.glob("version_*") if f.name.removeprefix("version_").isdigit())
    resumable = [(n, f) for n, f in runs if last_checkpoint(f).is_file()]
    if not resumable:
        raise CheckpointError(f"--ckpt_path last: no {last_checkpoint(root / 'version_*')} to resume from")
    newest, folder = runs[-1]
    if resumable[-1][0] == newest:
        return last_checkpoint(folder), newest
    others = ", ".join(f"version_{n} ({describe_checkpoint(last_checkpoint(f))})" for n, f in resumable)
    raise CheckpointError(
        f"--ckpt_path last: the newest run, {folder}, has no checkpoint (it stopped before its first); resuming an older "
        f"run would continue and overwrite it. Runs with one: {others}. Name the run: "
        "--trainer.logger.init_args.version=N, or --ckpt_path PATH"
    )


def last_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


def describe_checkpoint(path: Path) -> str:
    """The step a checkpoint holds, read without loading its tensors."""
    try:
        return f"step {torch.load(path, map_location='meta', weights_only=True, mmap=True).get('global_step', '?')}"
    except Exception:
        return "unreadable"
