"""Data: prompt data modules and the embedded demo task."""

from trd_lightning.data.prompts import DataError, PromptBatch, PromptDataModule

__all__ = ["DataError", "PromptBatch", "PromptDataModule"]
