"""SFTModule: supervised fine-tuning of a causal LM on responses (builds the demo's teacher and student)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from trd_lightning.data.prompts import PromptBatch
from trd_lightning.evaluation import EvaluationMixin
from trd_lightning.models import ModelSpec, check_model_files, export_hf, last_hidden_at, load_model, load_tokenizer, output_head, stop_token_ids
from trd_lightning.optim import WarmupCosine, check_optimizer, optimizer_and_schedule
from trd_lightning.rollout import HFEngine, RolloutEngine, Sampling
from trd_lightning.verifiers import ExactMatch, Verifier
from trd_lightning.views import ModelInputs


class SFTModule(EvaluationMixin, LightningModule):
    """Supervised fine-tuning: cross-entropy on the response tokens only (token-mean).

    At the end of fit the model is saved with ``save_pretrained`` to ``export_dir`` (default: ``<log dir>/model_hf``).
    Validation reports generation accuracy.

    Args:
        model: the model being trained (a local path or a config; optional LoRA).
        optimizer: an optimizer class and its arguments (``class_path`` / ``init_args``).
        lr_schedule: warmup + cosine, stepped once per optimizer step; null keeps the learning rate constant.
        engine: generates the completions validation and test score (``HFEngine`` by default).
        eval_sampling: how validation and test sample (``n`` per problem, for Avg@n / Pass@k); null: greedy, one each.
        verifier: checks the answers of evaluation completions (``ExactMatch`` by default); not part of the loss.
        pass_k: the k of Pass@k in evaluation (each <= eval_sampling.n).
        export_dir: where the trained model is saved at the end of fit; null: ``model_hf`` in the log dir.
    """

    def __init__(
        self,
        model: ModelSpec,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: WarmupCosine | None = None,
        engine: RolloutEngine | None = None,
        eval_sampling: Sampling | None = None,
        verifier: Verifier | None = None,
        pass_k: Sequence[int] = (1,),
        export_dir: str | None = None,
    ):
        super().__init__()
        self.model_spec = model
        check_optimizer(optimizer)
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.engine = engine or HFEngine()
        self.eval_sampling = eval_sampling or Sampling(greedy=True)
        self.verifier = verifier or ExactMatch()
        self.pass_k = list(pass_k)
        self.export_dir = export_dir
        check_model_files(model, "trained", "model.init_args.model")  # a path not there, or a folder that cannot load
        self.tokenizer = load_tokenizer(model)
        self.model = None
        self.evaluated = ("model",)
        self.metrics = torch.nn.ModuleDict()

    def setup(self, stage: str) -> None:
        self.setup_metrics()

    def configure_model(self) -> None:
        if self.model is None:
            self.model = load_model(self.model_spec)
            self.engine.setup(self.tokenizer, stop_token_ids(self.tokenizer, self.model))

    def configure_optimizers(self):
        return optimizer_and_schedule(self.optimizer_factory, self.lr_schedule, self.model, int(self.trainer.estimated_stepping_batches))

    def training_step(self, batch: ModelInputs, batch_idx: int):
        hidden = last_hidden_at(self.model, batch)
        weight, bias = output_head(self.model)
        logits = F.linear(hidden, weight, bias).float()
        loss = F.cross_entropy(logits, batch.input_ids[batch.target_mask])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.input_ids.shape[0])
        return loss

    def validation_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0):
        self.score("val", dataloader_idx, "model", batch, self.engine.generate("student", self.model, batch.prompt_ids, self.eval_sampling))

    def test_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0):
        self.score("test", dataloader_idx, "model", batch, self.engine.generate("student", self.model, batch.prompt_ids, self.eval_sampling))

    def on_fit_end(self):
        directory = Path(self.export_dir) if self.export_dir else self.log_dir() / "model_hf"  # every rank: a collective
        if export_hf(self.model, self.tokenizer, directory, self.model_spec, rank=self.global_rank) is not None:
            rank_zero_info(f"exported the model to {directory}")
