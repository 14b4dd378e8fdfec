"""SmolLM2-135M writes code for a few problems through `trd test` with the code config: every program runs
in the sandbox, and the results come out per dataset."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, needs_smollm2
from trd_lightning.cli import main

pytestmark = [pytest.mark.slow, needs_smollm2]


def test_trd_test_on_code_reports_each_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names examples/code/ relative to the repository
    main(["test", "--config", "configs/code/smollm2_trd.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.enable_progress_bar=false", "--trainer.limit_test_batches=1",
          "--model.init_args.eval_sampling.n=1", "--model.init_args.eval_sampling.max_new_tokens=32",
          "--model.init_args.refiner.init_args.sampling.max_new_tokens=32", "--model.init_args.pass_k=[1]"])
    results = json.loads((tmp_path / "code_smollm2_trd" / "version_0" / "results.json").read_text())["results"]
    rows = {(r["dataset"], r["who"]): r for r in results}
    assert {d for d, _ in rows} == {"humaneval_plus", "mbpp_plus", "livecodebench"}
    for (dataset, who), row in rows.items():
        assert row["problems"] == {"humaneval_plus": 1, "mbpp_plus": 1, "livecodebench": 2}[dataset]
        assert 0.0 <= row["avg@1"] <= 1.0 and 0.0 <= row["pass@1"] <= 1.0
