"""Which model teaches: a separate model (OPD), or the student's own model (OPSD), frozen or live.

A teacher never trains. ``scope()`` yields the module to run, in eval mode, and is the only
way the trainer reaches it; for a frozen LoRA self-teacher it disables the adapter for the
duration, so the base weights serve as the step-0 teacher without a second copy.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from trd_lightning.models import ModelSpec, is_peft, load_model


class Teacher(ABC):
    """Base class. ``build`` returns the module that holds the teacher's own weights, if any,
    which the trainer registers (so devices, sharding and checkpoints see it)."""

    #: Whether the teacher's weights must go into checkpoints (they cannot be reloaded from a path).
    persistent: bool = False

    @abstractmethod
    def build(self, student: nn.Module) -> nn.Module | None:
        """The teacher's own module, or None when it runs on the student's."""

    @abstractmethod
    def scope(self, student: nn.Module, own: nn.Module | None) -> Iterator[nn.Module]:
        """A context manager yielding the module to run as the teacher, in eval mode."""

    @property
    def is_self(self) -> bool:
        return False

    @property
    def is_live(self) -> bool:
        """Whether the teacher is the student's current weights (so it changes every step)."""
        return False


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the duration, its mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class SeparateTeacher(Teacher):
    """OPD: a separate, usually larger, model. It must share the student's vocabulary."""

    def __init__(self, model: ModelSpec):
        if model.lora is not None:
            raise ValueError("the teacher does not train, so it takes no `lora` block; drop it from teacher.model")
        self.model = model

    def build(self, student: nn.Module) -> nn.Module:
        return freeze(load_model(self.model))

    @contextmanager
    def scope(self, student: nn.Module, own: nn.Module | None) -> Iterator[nn.Module]:
        with evaluating(own) as module:
            yield module


class SelfTeacher(Teacher):
    """OPSD: the student's own model, given privileged context by the refiner.

    ``frozen=True`` (default) keeps the step-0 weights: the adapter-disabled base model under
    LoRA, a frozen copy otherwise. ``frozen=False`` shares the student's current weights.
    """

    def __init__(self, frozen: bool = True):
        self.frozen = frozen
        self.persistent = frozen  # a step-0 copy exists only in this run's checkpoints

    @property
    def is_self(self) -> bool:
        return True

    @property
    def is_live(self) -> bool:
        return not self.frozen

    def build(self, student: nn.Module) -> nn.Module | None:
        if not self.frozen or is_peft(student):
            self.persistent = False
            return None
        return freeze(copy.deepcopy(student))

    @contextmanager
    def scope(self, student: nn.Module, own: nn.Module | None) -> Iterator[nn.Module]:
        if own is not None:
            with evaluating(own) as module:
                yield module
        elif self.frozen:  # LoRA: the base weights are the step-0 weights
            with evaluating(student) as module, module.disable_adapter():
                yield module
        else:
            with evaluating(student) as module:
                yield module
