"""The served teacher's HTTP client: a request nobody answers (a local server that holds requests: the one fake) is
retried, then fails naming what happened."""

from __future__ import annotations

import pytest

from tests.conftest import Holding
from trd_lightning.teachers import VLLMServerTeacher
from trd_lightning.teachers.client import ServerUnavailableError
from trd_lightning.views import pack


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
