"""The teacher interface: what the trainer, the refiners and the diagnostics use of a teacher, and nothing more.

A teacher ``generate``s completions (TRD's rewrites y_r; its own solutions in evaluation) and ``score``s target
tokens after their contexts. Its scores are dense (hidden states and LM head: a teacher in the trainer's process)
or sparse (top-k log-probabilities: a teacher served by an inference engine); which divergences apply follows
from that, and ``check_divergence`` refuses the others before anything runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextvars import ContextVar

from torch import nn

from trd_lightning.rollout.base import RolloutEngine, Rollouts, Sampling
from trd_lightning.scores import TeacherScores
from trd_lightning.views import ModelInputs

#: Seeds for the prompts of one ``generate`` call made off the trainer's thread (a streaming step draws them in order
#: on its own thread, so the run stays reproducible); None: the teacher draws them from torch's RNG.
GENERATION_SEEDS: ContextVar[list[int] | None] = ContextVar("generation_seeds", default=None)


class Teacher(ABC):
    """Base class. The trainer calls ``setup`` once (before any compute), then ``generate`` and ``score``."""

    #: Whether the teacher's weights must go into checkpoints (they cannot be reloaded from a path).
    persistent: bool = False
    #: What ``score`` returns: "dense" (``DenseScores``) or "sparse" (``SparseScores``).
    scores: str = "dense"
    #: For sparse scores: how many of the teacher's most likely tokens each position carries.
    top_k: int | None = None
    #: Whether ``generate`` may run on other threads while the trainer computes (nothing of it on the trainer's devices).
    concurrent: bool = False

    @abstractmethod
    def setup(self, student: nn.Module, tokenizer, engine: RolloutEngine) -> nn.Module | None:
        """Load, build or connect, and check that the teacher shares the student's vocabulary, before any compute.
        Returns the module holding the teacher's own weights, which the trainer registers (so devices, sharding and
        checkpoints see it), or None when it has none in this process."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Rollouts:
        """``sampling.n`` completions of each prompt (token ids), grouped by prompt."""

    @abstractmethod
    def score(self, inputs: ModelInputs) -> TeacherScores:
        """The teacher's scores at every target position of ``inputs`` (one micro-batch), in row-major target order,
        without autograd."""

    def check_divergence(self, divergence) -> None:
        """Refuse, with the reason, a divergence this teacher's scores cannot compute."""
        divergence.check_teacher(self.scores, self.top_k, self.describe())

    def check_tokenizer(self, tokenizer, student) -> None:
        """Refuse, before any weights load, a teacher whose vocabulary is seen from its files alone to differ from the
        student's (``student``: its ``ModelSpec``; ``tokenizer``: its tokenizer). ``setup`` checks again on load."""

    def describe(self) -> str:
        return f"the {type(self).__name__}"

    def packs(self, packing: str, device) -> bool:
        """Whether ``score`` may be given one packed row (``packing`` is the trainer's policy)."""
        return True

    def shard(self, sharding, mesh) -> None:
        """Shard the teacher's own weights over ``mesh`` (FSDP2), if it has any."""

    def release(self) -> None:
        """Called once a micro-batch's divergence has used the scores: free what ``score`` kept gathered."""
