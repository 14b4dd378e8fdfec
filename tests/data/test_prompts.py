"""The prompt data module: reading, field checks, chat templating, and clear errors on bad data."""

from __future__ import annotations

import json

import pytest

from trd_lightning.data import DataError, PromptDataModule
from trd_lightning.data.chain import CORRUPTIONS, ChainProblem, extract_answer, first_error_step, flawed_attempt, parse_problem, sample_problems


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def test_jsonl_and_parquet_give_the_same_batches(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": "1+2", "a": "3", "s": "1+2=3;a:3"}, {"q": "2*4", "a": "8", "s": "2*4=8;a:8"}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    batches = []
    for path in (jsonl, str(tmp_path / "d.parquet")):
        dm = PromptDataModule(train_path=path, problem_field="q", answer_field="a", solution_field="s",
                              prompt_template="demo_student", batch_size=2, tokenizer=tokenizer)
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader())))
    a, b = batches
    assert sorted(a.problem) == sorted(b.problem) == ["1+2", "2*4"]
    for batch in batches:
        for problem, answer, ids in zip(batch.problem, batch.answer, batch.prompt_ids):
            assert tokenizer.decode(ids) == f"<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n"
            assert answer == {"1+2": "3", "2*4": "8"}[problem]


def test_empty_dataset_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    dm = PromptDataModule(train_path=str(path), tokenizer=tokenizer)
    with pytest.raises(DataError, match="empty.jsonl' is empty"):
        dm.setup("fit")


def test_missing_field_names_the_line_and_the_fields_present(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1", "answer": "2", "solution": "x"}, {"question": "1+2", "answer": "3"}])
    dm = PromptDataModule(train_path=path, prompt_template="demo_student", tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"d.jsonl:2: missing the field 'problem' \(set by `problem_field`\); the row has: question, answer"):
        dm.setup("fit")


def test_missing_solution_suggests_turning_it_off(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1", "answer": "2"}])
    with pytest.raises(DataError, match="solution_field: null"):
        PromptDataModule(train_path=path, prompt_template="demo_student", tokenizer=tokenizer).setup("fit")
    dm = PromptDataModule(train_path=path, prompt_template="demo_student", solution_field=None, tokenizer=tokenizer)
    dm.setup("fit")
    assert dm.prepare("train")[0]["solution"] is None and not dm.has_solutions


def test_invalid_utf8_names_the_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"problem": "1", "answer": "1", "solution": "1"}\n{"problem": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: the line is not valid UTF-8"):
        PromptDataModule(train_path=str(path), tokenizer=tokenizer).setup("fit")


def test_invalid_json_names_the_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "1", "answer": "1", "solution": "1"}\n{"problem": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        PromptDataModule(train_path=str(path), tokenizer=tokenizer).setup("fit")


def test_prompt_over_the_limit_names_the_row_and_the_setting(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1", "answer": "2", "solution": "s"},
                                              {"problem": "1+" * 40 + "1", "answer": "2", "solution": "s"}])
    dm = PromptDataModule(train_path=path, prompt_template="demo_student", max_prompt_tokens=30, tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"d.jsonl:2: .*over the limit of 30.*max_prompt_tokens"):
        dm.setup("fit")


def test_missing_file_is_a_clear_error(tokenizer):
    with pytest.raises(FileNotFoundError, match="data path '/nowhere/x.jsonl' does not exist"):
        PromptDataModule(train_path="/nowhere/x.jsonl", tokenizer=tokenizer).setup("fit")


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, "batch_size must be > 0"), ({"batch_size": -3}, "batch_size must be > 0"),
                                            ({"prompt_template": "no slots here"}, "neither a built-in template")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptDataModule(**kwargs)


def test_chain_task_solution_and_verifier():
    problem = parse_problem("7+3*2-5+8*4")
    assert problem.solution == "7+3=0;0*2=0;0-5=5;5+8=3;3*4=2;a:2" and problem.answer == "2"
    assert first_error_step(problem, problem.solution) is None
    assert first_error_step(problem, "7+3=0;0*2=1;1-5=6;6+8=4;4*4=6;a:6") == 1
    assert first_error_step(problem, "7+3=0;0*2=0;a:0") == 2
    assert extract_answer("7+3=0;a:2") == "2" and extract_answer("no answer") is None


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_flawed_attempts_are_wrong_from_their_first_error(kind):
    import random

    rng = random.Random(0)
    firsts = []
    for problem in sample_problems(200, 5, seed=1):
        attempt, first = flawed_attempt(problem, rng, (kind,))
        assert first is not None and first_error_step(problem, attempt) == first
        assert (extract_answer(attempt) is not None) or kind == "truncate"
        firsts.append(first)
    assert sum(f < 2 for f in firsts) > len(firsts) / 2  # most slips come early, as a weak student's do


def test_sampled_problems_are_distinct_and_respect_exclusions():
    first = sample_problems(50, 5, seed=0)
    second = sample_problems(50, 5, seed=0, exclude={p.text for p in first})
    assert len({p.text for p in first + second}) == 100
    assert isinstance(first[0], ChainProblem)
