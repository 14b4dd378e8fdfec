"""Teachers in the trainer's process: a separate model (OPD), or the student's own model (OPSD), frozen or live.

A local teacher never trains. ``scope()`` yields the module to run, in eval mode; for a frozen LoRA self-teacher
it disables the adapter for the duration, so the base weights serve as the step-0 teacher without a second copy.
It generates with the trainer's rollout engine and scores with a forward pass, giving the fused divergence its
hidden states and LM head (dense scores: every divergence applies).
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from lightning.pytorch import LightningModule
from torch import nn

from trd_lightning.models import (
    ModelSpec,
    check_model_files,
    check_plain_head,
    evaluating,
    is_peft,
    is_sharded,
    last_hidden_at,
    load_model,
    output_head,
    own_tokenizer,
    packs_sequences,
    vocab_size,
    vocabulary_difference,
)
from trd_lightning.rollout.base import STUDENT, RolloutEngine, Rollouts, Sampling
from trd_lightning.scores import DenseScores
from trd_lightning.teachers.base import Teacher
from trd_lightning.teachers.vllm_server import TeacherSetupError
from trd_lightning.views import ModelInputs

TEACHER = "teacher"  # the rollout engine's role for a teacher with its own weights


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class LocalTeacher(Teacher):
    """A teacher module in the trainer's process. Subclasses say which module (``build``, ``scope``)."""

    student: nn.Module | None = None
    own: nn.Module | None = None  # the teacher's own weights, when it has any (not for a live/LoRA self-teacher)
    engine: RolloutEngine | None = None
    is_live: bool = False  # the teacher is the student's current weights, so it generates through the student's engine role

    @abstractmethod
    def build(self, student: nn.Module) -> nn.Module | None:
        """The teacher's own module, or None when it runs on the student's."""

    @abstractmethod
    def scope(self) -> Iterator[nn.Module]:
        """A context manager yielding the module to run as the teacher, in eval mode."""

    def setup(self, student: nn.Module, tokenizer, engine: RolloutEngine) -> nn.Module | None:
        self.student, self.engine = student, engine
        self.own = self.build(student)  # a frozen copy is taken before any sharding
        with self.scope() as teacher:
            check_vocabularies(student, teacher, tokenizer, getattr(self, "model", None), not getattr(self, "tokenizer_checked", False))
            check_plain_head(teacher, "teacher")
        return self.own

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Rollouts:
        """Completions from the trainer's engine. A live self-teacher is the student, so the student's engine serves
        it; an engine with its own weights loads a fixed teacher (separate, or frozen at step 0) once."""
        role = STUDENT if self.is_live else TEACHER
        with self.scope() as teacher:
            if not self.engine.has_weights(role):
                self.engine.sync_weights(role, teacher)
            return self.engine.generate(role, teacher, prompts, sampling)

    def score(self, inputs: ModelInputs) -> DenseScores:
        """The teacher's last hidden states at the target positions, and its head, without autograd."""
        with self.scope() as teacher:
            inputs = inputs.to(next(teacher.parameters()).device)
            # inference_mode where it is safe; FSDP2 reuses its gathered buffers across modes, so no_grad there.
            with torch.no_grad() if is_sharded(self.student) else torch.inference_mode():
                hidden = last_hidden_at(teacher, inputs)
            weight, bias = output_head(teacher)
        # Inference tensors cannot be saved for backward: clone into a normal tensor before it meets the graph.
        return DenseScores(hidden.clone(), weight, bias)

    def packs(self, packing: str, device) -> bool:
        with self.scope() as teacher:
            return packs_sequences(teacher, packing, device, "teacher")

    def shard(self, sharding, mesh) -> None:
        if self.own is not None:
            sharding.apply(self.own, mesh)

    def release(self) -> None:
        if self.own is not None and is_sharded(self.own):
            self.own.reshard()  # its gathered head is no longer needed: free it until the next forward


