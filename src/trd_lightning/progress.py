"""The training progress bar, counted in optimizer steps of ``max_steps``."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's default bar, but counting optimizer steps towards ``trainer.max_steps`` ("step 120/300"): a run
    here is sized in steps, the data cycling under it, so the epoch's batches and Lightning's "Epoch 0/-2" (an unset
    ``max_epochs``) say nothing. ``trd`` gives the trainer this bar unless the config chose one or turned bars off."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "step" if self.trainer.max_steps > 0 else super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.max_steps > 0:
            self._update(self.train_progress_bar_id, trainer.global_step)
