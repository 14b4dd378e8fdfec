"""Precision: trainable weights are stored in float32, computed in the trainer's dtype.

An AdamW update of about lr = 5e-6 is below half a bf16 step for weights of magnitude ~0.02, so trainable weights
stored in bf16 mostly never move (measured on the demo with a LoRA student at lr 5e-6: 2.2% of the lora_A entries
moved in 20 steps under ``bf16-true``, all of them under ``bf16-mixed`` with float32 adapters). Base weights may be
bf16; what trains must be float32: LoRA adapters (peft keeps them so under ``bf16-mixed``), or, for full fine-tuning,
a float32 student, computed in bf16 by autocast (``bf16-mixed``) or by FSDP2's ``sharding.param_dtype``.
"""

from __future__ import annotations

import torch
from torch import nn

HALF_TRUE = ("bf16-true", "16-true", "bf16", "16", "half")  # Lightning casts every parameter to half under these


class PrecisionError(ValueError):
    """Trainable weights would be stored in half precision; the message names the setting that fixes it."""


FIX = ("use `trainer.precision: bf16-mixed` (bf16 compute by autocast) with the student's `dtype: bfloat16` and a `lora` block "
       "(peft keeps the adapters in float32), or, for full fine-tuning, the student's `dtype: float32` (under FSDP2 with "
       "`sharding.param_dtype: bfloat16` for bf16 compute)")


def compute_dtype(precision: str, weights: str | nn.Module) -> str:
    """The dtype the trainer computes in, by name: bf16 under ``bf16-*``, fp16 under ``16-*``, else the weights' own
    (``weights``: a dtype name, or a model whose first floating parameter tells)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return "bfloat16"
    if precision.startswith("16") or precision == "half":
        return "float16"
    if isinstance(weights, str):
        return weights
    dtype = next((p.dtype for p in weights.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def check_precision_settings(precision: str, student_dtype: str, lora: bool) -> None:
    """Refuse, before any weights load, settings under which the student's trainable weights are stored in half."""
    if str(precision) in HALF_TRUE:
        raise PrecisionError(f"trainer.precision={precision} stores every parameter, the trained ones included, in half precision, "
                             f"where updates of a small learning rate round to nothing; {FIX}")
    if not lora and student_dtype in ("bfloat16", "float16"):
        raise PrecisionError(f"the student is fully fine-tuned with its weights stored in {student_dtype}, where updates of a small "
                             f"learning rate round to nothing; {FIX}")


def check_trainable_float32(model: nn.Module, role: str = "student") -> None:
    """The invariant itself, once the strategy has set the model up: every trainable parameter is float32."""
    wrong = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad and p.dtype != torch.float32}
    if wrong:
        count = sum(p.numel() for p in model.parameters() if p.requires_grad and p.dtype != torch.float32)
        raise PrecisionError(f"{count:,} trainable {role} parameters are stored in {', '.join(sorted(wrong))}, where updates of a "
                             f"small learning rate round to nothing; {FIX}")