class SeparateTeacher(LocalTeacher):
    """OPD: a separate, usually larger, model. It must share the student's vocabulary."""

    #: Where a config sets the teacher's model, for the messages that name it.
    KEY = "model.init_args.teacher.init_args.model"

    def __init__(self, model: ModelSpec):
        if model.lora is not None:
            raise ValueError("the teacher does not train, so it takes no `lora` block; drop it from teacher.model")
        check_model_files(model, "teacher", self.KEY, needs_tokenizer=False)  # before anything loads
        self.model = model
        self.tokenizer_checked = False

    def check_tokenizer(self, tokenizer, student: ModelSpec) -> None:
        """Before any weights load: the heads' sizes in the two configs agree and the teacher's own tokenizer, where it
        ships one, maps every token to the id the student's does (``setup`` checks the loaded heads again)."""
        sizes = [config_vocab_size(spec) for spec in (student, self.model)]
        fix = f"set {self.KEY}.path to a model of the student's family (the same tokenizer)"
        if None not in sizes and sizes[0] != sizes[1]:
            raise TeacherSetupError(f"the student ({student.name}) and the teacher ({self.model.name}) must share a vocabulary: the "
                                    f"student's has {sizes[0]} tokens and the teacher's {sizes[1]} (vocab_size in their configs); {fix}")
        check_same_tokenizer(tokenizer, self.model, f"the student ({student.name}) and the teacher ({self.model.name}) have "
                             f"different tokenizers", f"token ids go between them, so they must share one vocabulary: {fix}")
        self.tokenizer_checked = True

    def build(self, student: nn.Module) -> nn.Module:
        return freeze(load_model(self.model))

    @contextmanager
    def scope(self) -> Iterator[nn.Module]:
        with evaluating(self.own) as module:
            yield module


class SelfTeacher(LocalTeacher):
    """OPSD: the student's own model, given privileged context by the refiner.

    Args:
        frozen: keep the step-0 weights as the teacher: the adapter-disabled base model under LoRA, a frozen
            copy of the student otherwise (one more model in memory). False: the student's current weights.
    """

    def __init__(self, frozen: bool = True):
        self.frozen = frozen
        self.persistent = frozen  # a step-0 copy exists only in this run's checkpoints

    @property
    def is_live(self) -> bool:
        return not self.frozen

    def build(self, student: nn.Module) -> nn.Module | None:
        if not self.frozen or is_peft(student):
            self.persistent = False
            return None
        return freeze(copy.deepcopy(student))

    @contextmanager
    def scope(self) -> Iterator[nn.Module]:
        if self.own is not None:
            with evaluating(self.own) as module:
                yield module
        elif self.frozen:  # LoRA: the base weights are the step-0 weights
            with evaluating(self.student) as module, module.disable_adapter():
                yield module
        else:
            with evaluating(self.student) as module:
                yield module


def config_vocab_size(spec: ModelSpec) -> int | None:
    """A model's vocabulary size from its config alone; None when it cannot be read without loading more."""
    try:
        return spec.config_vocab_size()
    except (OSError, ValueError):
        return None


def check_vocabularies(student: nn.Module, teacher: nn.Module, tokenizer, spec: ModelSpec | None, tokenizers: bool = True) -> None:
    """The teacher's head has the student's vocabulary size and (``tokenizers``, unless ``SeparateTeacher.check_tokenizer``
    did already) where it ships a tokenizer, the same token ids."""
    student_size, teacher_size = vocab_size(student), vocab_size(teacher)
    if student_size != teacher_size:
        named = f" ({spec.name})" if spec is not None else ""
        raise TeacherSetupError(
            f"student and teacher{named} must share a vocabulary: the student's has {student_size} tokens and the "
            f"teacher's {teacher_size}; pick a teacher from the student's model family"
        )
    if tokenizers and spec is not None and (spec.tokenizer or spec.path):
        check_same_tokenizer(tokenizer, spec, f"the student's and the teacher's ({spec.name}) tokenizers map tokens to different ids",
                             "they must share one vocabulary")


def check_same_tokenizer(tokenizer, spec: ModelSpec, what: str, fix: str) -> None:
    """A ``TeacherSetupError`` (``what: <the difference>; fix``) when the tokenizer ``spec`` ships maps tokens to other
    ids than ``tokenizer``; nothing when it ships none."""
    theirs = own_tokenizer(spec)
    difference = None if theirs is None else vocabulary_difference(tokenizer, theirs)
    if difference is not None:
        raise TeacherSetupError(f"{what}: {difference}; {fix}")


def exclude_reloadable_teacher(module: LightningModule, attribute: str, teacher: Teacher) -> None:
    """Leave the teacher's own weights (``module.<attribute>``) out of checkpoints when it reloads from a path (an 8B
    teacher would double each one), and do not expect them back when one loads; a frozen step-0 copy stays in them."""
    if teacher.persistent or getattr(module, attribute, None) is None:
        return
    marker = attribute + "."

    def drop_from_state_dict(_module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix + marker)]:
            del state_dict[key]

    def forgive_missing(_module, incompatible):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(marker)]

    module.register_state_dict_post_hook(drop_from_state_dict)
    module.register_load_state_dict_post_hook(forgive_missing)
