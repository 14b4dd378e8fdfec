"""The rollout-engine interface: sampling options in, token ids (and their log-probabilities) out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from trd_lightning.scores import DecodedScores

STUDENT = "student"  # an engine holds weights by role: the student's, and a teacher's with weights of its own


@dataclass(frozen=True)
class Placement:
    """Where this process's engines run: its place among the trainer's processes, and its device.

    ``device_index`` is the accelerator the trainer gave this process (vLLM's torchrun-style launcher takes its
    device from ``LOCAL_RANK``, so this is what it must read there, even where devices are not numbered by rank).
    """

    rank: int = 0
    world_size: int = 1
    device_index: int | None = None  # None: the CPU
    compute_dtype: str = "float32"  # the dtype the trainer computes in (bf16 under bf16-mixed)


@dataclass
class Sampling:
    """How to sample a completion. ``top_k=0`` and ``top_p=1`` turn those filters off.

    Args:
        temperature: divides the logits before sampling (> 0; for greedy decoding set ``greedy``).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches this (1: off).
        top_k: keep the k most likely tokens (0: off).
        max_new_tokens: the longest completion; one cut there is marked truncated.
        n: completions per prompt.
        greedy: take the most likely token at each step (temperature, top_p and top_k are then ignored).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    n: int = 1
    greedy: bool = False

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"sampling temperature must be > 0 (got {self.temperature}); for greedy decoding set `greedy: true`")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1] (got {self.top_p}); use 1.0 to turn it off")
        if self.top_k < 0:
            raise ValueError(f"sampling top_k must be >= 0 (got {self.top_k}); use 0 to turn it off")
        if self.max_new_tokens <= 0:
            raise ValueError(f"sampling max_new_tokens must be > 0 (got {self.max_new_tokens})")
        if self.n <= 0:
            raise ValueError(f"sampling n (samples per prompt) must be > 0 (got {self.n})")

    def check_vocab(self, vocab_size: int) -> None:
        if self.top_k > vocab_size:
            raise ValueError(f"sampling top_k={self.top_k} is larger than the vocabulary ({vocab_size} tokens); lower it or use 0 to turn it off")


@dataclass
class Rollouts:
    """Completions of a batch of prompts, ``n`` per prompt, in prompt order.

    ``token_ids`` end with the stop token when generation stopped on one; ``truncated`` marks
    those cut at ``max_new_tokens``. ``logprobs``, when the engine provides them, are the
    log-probabilities of the sampled tokens under the model's unmodified (temperature 1) distribution;
    ``scores``, when a teacher returns them (``VLLMServerTeacher.scores_from_decode``), its top-k there too.
    """

    prompt_index: list[int]
    token_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    logprobs: list[list[float]] | None = None
    scores: list[DecodedScores] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def fields(self) -> tuple:
        return self.prompt_index, self.token_ids, self.texts, self.truncated, self.logprobs, self.scores

    def select(self, rows: Sequence[int]) -> Rollouts:
        pick = lambda values: None if values is None else [values[i] for i in rows]  # noqa: E731
        return Rollouts(*(pick(v) for v in self.fields()))

    @staticmethod
    def in_prompt_order(parts: Iterable[tuple[int, Rollouts]]) -> Rollouts:
        """One prompt's rollouts at a time (prompt k, its rollouts), as ``RolloutEngine.stream`` gives them, joined in
        prompt order."""
        return Rollouts.join([part for _, part in sorted(parts, key=lambda pair: pair[0])])

    @staticmethod
    def join(parts: Sequence[Rollouts]) -> Rollouts:
        """``parts`` one after another (an optional field only where every part has it; none: no rollouts)."""
        if not parts:
            return Rollouts([], [], [], [])
        columns = zip(*(part.fields() for part in parts))
        return Rollouts(*(None if any(c is None for c in column) else [v for c in column for v in c] for column in columns))


def split_completion(generated: Sequence[int], stop_ids: set[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """The completion up to and including its first stop token, and whether it was cut off instead."""
    for i, token in enumerate(generated):
        if token in stop_ids:
            return list(generated[: i + 1]), False
    return list(generated), len(generated) >= max_new_tokens


class RolloutEngine(ABC):
    """Generates completions. An engine serves named roles ("student", "teacher"); engines that
    keep their own copy of the weights (vLLM) receive them through ``sync_weights``."""

    tokenizer = None
    stop_ids: set[int] = set()
    placement = Placement()

    def setup(self, tokenizer, stop_ids: set[int], placement: Placement | None = None, sync_every: int = 1) -> None:
        """Called once the trainer knows its processes; ``sync_every``: the steps between the student's weight syncs."""
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.placement = placement or Placement()

    def check_roles(self, roles: set[str]) -> None:
        """Refuse, before anything loads, a setting that cannot serve these roles (e.g. a sleep level)."""

    def release(self) -> None:
        """The trainer is about to train: free what the engine holds on the device (vLLM: sleep mode)."""

    def sync_weights(self, role: str, model: nn.Module) -> None:
        """Make ``role`` generate with ``model``'s current weights. Engines that run the live module need nothing."""

    @property
    def holds_weights(self) -> bool:
        """Whether the engine generates from its own copy of the weights, which must be synced."""
        return False

    def has_weights(self, role: str) -> bool:
        """Whether ``role`` can generate now without a sync."""
        return not self.holds_weights

    @abstractmethod
    def generate(self, role: str, model: nn.Module, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Rollouts:
        """``sampling.n`` completions of each prompt, grouped by prompt."""

    def stream(self, role: str, model: nn.Module, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Iterator[tuple[int, Rollouts]]:
        """What ``generate`` returns, one prompt at a time as its ``n`` completions finish: (prompt k, its completions, with
        ``prompt_index`` k). Here, an engine that finishes a batch together: all of them once ``generate`` returns."""
        rollouts = self.generate(role, model, prompts, sampling)
        for k in range(len(prompts)):
            yield k, rollouts.select([i for i, owner in enumerate(rollouts.prompt_index) if owner == k])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def teardown(self) -> None:
        pass
