"""The served teacher's refusals and failures that need no vLLM: start-up errors stop a run before it computes anything;
a request nobody answers (a local server that holds requests: the one fake) is retried, then fails.
The rest of ``VLLMServerTeacher`` runs against a real vLLM server in ``test_vllm_server.py`` (CI's vLLM stage)."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import ROOT, Holding, scalars
from trd_lightning.cli import main
from trd_lightning.teachers import VLLMServerTeacher
from trd_lightning.teachers.client import ServerUnavailableError
from trd_lightning.teachers.serve import free_port
from trd_lightning.views import pack


def fit_args(config: str, save_dir, url: str | None = None, *extra: str) -> list[str]:
    """2 steps of ``config`` through the CLI, small and quiet; ``url``: the server teacher's."""
    return ["fit", "--config", str(ROOT / "configs" / config), "--trainer.max_steps=2", f"--trainer.logger.init_args.save_dir={save_dir}",
            "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--validate_before_fit=false",
            "--trainer.limit_val_batches=0", "--data.init_args.batch_size=8", "--model.init_args.export_student=false",
            *([f"--model.init_args.teacher.init_args.urls={json.dumps([url])}"] if url else []), *extra]


def test_full_vocabulary_divergence_with_a_server_teacher_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(SystemExit, match="support: full needs the teacher's whole distribution"):
        main(fit_args("demo/trd_server.yaml", tmp_path, "http://127.0.0.1:9", "--model.init_args.divergence.support=full",
                      "--model.init_args.divergence.tail=false"))


def test_a_server_down_at_start_up_stops_before_any_compute(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(SystemExit, match=f"the teacher server at {url} is not reachable") as stopped:
        main(fit_args("demo/trd_server.yaml", tmp_path, url, "--model.init_args.teacher.init_args.max_retries=1",
                      "--model.init_args.teacher.init_args.retry_backoff=0.1"))
    assert "Start it first" in str(stopped.value) and time.monotonic() - start < 60
    assert not list(tmp_path.rglob("*.ckpt"))
    assert not any(scalars(run) for run in tmp_path.glob("*/version_*"))  # no step ran: nothing measured




def test_a_request_nobody_answers_times_out_is_retried_then_fails_naming_what_happened():
    holding = Holding()
    try:
        teacher = VLLMServerTeacher([holding.url], "demo-teacher", top_k=0, timeout=0.3, max_retries=2, retry_backoff=0.05)
        with pytest.raises(ServerUnavailableError, match=r"teacher server \(demo-teacher\) gave no answer to POST /v1/completions "
                                                         r"after 3 attempts .*timeout 0.3 s each.*ReadTimeout"):
            teacher.score(pack([[1, 2]], [[3]], pad_id=0))
        assert holding.seen == 3
    finally:
        holding.close()
