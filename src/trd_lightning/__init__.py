"""trd-lightning: on-policy distillation of LLMs (OPD, OPSD, TRD) as a PyTorch Lightning trainer."""

__version__ = "0.1.0"
