"""Code tests as the datasets store them: outputs compared as the benchmarks do, and compressed cases never unpickled as objects."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest

from trd_lightning.code_tests import BadTestsError, parse_tests, same_output


def test_outputs_compare_as_the_benchmarks_do():
    assert same_output("3  \n\n", "3\n", 1e-6)
    assert same_output("1 2\n3", "1 2 \n 3\n", 1e-6)
    assert same_output("0.3333333", "0.33333333333", 1e-6)
    assert not same_output("0.33", "0.3333333", 1e-6)
    assert not same_output("1 2", "1 2 3", 1e-6)
    assert not same_output("YES", "yes", 1e-6)


def test_compressed_cases_never_unpickle_objects():
    evil = base64.b64encode(zlib.compress(pickle.dumps(BadTestsError("x")))).decode()
    with pytest.raises(BadTestsError, match="neither JSON"):
        parse_tests.__wrapped__(json.dumps({"tests": evil}))
