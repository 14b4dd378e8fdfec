"""Refiners: how the student's rollouts become training targets (identity for OPD/OPSD, teacher rewrite for TRD)."""

from trd_lightning.refiners.base import Refiner, Targets, TeacherAccess
from trd_lightning.refiners.identity import Identity
from trd_lightning.refiners.rewrite import TeacherRewrite

__all__ = ["Identity", "Refiner", "TeacherAccess", "TeacherRewrite", "Targets"]
