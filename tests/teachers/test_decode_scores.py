"""Scores from the decode (``VLLMServerTeacher.scores_from_decode``): a micro-batch takes a row's teacher scores from
the decode that wrote its target when the target and its context are exactly what was decoded, and from the scoring
pass otherwise, in row-major target order. Here against the tiny teacher's own scoring pass (top-k, as a served
teacher sends), so the rows' placement is checked independently of the server; `test_vllm_server.py` checks a real
server's decode against its scoring pass. And the start-up check that refuses a server whose generation
log-probabilities are processed (a fake client: an error path)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import first_batch
from trd_lightning.losses import Divergence
from trd_lightning.models import ModelSpec
from trd_lightning.module import DistillationModule
from trd_lightning.rollout import Sampling
from trd_lightning.scores import DecodedScores, SparseScores, head_logits
from trd_lightning.step_metrics import StepRecord
from trd_lightning.teachers import SeparateTeacher, VLLMServerTeacher
from trd_lightning.teachers.vllm_server import TeacherSetupError
from trd_lightning.views import pack

TOP_K = 8


class TopKTeacher(SeparateTeacher):
    """The tiny teacher sending what a served teacher sends: its top-k and the target's log-probability."""

    scores, top_k = "sparse", TOP_K

    def score(self, inputs):
        dense = super().score(inputs)
        return SparseScores.from_logits(head_logits(dense.hidden, dense.weight, dense.bias), inputs.input_ids[inputs.target_mask], TOP_K)


@pytest.fixture(scope="module")
def step(student_dir, teacher_dir, tokenizer, chain_data):
    """A module with the top-k teacher, one batch, its rollouts and (OPD) targets."""
    module = DistillationModule(student=ModelSpec(path=student_dir), teacher=TopKTeacher(ModelSpec(path=teacher_dir)),
                                divergence=Divergence(direction="forward", support="topk", top_k=TOP_K),
                                sampling=Sampling(temperature=1.0, max_new_tokens=8, n=2), log_samples_every=0)
    module.configure_model()
    batch = first_batch(tokenizer, chain_data)
    torch.manual_seed(0)
    rollouts = module.engine.generate("student", module.student, batch.prompt_ids, module.sampling)
    return module, batch, rollouts


def decoded(module, context, target, poison: float = 0.0) -> DecodedScores:
    """What a decode of ``target`` after ``context`` returns (its scores, from a pass over that row alone), ``poison``
    added to every log-probability so that where they end up shows."""
    scores = module.teacher.score(pack([context], [target], module.tokenizer.pad_token_id))
    return DecodedScores(tuple(context), tuple(target), SparseScores(scores.ids, scores.logprobs + poison, scores.target_logprob + poison))


def test_a_micro_batch_takes_decoded_scores_for_unchanged_rows_and_the_pass_for_the_rest(step):
    module, batch, rollouts = step
    targets = module.refiner.refine(batch, rollouts, module.teacher_access)
    rows = list(range(len(rollouts)))
    assert len(rows) >= 4 and all(targets.token_ids)
    for r in rows[::2]:  # every other row was "decoded", its scores poisoned by +1
        targets.decoded[r] = decoded(module, targets.teacher_contexts[r], targets.token_ids[r], poison=1.0)
    edited = rows[2]
    targets.token_ids[edited] = targets.token_ids[edited][:-1] + [targets.token_ids[edited][0]]  # a refiner changed its last token
    views = module.make_views(batch, rollouts, targets, rows)
    record = StepRecord()
    merged = module.teacher_scores(batch, rollouts, targets, rows, views, record)
    passed = module.teacher.score(views.teacher)  # every row by the pass

    lengths = [len(targets.token_ids[r]) for r in rows]
    from_decode = torch.cat([torch.full((n,), r in targets.decoded and r != edited) for r, n in zip(rows, lengths)])
    assert int(from_decode.sum()) > 0 and not from_decode.all()
    torch.testing.assert_close(merged.target_logprob[from_decode], passed.target_logprob[from_decode] + 1.0)  # the decode's, in place
    torch.testing.assert_close(merged.logprobs[from_decode], passed.logprobs[from_decode] + 1.0)
    torch.testing.assert_close(merged.target_logprob[~from_decode], passed.target_logprob[~from_decode])  # the edited row: the pass
    assert torch.equal(merged.ids, passed.ids)
    assert record.totals["decode_scored_tokens"] == int(from_decode.sum())
    assert record.totals["teacher_pass_tokens"] == sum(len(targets.teacher_contexts[r]) + n for r, n in zip(rows, lengths)
                                                       if r not in targets.decoded or r == edited)


def test_unpoisoned_decoded_scores_give_the_pass_loss(step):
    module, batch, rollouts = step
    targets = module.refiner.refine(batch, rollouts, module.teacher_access)
    rows = list(range(len(rollouts)))
    for r in rows[1::2]:
        targets.decoded[r] = decoded(module, targets.teacher_contexts[r], targets.token_ids[r])
    views = module.make_views(batch, rollouts, targets, rows)
    fused, _ = module.distill(views, teacher=module.teacher_scores(batch, rollouts, targets, rows, views, StepRecord()))
    plain, _ = module.distill(views)
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-6, rtol=1e-6)


def test_a_dense_teacher_never_takes_decoded_scores(student_dir, teacher_dir, tokenizer, chain_data):
    module = DistillationModule(student=ModelSpec(path=student_dir), teacher=SeparateTeacher(ModelSpec(path=teacher_dir)),
                                sampling=Sampling(temperature=1.0, max_new_tokens=8), log_samples_every=0)
    module.configure_model()
    batch = first_batch(tokenizer, chain_data)
    rollouts = module.engine.generate("student", module.student, batch.prompt_ids, module.sampling)
    targets = module.refiner.refine(batch, rollouts, module.teacher_access)
    targets.decoded[0] = DecodedScores(tuple(targets.teacher_contexts[0]), tuple(targets.token_ids[0]), None)
    rows = list(range(len(rollouts)))
    record = StepRecord()
    module.teacher_scores(batch, rollouts, targets, rows, module.make_views(batch, rollouts, targets, rows), record)
    assert record.totals["decode_scored_tokens"] == 0


class Answers:
    """A server's answers to the start-up decode check (an error path: the scores a processed decode would send)."""

    def __init__(self, decode_logprob: float, pass_logprob: float):
        self.decode, self.passed = decode_logprob, pass_logprob

    def request(self, method, path, payload=None, url=None):
        if "prompt_logprobs" in payload:
            n = len(payload["prompt"])
            entry = {str(7): {"logprob": self.passed, "rank": 1}}
            return {"choices": [{"prompt_logprobs": [None] + [entry] * (n - 1)}]}
        return {"choices": [{"index": 0, "token_ids": [7, 7], "logprobs": {"top_logprobs": [{"token_id:7": self.decode}] * 2}}]}


@pytest.mark.parametrize("decode, accepted", [(-0.3005, True), (-1.5, False)])
def test_start_up_refuses_a_server_whose_decode_scores_are_processed(decode, accepted):
    teacher = VLLMServerTeacher(["http://127.0.0.1:9"], "t", top_k=1)
    teacher.client = Answers(decode_logprob=decode, pass_logprob=-0.31)
    if accepted:
        teacher.check_decode_scores("http://127.0.0.1:9", [1, 2, 3])
    else:
        with pytest.raises(TeacherSetupError, match="--logprobs-mode raw_logprobs.*scores_from_decode=false"):
            teacher.check_decode_scores("http://127.0.0.1:9", [1, 2, 3])
