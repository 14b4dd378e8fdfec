"""TeacherRewrite (TRD): its template and sampling checked, and the opt-in that trains only on step-valid rewrites."""

from __future__ import annotations

import pytest

from tests.conftest import fit_args, scalars
from trd_lightning.cli import main
from trd_lightning.refiners import TeacherRewrite
from trd_lightning.rollout import Sampling


@pytest.mark.parametrize("template, missing", [("{problem} fix it", "{attempt}"), ("{attempt} only", "{problem}")])
def test_refine_template_without_a_placeholder_is_refused(template, missing):
    with pytest.raises(ValueError, match=f"lacks the placeholder {missing}"):
        TeacherRewrite(template)


def test_refiner_sampling_must_be_one_per_rollout():
    with pytest.raises(ValueError, match="sampling.n must be 1"):
        TeacherRewrite("demo_refine", sampling=Sampling(n=2))


@pytest.mark.slow
def test_require_valid_steps_trains_only_on_step_valid_rewrites(tmp_path):
    """Opt-in: a rewrite whose derivation the verifier finds wrong at a step falls back to y_o, counted."""
    main(fit_args("trd_opsd", tmp_path, "strict", 3, "--model.init_args.refiner.init_args.require_valid_steps=true"))
    logged = scalars(tmp_path / "strict/version_0")
    assert logged["refine/steps_valid_y_r"], "no rewrite was accepted: nothing was checked"
    assert [value for _, value in logged["refine/steps_valid_y_r"]] == [1.0] * len(logged["refine/steps_valid_y_r"])
    assert [value for _, value in logged["refine/answer_patched"]] == [0.0] * len(logged["refine/answer_patched"])
    assert len(logged["refine/fallbacks"]) == 3
