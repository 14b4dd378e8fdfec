"""Rollouts with transformers' ``generate``: batched, left-padded, with a KV cache, on the live module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trd_lightning.distributed import distributed
from trd_lightning.models import base_model, evaluating, is_sharded
from trd_lightning.rollout.base import RolloutEngine, Rollouts, Sampling, split_completion


class HFEngine(RolloutEngine):
    """Generates with the module being trained, so its weights are always the current ones.

    Args:
        batch_size: the most sequences (prompts x ``sampling.n``) one ``generate`` call decodes together (> 0).
        return_logprobs: also return each sampled token's log-probability under the model's raw distribution
            (temperature 1, before any sampling filter), which a ``logprob_guard`` can check; costs memory: each
            ``generate`` call keeps its [sequences, tokens, vocab] logits.
    """

    def __init__(self, batch_size: int = 64, return_logprobs: bool = False):
        if batch_size <= 0:
            raise ValueError(f"HFEngine batch_size must be > 0 (got {batch_size})")
        self.batch_size = batch_size
        self.return_logprobs = return_logprobs

    def generate(self, role: str, model: nn.Module, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Rollouts:
        from transformers import GenerationConfig

        expanded = [list(p) for p in prompts for _ in range(sampling.n)]
        # A fresh config, so nothing from the checkpoint's generation_config.json (top_k=50, a
        # repetition penalty, ...) silently changes the sampling distribution.
        config = GenerationConfig(
            do_sample=not sampling.greedy,
            temperature=None if sampling.greedy else sampling.temperature,
            top_p=None if sampling.greedy else sampling.top_p,
            top_k=None if sampling.greedy else sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=self.return_logprobs,
        )
        token_ids, truncated, logprobs = [], [], []
        with torch.no_grad(), evaluating(model):
            for start in range(0, len(expanded), self.batch_size):
                chunk = expanded[start : start + self.batch_size]
                out = self._generate_chunk(model, chunk, config)
                for row, generated in enumerate(out["tokens"]):
                    ids, cut = split_completion(generated, self.stop_ids, sampling.max_new_tokens)
                    token_ids.append(ids)
                    truncated.append(cut)
                    if self.return_logprobs:
                        logprobs.append(out["logprobs"][row][: len(ids)])
        return Rollouts(
            prompt_index=[i for i in range(len(prompts)) for _ in range(sampling.n)],
            token_ids=token_ids,
            texts=[self.decode(ids) for ids in token_ids],
            truncated=truncated,
            logprobs=logprobs if self.return_logprobs else None,
        )

    def _generate_chunk(self, model: nn.Module, prompts: list[list[int]], config) -> dict:
        device = base_model(model).get_input_embeddings().weight.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        # A sharded model gathers weights in every forward: all ranks must run as many, until every rank is done.
        synced = is_sharded(model) and distributed()
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
                             synced_gpus=synced)
        generated = out.sequences[:, width:]
        result = {"tokens": generated.tolist()}
        if config.output_logits:
            logits = torch.stack(out.logits, dim=1).float()  # [B, T, V], before any sampling filter
            result["logprobs"] = logits.log_softmax(-1).gather(-1, generated[..., None]).squeeze(-1).tolist()
        return result
