"""The prompt data module: reading, field checks and field paths (the code datasets' schemas among them), chat
templating, and clear errors on bad data."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SCHEMAS, SUM_STDIN, load_schema
from trd_lightning.data import DataError, PromptDataModule
from trd_lightning.sandbox import Limits
from trd_lightning.verifiers import CodeVerifier


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
    with pytest.raises(DataError, match="data.init_args.train_path: train data path '/nowhere/x.jsonl' does not exist"):
        PromptDataModule(train_path="/nowhere/x.jsonl", tokenizer=tokenizer).setup("fit")


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, "batch_size must be > 0"), ({"batch_size": -3}, "batch_size must be > 0"),
                                            ({"prompt_template": "no slots here"}, "neither a built-in template")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptDataModule(**kwargs)


@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_the_student_prompt_shows_the_starter_code(schema, tmp_path, tokenizer):
    rows, items, tokenizer = load_schema(schema, tmp_path, tokenizer)
    for row, item in zip(rows, items):
        prompt = tokenizer.decode(item["prompt_ids"])
        starter = (row.get("starter_code") or "").strip()
        if starter:
            assert starter in item["problem"] and starter in prompt
        if schema == "evalplus":
            assert row["prompt"].strip() in prompt and "```python" in prompt
    if schema == "taco":  # the reference for OPSD is solutions[0]
        assert items[0]["solution"] == SUM_STDIN


def test_field_paths_name_the_missing_field(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "q", "solutions": "[]", "input_output": "{}"}) + "\n")
    data = PromptDataModule(test_path=str(path), problem_field="question", answer_field={"tests": "input_output"},
                            solution_field="solutions[0]", prompt_template="code_student", tokenizer=tokenizer)
    with pytest.raises(Exception, match=r"solutions\[0\]"):
        data.prepare("test")


@pytest.mark.slow
def test_each_named_dataset_reads_its_own_schema(tmp_path, tokenizer):
    """One data module, three test sets in three schemas: per-dataset field mappings, one code path."""
    paths = {}
    for schema, (rows, fields) in SCHEMAS.items():
        paths[schema] = {"path": str(tmp_path / f"{schema}.jsonl"), **{k: v for k, v in fields.items()}}
        stored = [{k: v for k, v in r.items() if k not in ("correct", "wrong")} for r in rows]
        (tmp_path / f"{schema}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stored))
    data = PromptDataModule(test_path=paths, tokenizer=tokenizer, problem_field="nope", answer_field="nope")
    verifier = CodeVerifier(limits=Limits(cpu_seconds=2, wall_seconds=2.0), workers=2)
    for schema, (rows, _) in SCHEMAS.items():
        items = list(data.prepare("test", schema))
        assert verifier.score_many([r["correct"] for r in rows], [it["answer"] for it in items]) == [True] * len(rows)
    with pytest.raises(Exception, match="unknown keys"):
        PromptDataModule(test_path={"x": {"path": "a.jsonl", "answer_fields": "y"}}, tokenizer=tokenizer)
