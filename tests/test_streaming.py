"""The streaming step (``streaming: true``): its planner closes micro-batches as sequences arrive, and on the same
rollouts and rewrites it gives the synchronous step's gradients (the paper's token mean over the whole step), for OPD
and TRD, with the rewrites made in one call (a teacher on the trainer's devices) or sent ahead per row on threads (a
teacher that generates elsewhere: here the demo teacher on other threads, each prompt decoded alone and greedily, so
both flows get the same rewrites). The served teacher's streaming run is in `tests/teachers/test_vllm_server.py`."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from tests.conftest import DEMO_TEACHER, demo_module, fit_args, scalars
from tests.test_module import GradientCapture  # noqa: F401  (the callback the runs name)
from trd_lightning.cli import main
from trd_lightning.data import PromptDataModule
from trd_lightning.models import ModelSpec
from trd_lightning.refiners import TeacherRewrite
from trd_lightning.rollout import HFEngine, Rollouts, Sampling
from trd_lightning.streaming import Prefetch, StreamClock, StreamPlanner
from trd_lightning.teachers import SeparateTeacher
from trd_lightning.teachers.base import GENERATION_SEEDS


class ThreadedTeacher(SeparateTeacher):
    """The demo teacher, declared able to generate while the trainer computes (as a served teacher is), and decoding each
    prompt alone, so that a rewrite does not depend on which prompts shared its call."""

    concurrent = True

    def generate(self, prompts, sampling):
        return Rollouts.join([replace(super(ThreadedTeacher, self).generate([p], sampling), prompt_index=[k] * sampling.n)
                              for k, p in enumerate(prompts)])


class GatedTeacher(ThreadedTeacher):
    """Answers the first request at once, and the others only once ``gate`` is set (or after 20 s)."""

    def __init__(self, model):
        super().__init__(model)
        self.gate, self.calls, self.lock = threading.Event(), 0, threading.Lock()

    def generate(self, prompts, sampling):
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        if not first:
            self.gate.wait(timeout=20)
        return super().generate(prompts, sampling)


@pytest.mark.slow
def test_a_rewrite_is_taken_as_soon_as_it_is_written_while_others_are_out():
    module = demo_module(GatedTeacher(ModelSpec(path=DEMO_TEACHER)), TeacherRewrite(template="demo_refine", sampling=Sampling(greedy=True)))
    data = PromptDataModule(train_path="demo:data/train.jsonl", prompt_template="demo_student", batch_size=4, tokenizer=module.tokenizer)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rollouts = module.engine.generate("student", module.student, batch.prompt_ids, module.sampling)
    prefetch, parts = Prefetch(module.teacher.generate, 8, StreamClock(), len(rollouts)), {}
    try:
        module.send_ahead(batch, 0, rollouts, prefetch)
        arrivals = module.arrivals(batch, rollouts, prefetch, parts)
        first, part = next(arrivals)
        assert prefetch.in_flight() and len(part.token_ids) == 1  # one row in, the others still being written
        module.teacher.gate.set()
        assert sorted([first, *(row for row, _ in arrivals)]) == list(range(len(rollouts))) == sorted(parts)
    finally:
        module.teacher.gate.set()
        prefetch.close()


class AskedTeacher(ThreadedTeacher):
    """Sets ``asked`` at its first generation request."""

    asked = threading.Event()

    def generate(self, prompts, sampling):
        AskedTeacher.asked.set()
        return super().generate(prompts, sampling)


class PerPromptEngine(HFEngine):
    """The HF engine, each prompt's rollouts yielded alone (as vLLM's engine yields them when they finish); before the
    last it waits (up to 20 s) for the teacher's first request, and records whether one came."""

    asked_before_last: list[bool] = []

    def stream(self, role, model, prompts, sampling):
        for k, prompt in enumerate(prompts):
            if k == len(prompts) - 1:
                PerPromptEngine.asked_before_last.append(AskedTeacher.asked.wait(timeout=20))
            yield k, replace(self.generate(role, model, [prompt], sampling), prompt_index=[k] * sampling.n)


@pytest.mark.slow
def test_rewrites_are_requested_as_the_engine_finishes_each_rollout(tmp_path):
    AskedTeacher.asked.clear()
    PerPromptEngine.asked_before_last.clear()
    _, logged = one_step(tmp_path, "trd", "streaming", "--model.init_args.streaming=true", GREEDY_REWRITES,
                         "--model.init_args.teacher.class_path=tests.test_streaming.AskedTeacher",
                         "--model.init_args.engine=tests.test_streaming.PerPromptEngine")
    assert PerPromptEngine.asked_before_last == [True]  # the teacher was writing while the engine still rolled out
    assert logged["stream/requests"][0][1] == 8 and logged["refine/refined_fraction"][0][1] > 0


