"""The HF rollout engine on a real (tiny, random) model: stopping, truncation, n samples, current weights."""

from __future__ import annotations

import pytest
import torch

from trd_lightning.models import ModelSpec, load_model
from trd_lightning.rollout import HFEngine, Sampling
from trd_lightning.views import ChatPrompts


@pytest.fixture()
def model(student_dir):
    return load_model(ModelSpec(path=student_dir))


@pytest.fixture()
def prompts(tokenizer):
    chat = ChatPrompts(tokenizer)
    return [chat.chat_ids("1+2*3"), chat.chat_ids("9-8"), chat.chat_ids("5*5*5-1")]


def engine_for(tokenizer, stop_ids, **kwargs):
    engine = HFEngine(**kwargs)
    engine.setup(tokenizer, stop_ids)
    return engine


def test_generation_stops_at_the_first_stop_token(tokenizer, model, prompts):
    stop_ids = set(range(0, 180))  # most of the vocabulary, so a random model stops within a few tokens
    engine = engine_for(tokenizer, stop_ids, batch_size=2)  # two generate calls, uneven
    torch.manual_seed(0)
    out = engine.generate("student", model, prompts, Sampling(max_new_tokens=40, n=3))
    assert len(out) == 9 and out.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for ids, cut in zip(out.token_ids, out.truncated):
        assert ids and not cut
        assert ids[-1] in stop_ids and not any(t in stop_ids for t in ids[:-1])  # nothing after the stop token


def test_truncated_rollouts_are_recorded(tokenizer, model, prompts):
    engine = engine_for(tokenizer, {tokenizer.eos_token_id})
    torch.manual_seed(0)
    out = engine.generate("student", model, prompts, Sampling(max_new_tokens=6))
    for ids, cut in zip(out.token_ids, out.truncated):
        assert cut == (len(ids) == 6 and ids[-1] != tokenizer.eos_token_id)
    assert any(out.truncated)


def test_sampling_filters_reach_generate(tokenizer, model, prompts):
    """top_k=1 is greedy decoding, whatever the temperature."""
    engine = engine_for(tokenizer, {tokenizer.eos_token_id})
    greedy = engine.generate("student", model, prompts, Sampling(greedy=True, max_new_tokens=8))
    torch.manual_seed(1)
    top1 = engine.generate("student", model, prompts, Sampling(temperature=3.0, top_k=1, max_new_tokens=8))
    assert top1.token_ids == greedy.token_ids


def test_rollouts_follow_the_current_weights(tokenizer, model, prompts):
    """Same seed, same prompts: changing the weights in place changes what is sampled."""
    engine = engine_for(tokenizer, {tokenizer.eos_token_id}, return_logprobs=True)
    sampling = Sampling(temperature=1.0, max_new_tokens=12, n=2)
    torch.manual_seed(3)
    before = engine.generate("student", model, prompts, sampling)
    torch.manual_seed(3)
    again = engine.generate("student", model, prompts, sampling)
    assert again.token_ids == before.token_ids  # deterministic given the seed
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    torch.manual_seed(3)
    after = engine.generate("student", model, prompts, sampling)
    assert after.token_ids != before.token_ids


def test_engine_logprobs_are_the_models(tokenizer, model, prompts):
    """Logprobs the engine reports equal a fresh forward pass's log-softmax at the sampled tokens."""
    engine = engine_for(tokenizer, {tokenizer.eos_token_id}, return_logprobs=True)
    torch.manual_seed(0)
    out = engine.generate("student", model, prompts[:1], Sampling(temperature=0.7, top_p=0.9, max_new_tokens=10))
    ids = prompts[0] + out.token_ids[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = logits.log_softmax(-1)[len(prompts[0]) - 1: -1].gather(-1, torch.tensor(out.token_ids[0])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), expected, atol=1e-4, rtol=1e-4)


def test_engine_logprobs_hold_for_every_row_of_a_padded_batch_without_keeping_the_logits(tokenizer, model, prompts, monkeypatch):
    """Several prompts of different lengths (left padding), two samples each, rows that stop early: each sampled
    token's raw log-probability equals a fresh forward's, and ``generate`` is never asked for its logits."""
    from transformers import GenerationMixin

    asked = []
    generate = GenerationMixin.generate
    monkeypatch.setattr(GenerationMixin, "generate", lambda self, *a, **k: asked.append(k["generation_config"].output_logits)
                        or generate(self, *a, **k))
    engine = engine_for(tokenizer, {tokenizer.eos_token_id}, return_logprobs=True)
    torch.manual_seed(1)
    out = engine.generate("student", model, prompts, Sampling(temperature=0.8, top_k=5, max_new_tokens=12, n=2))
    assert asked and not any(asked)
    for row, (index, ids) in enumerate(zip(out.prompt_index, out.token_ids)):
        context = prompts[index]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([context + ids])).logits[0].float()
        expected = logits.log_softmax(-1)[len(context) - 1: -1].gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(out.logprobs[row]), expected, atol=1e-4, rtol=1e-4)
    assert len({len(p) for p in prompts}) > 1  # left padding in play
