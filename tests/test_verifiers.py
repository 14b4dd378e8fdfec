"""CodeVerifier on small problems in the three schemas (TACO, LiveCodeBench, EvalPlus), read through
PromptDataModule's field mappings: a correct solution passes, and each kind of wrong one fails."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest

from tests.conftest import ROOT, SCHEMAS, SUM_STDIN, fenced, load_schema, save_tiny_model
from trd_lightning.code_tests import BadTestsError, parse_tests, same_output
from trd_lightning.data import PromptDataModule
from trd_lightning.sandbox import Limits
from trd_lightning.verifiers import AnswerParseError, CodeVerifier


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(limits=Limits(cpu_seconds=2, wall_seconds=2.0, memory_mb=512), workers=2)


@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_every_verdict_is_right(schema, verifier, tmp_path, tokenizer):
    rows, items, _ = load_schema(schema, tmp_path, tokenizer)
    responses, answers, expected, labels = [], [], [], []
    for row, item in zip(rows, items):
        verifier.check_answer(item["answer"])
        for label, response in [("correct", row["correct"]), *row["wrong"].items()]:
            responses.append(response)
            answers.append(item["answer"])
            expected.append(label == "correct")
            labels.append(f"{item['source']}: {label}")
    verdicts = verifier.verdicts(responses, answers)  # all at once, through the worker pool
    assert {label: v.passed for label, v in zip(labels, verdicts)} == dict(zip(labels, expected))
    assert verifier.score_many(responses, answers) == expected
    for label, v in zip(labels, verdicts):
        assert v.fraction == (1.0 if label.endswith("correct") else v.fraction) and 0 <= v.fraction <= 1
        if label.endswith("no code block"):
            assert v.fraction == 0.0


def test_fraction_counts_the_tests_passed(verifier):
    tests = json.dumps({"inputs": ["1\n", "2\n", "3\n", "4\n"], "outputs": ["1\n", "4\n", "9\n", "4\n"]})
    verdict, = verifier.verdicts([fenced("x = int(input())\nprint(x * x)")], [tests])  # right on 3 of 4 cases
    assert (verdict.passed, verdict.fraction, verdict.tests) == (False, 0.75, 4)


def test_extract_means_has_a_program(verifier):
    assert verifier.extract("no code here") is None
    assert verifier.extract("```python\n\n```") is None
    assert verifier.extract("```\nprint(1)\n```") == "print(1)\n"
    # the last Python block wins over a later block in another language
    assert verifier.extract("```python\nprint(1)\n```\n```python\nprint(2)\n```\n```text\n2\n```") == "print(2)\n"


def test_outputs_compare_as_the_benchmarks_do():
    assert same_output("3  \n\n", "3\n", 1e-6)
    assert same_output("1 2\n3", "1 2 \n 3\n", 1e-6)
    assert same_output("0.3333333", "0.33333333333", 1e-6)
    assert not same_output("0.33", "0.3333333", 1e-6)
    assert not same_output("1 2", "1 2 3", 1e-6)
    assert not same_output("YES", "yes", 1e-6)


def test_bad_tests_are_clear_errors(verifier):
    for answer, message in [("", "no tests"), ('{"inputs": ["1"], "outputs": []}', "as many outputs"),
                            ('[{"input": "1", "output": "1", "testtype": "functional"}]', "function name"),
                            ("not json, not compressed", "neither JSON"),
                            ('{"test": "def check(c): pass"}', "entry_point")]:
        with pytest.raises(AnswerParseError, match=message):
            verifier.check_answer(answer)


def test_compressed_cases_never_unpickle_objects():
    evil = base64.b64encode(zlib.compress(pickle.dumps(BadTestsError("x")))).decode()
    with pytest.raises(BadTestsError, match="neither JSON"):
        parse_tests.__wrapped__(json.dumps({"tests": evil}))


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


def test_site_packages_is_a_choice():
    answer = json.dumps({"inputs": [""], "outputs": ["1"]})
    response = fenced("import sys\nprint(sys.flags.no_site)")
    assert CodeVerifier(workers=1).score(response, answer)  # standard library only: no `site`
    assert not CodeVerifier(workers=1, site_packages=True).score(response, answer)


@pytest.mark.parametrize("config", ["opd", "opsd", "trd", "trd_opsd", "smollm2_trd"])
def test_code_configs_parse(config):
    """Every code config parses, uses the code templates and CodeVerifier, and names its test sets."""
    import subprocess
    import sys

    import yaml

    printed = subprocess.run([sys.executable, "-m", "trd_lightning.cli", "fit", "--config", f"configs/code/{config}.yaml", "--print_config"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["init_args"]["verifier"]["class_path"] == "trd_lightning.verifiers.CodeVerifier"
    assert "math" not in printed.replace("math_verify", "")
    tests = parsed["data"]["init_args"]["test_path"]
    assert {"humaneval_plus", "mbpp_plus"} <= set(tests) and any(name.startswith("livecodebench") for name in tests)


def test_tests_passed_is_reported_beside_avg_and_pass(verifier):
    from trd_lightning.metrics import SampledAccuracy

    tests = json.dumps({"inputs": ["1\n", "2\n", "3\n", "4\n"], "outputs": ["1\n", "4\n", "9\n", "4\n"]})
    verdicts, fractions = verifier.grade_many([fenced("x = int(input())\nprint(x * x)"), "no code"], [tests, tests])
    assert verdicts == [False, False] and fractions == [0.75, 0.0]
    metric = SampledAccuracy(n=2, ks=[1])
    metric.update([0], tests_passed=fractions)
    assert float(metric.compute()["tests_passed"]) == pytest.approx(0.375)
    math_like = SampledAccuracy(n=2, ks=[1])
    math_like.update([1])
    assert "tests_passed" not in math_like.compute()  # only verifiers that run tests report it


def test_the_code_config_trains_and_tests_through_trd(tmp_path, monkeypatch):
    """configs/code/smollm2_trd.yaml with tiny random models in place of SmolLM2: a TRD step through `trd fit`
    and `trd test` results per code dataset. The tiny models write no program, so nothing runs in the sandbox
    here; tests/test_code_real_model.py has SmolLM2 write real code."""

    import yaml

    from trd_lightning.cli import main

    # Byte-level tiny models: code prompts take many tokens, so a longer context than the shared fixtures'.
    student_dir = save_tiny_model(tmp_path / "student", seed=1, max_position_embeddings=2048)
    teacher_dir = save_tiny_model(tmp_path / "teacher", seed=2, max_position_embeddings=2048)
    monkeypatch.chdir(ROOT)
    tiny = {"model": {"init_args": {"student": {"path": student_dir, "gguf_file": None},  # laid over the shipped config (and its bases)
                                    "teacher": {"init_args": {"model": {"path": teacher_dir, "gguf_file": None}}}}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    common = ["--config", "configs/code/smollm2_trd.yaml", "--config", str(tmp_path / "tiny.yaml"),
              "--model.init_args.max_context_tokens=2048", "--data.init_args.max_prompt_tokens=1024",
              "--model.init_args.sampling.max_new_tokens=8", "--model.init_args.refiner.init_args.sampling.max_new_tokens=8",
              "--model.init_args.eval_sampling.max_new_tokens=8", f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--trainer.enable_progress_bar=false"]
    main(["fit", *common, "--trainer.max_steps=1"])
    main(["test", *common])
    results = json.loads((tmp_path / "code_smollm2_trd" / "version_1" / "results.json").read_text())["results"]
    datasets = ("humaneval_plus", "mbpp_plus", "livecodebench")
    assert {(r["dataset"], r["who"]) for r in results} == {(d, w) for d in datasets for w in ("student", "teacher")}
    assert all("tests_passed" in r and r["avg@2"] == 0.0 for r in results)  # random tiny models write no program


def test_unicode_programs_and_outputs(verifier):
    answer = json.dumps({"inputs": ["naïve ✓\n"], "outputs": ["NAÏVE ✓ → ok\n"]})
    assert verifier.score(fenced("# élan: upper-case the line\nprint(input().upper(), '→ ok')"), answer)
    assert not verifier.score(fenced("print('\udcff')"), answer)  # a lone surrogate fails the test, nothing crashes


def test_a_training_row_without_tests_fails_without_stopping(verifier):
    with pytest.warns(UserWarning, match="cannot be read"):
        verdict, = verifier.verdicts([fenced(SUM_STDIN)], [json.dumps({"inputs": [], "outputs": []})])
    assert (verdict.passed, verdict.fraction, verdict.tests) == (False, 0.0, 0)
