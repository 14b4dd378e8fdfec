"""Scale-out on 2 CPU processes (gloo), through the CLI: DDP and FSDP2 training, per-rank shards, the
distributed checkpoint resuming with identical parameters, and the gathered HF export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tests.conftest import ROOT, scalars

pytestmark = pytest.mark.slow  # two processes each


class ShardReport(Callback):
    """Writes, per rank, each student parameter's local and global element counts at the start, and at the
    end the whole weights as that rank gathers them for a rollout engine."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_train_start(self, trainer, pl_module):
        sizes = {}
        for name, param in pl_module.student.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            sizes[name] = [local.numel(), param.numel()]
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        (Path(self.directory) / f"shards_rank{trainer.global_rank}.json").write_text(json.dumps(sizes))

    def on_train_end(self, trainer, pl_module):
        from trd_lightning.models import hf_state_dict

        gathered = {k: v.detach().clone() for k, v in hf_state_dict(pl_module.student).items()}
        torch.save(gathered, Path(self.directory) / f"gathered_rank{trainer.global_rank}.pt")


def trd(*args, cwd=ROOT):
    done = subprocess.run([sys.executable, "-m", "trd_lightning.cli", *args], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def fit_two_processes(strategy: str, tmp_path: Path, name: str, *extra: str):
    return trd("fit", "--config", str(ROOT / "configs/demo/trd.yaml"), "--trainer", str(ROOT / f"configs/strategy/{strategy}.yaml"),
               "--trainer.devices=2", "--trainer.max_steps=2", "--validate_before_fit=false", "--trainer.limit_val_batches=0",
               "--data.init_args.batch_size=4", f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.logger.init_args.name={name}",
               "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--trainer.callbacks.init_args.every_n_train_steps=2",
               *extra)


def exported(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


def test_ddp_trains_two_steps(tmp_path):
    fit_two_processes("ddp", tmp_path, "ddp")
    run = tmp_path / "ddp/version_0"
    assert [s for s, _ in scalars(run)["train/loss"]] == [0, 1]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    assert exported(run / "student_hf")


def test_fsdp2_shards_checkpoints_resumes_and_exports(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    fit_two_processes("fsdp", tmp_path, "fsdp", "--trainer.callbacks+=tests.test_strategy.ShardReport",
                      f"--trainer.callbacks.directory={tmp_path / 'shards'}")
    run = tmp_path / "fsdp/version_0"
    assert [s for s, _ in scalars(run)["train/loss"]] == [0, 1]

    # Each rank holds only its shard of each parameter; together they hold all of it.
    ranks = [json.loads((tmp_path / f"shards/shards_rank{r}.json").read_text()) for r in (0, 1)]
    for name, (local, total) in ranks[0].items():
        assert local + ranks[1][name][0] == total, name
        assert local < total, name

    # The distributed checkpoint is a folder of shards, and holds the student but not the reloadable teacher.
    checkpoint = run / "checkpoints/last.ckpt"
    assert checkpoint.is_dir()
    dcp_to_torch_save(checkpoint, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert torch.load(checkpoint / "meta.pt", weights_only=True)["global_step"] == 2
    student = {k.removeprefix("student."): v for k, v in full["state_dict"].items() if k.startswith("student.")}
    assert student and not any(k.startswith("teacher_model.") for k in full["state_dict"])

    # The exported HF student (gathered from the shards) loads with from_pretrained and is what was trained.
    export = exported(run / "student_hf")
    for key, value in export.items():
        assert torch.equal(value, student[key]), key

    # Every rank gathers the whole trained weights for its rollout engine (a vLLM sync), not only rank 0.
    for rank in (0, 1):
        gathered = torch.load(tmp_path / f"shards/gathered_rank{rank}.pt", weights_only=True)
        assert set(gathered) == set(export)
        assert all(torch.equal(gathered[k], export[k]) for k in export), rank

    # Resuming from the shards restores the step and exactly the same parameters.
    trd("fit", "--config", str(ROOT / "configs/demo/trd.yaml"), "--trainer", str(ROOT / "configs/strategy/fsdp.yaml"),
        "--trainer.devices=2", "--trainer.max_steps=2", "--validate_before_fit=false", "--trainer.limit_val_batches=0",
        "--data.init_args.batch_size=4", f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.name=resumed",
        "--trainer.enable_progress_bar=false", f"--ckpt_path={checkpoint}")
    resumed = exported(tmp_path / "resumed/version_0/student_hf")
    for key, value in export.items():
        assert torch.equal(value, resumed[key]), key
