"""Shared fixtures: the real demo tokenizer (with its chat template) and tiny random Qwen3 models saved to disk."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

TOKENIZER = "demo:tokenizer"
TINY = {
    "model_type": "qwen3",
    "vocab_size": 259,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "eos_token_id": 256,
    "pad_token_id": 257,
}


def save_tiny_model(directory, seed: int, **overrides) -> str:
    from trd_lightning.models import ModelSpec, load_model, load_tokenizer

    torch.manual_seed(seed)
    spec = ModelSpec(config={**TINY, **overrides}, tokenizer=TOKENIZER)
    model = load_model(spec)
    model.save_pretrained(directory)
    load_tokenizer(spec).save_pretrained(directory)
    return str(directory)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """Tests call the CLI with explicit args; pytest's own argv must not look like a second command line."""
    monkeypatch.setattr("sys.argv", ["trd"])


@pytest.fixture(scope="session")
def tokenizer():
    from trd_lightning.models import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec(path=TOKENIZER))


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("student"), seed=1)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("teacher"), seed=2, hidden_size=96, num_attention_heads=2)


@pytest.fixture(scope="session")
def chain_data(tmp_path_factory):
    """Small chain-task splits, as JSONL files."""
    from trd_lightning.data.chain import sample_problems

    directory = tmp_path_factory.mktemp("data")
    problems = sample_problems(24, 3, seed=7)
    for name, rows in (("train", problems[:16]), ("val", problems[16:20]), ("test", problems[20:])):
        with open(directory / f"{name}.jsonl", "w") as handle:
            for p in rows:
                handle.write(json.dumps({"problem": p.text, "answer": p.answer, "solution": p.solution}) + "\n")
    return directory