def test_a_rows_rewrite_seed_does_not_depend_on_when_its_rollout_finished():
    def seeds_by_row(order):
        sent = {}

        def generate(prompts, sampling):
            sent[prompts[0][0]] = GENERATION_SEEDS.get()  # the prompt names its row
            return Rollouts([0], [[1]], ["x"], [False])

        torch.manual_seed(11)
        prefetch = Prefetch(generate, 4, StreamClock(), rows=4)
        for row in order:
            prefetch.add(row, *([] if row == 2 else [[[row]], Sampling()]))  # row 2 asks for nothing
        assert sorted(prefetch.finished()) == [0, 1, 2, 3]
        prefetch.close()
        return sent

    torch.manual_seed(11)
    synchronous = torch.randint(0, 2**31 - 1, (4,)).tolist()  # one call over every row draws one seed per row, in order
    assert seeds_by_row([0, 1, 2, 3]) == seeds_by_row([3, 1, 0, 2]) == {r: [synchronous[r]] for r in (0, 1, 3)}


def test_the_planner_closes_a_micro_batch_when_the_next_sequence_would_not_fit():
    packed = StreamPlanner(budget=10, padded=False)
    assert [packed.add(r, c) for r, c in enumerate([4, 5, 3, 12, 2])] == [[], [], [[0, 1]], [[2]], [[3]]]
    assert packed.flush() == [[4]] and packed.flush() == []
    padded = StreamPlanner(budget=10, padded=True)  # rows x the longest
    assert [padded.add(r, c) for r, c in enumerate([3, 3, 3, 4, 1])] == [[], [], [], [[0, 1, 2]], []]
    assert padded.flush() == [[3, 4]]
    whole = StreamPlanner(budget=None, padded=False)
    assert [whole.add(r, 100) for r in range(3)] == [[], [], []] and whole.flush() == [[0, 1, 2]]


def one_step(tmp_path, config: str, name: str, *extra: str):
    path = tmp_path / f"{name}.pt"
    main([*fit_args(config, tmp_path, name, 1, "--data.init_args.batch_size=8", "--model.init_args.max_tokens_per_micro_batch=300",
                    "--model.init_args.gradient_clip_val=null",  # clipping would hide a wrong scale
                    "--trainer.callbacks+=tests.test_module.GradientCapture", f"--trainer.callbacks.path={path}", *extra)])
    return torch.load(path, weights_only=True), scalars(tmp_path / name / "version_0")


GREEDY_REWRITES = "--model.init_args.refiner.init_args.sampling.greedy=true"
THREADED = "--model.init_args.teacher.class_path=tests.test_streaming.ThreadedTeacher"


@pytest.mark.slow
@pytest.mark.parametrize("config, extra", [("opd", ()), ("trd", (GREEDY_REWRITES,)), ("trd", (GREEDY_REWRITES, THREADED))],
                         ids=["opd", "trd", "trd, rewrites sent ahead"])
def test_streaming_gives_the_synchronous_steps_gradients(config, extra, tmp_path):
    sync, sync_logged = one_step(tmp_path, config, "sync", *extra)
    streamed, logged = one_step(tmp_path, config, "streaming", "--model.init_args.streaming=true", *extra)
    assert logged["step/micro_batches"][0][1] > 1 and sync_logged["step/micro_batches"][0][1] > 1
    assert logged["train/target_tokens"] == sync_logged["train/target_tokens"]
    if config == "trd":
        assert logged["refine/refined_fraction"][0][1] > 0 and logged["refine/refined_fraction"] == sync_logged["refine/refined_fraction"]
    torch.testing.assert_close(logged["train/loss"][0][1], sync_logged["train/loss"][0][1], atol=1e-5, rtol=1e-5)
    assert streamed.keys() == sync.keys() and sync
    for key, value in sync.items():
        torch.testing.assert_close(streamed[key], value, atol=1e-5, rtol=1e-4, msg=key)
    if THREADED in extra:
        assert logged["stream/requests"][0][1] == 8  # every rollout's rewrite went ahead
        assert "time/stream_wait" in logged and "stream/overlap_fraction" in logged
