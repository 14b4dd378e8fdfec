"""Rollouts with transformers' ``generate``: batched, left-padded, with a KV cache, on the live module."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

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
            (temperature 1, before any sampling filter), which a ``logprob_guard`` can check; costs one
            [sequences, vocab] buffer per ``generate`` call (``SampledLogprobs``), never the whole logits.
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
        with SampledLogprobs(base_model(model)) if self.return_logprobs else nullcontext() as recorder:
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
                                 synced_gpus=synced)
        generated = out.sequences[:, width:]
        result = {"tokens": generated.tolist()}
        if recorder is not None:
            result["logprobs"] = recorder.result(generated).tolist()
        return result


class SampledLogprobs:
    """Each sampled token's log-probability under the model's raw logits, from one [B, V] buffer.

    ``generate`` can return every step's logits ([B, T, V]: 637 GB at 64 x 16k tokens of a 152k vocabulary) only to
    have one entry of each row read. Instead a forward hook keeps the last position's log-normalised raw logits
    (before temperature, top-p or top-k), and the next forward's input, the token sampled from them, picks its
    entry; the last step's token is picked once generation ends.
    """

    def __init__(self, model: nn.Module):
        self.model, self.pending, self.values = model, None, []

    def __enter__(self):
        self.handles = [self.model.register_forward_pre_hook(self.before, with_kwargs=True),
                        self.model.register_forward_hook(self.after, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def before(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if self.pending is not None and ids is not None:  # a decoding step: its input is the token just sampled
            self.values.append(self.pending.gather(-1, ids[:, -1:].to(self.pending.device)).squeeze(-1))
            self.pending = None

    def after(self, module, args, kwargs, output):
        self.pending = output.logits[:, -1, :].float().log_softmax(-1)

    def result(self, generated: torch.Tensor) -> torch.Tensor:
        """[B, T]: the log-probability of each generated token (after a row's stop token, of its padding: unused)."""
        if self.pending is not None:
            self.values.append(self.pending.gather(-1, generated[:, -1:].to(self.pending.device)).squeeze(-1))
        steps = generated.shape[1]  # a synced (sharded) generate may run more forwards than this rank generated
        return torch.stack(self.values[:steps], dim=1).cpu() if steps else torch.zeros(generated.shape[0], 0)
