"""Trainable weights are stored in float32 (``precision.py``): the reference settings move every LoRA adapter entry at
the reference learning rate, and the settings that would store them in bf16 are refused before anything loads."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEMO
from trd_lightning.cli import TRDCLI, main
from trd_lightning.models import LoRA, ModelSpec, load_model
from trd_lightning.precision import PrecisionError, check_precision_settings, check_trainable_float32, compute_dtype

LORA_BF16 = ["--model.init_args.student.dtype=bfloat16", "--model.init_args.student.lora.r=8", "--model.init_args.student.lora.alpha=16"]


def test_half_precision_storage_is_refused_with_the_fix_named():
    with pytest.raises(PrecisionError, match="bf16-true stores every parameter.*bf16-mixed"):
        check_precision_settings("bf16-true", "bfloat16", lora=True)
    with pytest.raises(PrecisionError, match="fully fine-tuned with its weights stored in bfloat16.*dtype: float32"):
        check_precision_settings("bf16-mixed", "bfloat16", lora=False)
    check_precision_settings("bf16-mixed", "bfloat16", lora=True)  # bf16 base, float32 adapters
    check_precision_settings("bf16-mixed", "float32", lora=False)
    check_precision_settings("32-true", "float32", lora=False)


def test_the_invariant_reads_the_parameters_themselves():
    model = load_model(ModelSpec(path="demo:student", dtype="bfloat16", lora=LoRA(r=4, alpha=8)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # peft keeps adapters in float32 over a bf16 base
    check_trainable_float32(model)
    model.to(torch.bfloat16)  # what bf16-true's convert_module does
    with pytest.raises(PrecisionError, match="trainable student parameters are stored in bfloat16"):
        check_trainable_float32(model)
    assert compute_dtype("bf16-mixed", model) == "bfloat16" and compute_dtype("16-mixed", model) == "float16"
    assert compute_dtype("32-true", load_model(ModelSpec(path="demo:student"))) == "float32"


@pytest.mark.slow
@pytest.mark.parametrize("settings", [["--trainer.precision=bf16-true", *LORA_BF16], ["--model.init_args.student.dtype=bfloat16"]],
                         ids=["bf16-true", "bf16-full-fine-tune"])
def test_trd_refuses_half_precision_storage_in_one_line_before_validation(settings, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(DEMO / "trd.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", *settings])
    message = str(exit_.value)
    assert message.startswith("trd: error: ") and "bf16-mixed" in message and "\n" not in message
    assert not list(tmp_path.rglob("*.tfevents.*"))  # refused before validation logged anything




@pytest.mark.slow
def test_reference_precision_moves_every_lora_adapter_entry_within_20_steps_at_lr_5e_6(tmp_path):
    """The demo TRD run at the reference settings: bf16 compute (bf16-mixed), a bf16 base with LoRA r 8, lr 5e-6."""
    from lightning.pytorch import Callback

    class Snapshot(Callback):
        def on_fit_start(self, trainer, module):
            self.before = {n: p.detach().clone() for n, p in module.student.named_parameters() if "lora_" in n}

    cli = TRDCLI(args=["--config", str(DEMO / "trd.yaml"), "--trainer.precision=bf16-mixed", "--trainer.max_steps=20",
                       "--model.init_args.optimizer.init_args.lr=5e-6", "--model.init_args.export_student=false",
                       f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                       "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--data.init_args.batch_size=8",
                       *LORA_BF16], run=False)
    snapshot = Snapshot()
    cli.trainer.callbacks.append(snapshot)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = {n: p.detach() for n, p in cli.model.student.named_parameters() if "lora_" in n}
    assert set(after) == set(snapshot.before) and any("lora_A" in n for n in after)
    assert all(p.dtype == torch.float32 for p in after.values())
    moved = {n: float((after[n] != snapshot.before[n]).float().mean()) for n in after}
    assert min(moved.values()) == 1.0, {n: share for n, share in moved.items() if share < 1}
