"""The training progress bar, counted in optimizer steps of ``max_steps``."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's default bar, but counting optimizer steps towards ``trainer.max_steps`` ("step 120/300"): a run
    here is sized in steps, the data cycling under it, so the epoch's batches and Lightning's "Epoch 0/-2" (an unset
    ``max_epochs``) say nothing. ``trd`` gives the trainer this bar unless the config chose one or turned bars off."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches

    def _init_progress(self, trainer) -> None:
        super()._init_progress(trainer)
        if self.progress is not None:
            # rich rates over the last 30 s only: a step longer than that (minutes, at 16k-token rollouts) left one
            # sample in the window, so no rate and no ETA. Over the last 1,000 steps (rich keeps as many) instead.
            self.progress.speed_estimate_period = math.inf

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Lightning resets the bar's task at every epoch: its clock and rate would restart while the count, set to the
        # global step, did not (a 300-step run read "0:00:01 • 588735 it/s" after the data's first epoch). Counted in
        # steps, the bar is one task for the whole run.
        if trainer.max_steps > 0 and self.train_progress_bar_id is not None and self.progress is not None:
            self.refresh()
            return
        super().on_train_epoch_start(trainer, pl_module)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the log folder's version: the end-of-fit report says where the logs are
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        return "step" if self.trainer.max_steps > 0 else super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # The count is the global step, never the batch index: set to the index first, the bar would fall back at each
        # epoch and rise again, and rich, which rates only the rises, would report the whole jump as one step's speed.
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
