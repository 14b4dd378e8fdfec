"""Where each process's vLLM engine runs and what it samples with, under several processes: the arguments and the
environment each rank gives vLLM, and per-rank request seeds that resume exactly. No vllm needed: these are the
values handed to ``vllm.LLM``; the vLLM stage runs the engine itself."""

from __future__ import annotations

import pytest
import torch

from trd_lightning.models import ModelSpec, load_model
from trd_lightning.module import DistillationModule
from trd_lightning.reliability import RolloutRandomness
from trd_lightning.rollout import EngineMemory, Placement, VLLMEngine
from trd_lightning.rollout.sleep import SleepSettingsError
from trd_lightning.rollout.vllm import launcher_environment, request_seeds
from trd_lightning.teachers import SelfTeacher, SeparateTeacher


@pytest.fixture(scope="module")
def student():
    return load_model(ModelSpec(path="demo:student"))


def arguments(model, placement: Placement, role: str = "student", **options) -> dict:
    engine = VLLMEngine(**options)
    engine.setup(None, set(), placement)
    return engine.engine_arguments(model, "/tmp/architecture", role)


def test_each_rank_of_eight_gets_its_own_device_through_the_torchrun_launcher(student):
    """vLLM's default executor takes device 0 on every rank; each rank instead joins as ``external_launcher`` and names
    its own device in LOCAL_RANK (the trainer's, even where devices are not numbered by rank)."""
    for rank in range(8):
        placement = Placement(rank=rank, world_size=8, device_index=rank, compute_dtype="bfloat16")
        args = arguments(student, placement, student=EngineMemory(gpu_memory_utilization=0.4), sleep=True)
        assert args["distributed_executor_backend"] == "external_launcher"
        assert args["seed"] == rank
        assert args["dtype"] == "bfloat16"  # the trainer's compute dtype, not the fp32 master weights'
        assert args["gpu_memory_utilization"] == 0.4 and args["enable_sleep_mode"] is True
        assert launcher_environment(placement) == {"RANK": str(rank), "WORLD_SIZE": "8", "LOCAL_RANK": str(rank)}
    shifted = Placement(rank=0, world_size=2, device_index=6)  # e.g. trainer.devices: [6, 7]
    assert launcher_environment(shifted)["LOCAL_RANK"] == "6"


def test_two_gloo_processes_on_cpu_and_one_process_keep_their_own_settings(student):
    two = [arguments(student, Placement(rank=r, world_size=2)) for r in range(2)]
    assert [a["distributed_executor_backend"] for a in two] == ["external_launcher"] * 2
    assert [a["seed"] for a in two] == [0, 1]
    assert all("gpu_memory_utilization" not in a and "enable_sleep_mode" not in a for a in two)  # CPU: neither applies
    assert all(a["max_num_batched_tokens"] == 131072 for a in two)
    one = arguments(student, Placement(), sleep=True)
    assert "distributed_executor_backend" not in one and one["dtype"] == "float32"
    assert one["enforce_eager"] is True  # auto: eager on a CPU
    assert arguments(student, Placement(), dtype="bfloat16")["dtype"] == "bfloat16"


def test_each_role_has_its_own_memory_and_longest_sequence_and_gpus_compile_by_default(student):
    engine = dict(student=EngineMemory(kv_cache_memory_bytes=10 * 2**30, max_model_len=18432),
                  teacher=EngineMemory(kv_cache_memory_bytes=20 * 2**30, max_model_len=36864))
    gpu = Placement(device_index=0, compute_dtype="bfloat16")
    own, teachers = arguments(student, gpu, "student", **engine), arguments(student, gpu, "teacher", **engine)
    assert (own["kv_cache_memory_bytes"], own["max_model_len"]) == (10 * 2**30, 18432)
    assert (teachers["kv_cache_memory_bytes"], teachers["max_model_len"]) == (20 * 2**30, 36864)
    assert "gpu_memory_utilization" not in own  # an explicit cache size replaces the share
    assert own["enforce_eager"] is False  # auto: torch.compile and CUDA graphs on a GPU
    assert arguments(student, gpu, enforce_eager=True)["enforce_eager"] is True
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        EngineMemory(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="enforce_eager must be true, false or auto"):
        VLLMEngine(enforce_eager="sometimes")


def test_ranks_draw_different_request_seeds_and_a_resumed_rank_draws_the_uninterrupted_ones():
    def rank_stream(rank: int) -> RolloutRandomness:
        torch.manual_seed(42)  # seed_everything: every rank alike
        randomness = RolloutRandomness()
        randomness.before_rollout(rank)
        return randomness

    rank_stream(0)
    rank0 = request_seeds(16)
    torch.manual_seed(42)
    assert request_seeds(16) == rank0  # rank 0 keeps the run's stream: one process samples as before

    randomness = rank_stream(1)
    rank1 = request_seeds(16)
    assert len(set(rank0) & set(rank1)) == 0
    randomness.before_rollout(1)  # the fork happens once, not at every rollout
    state = randomness.state_dict()  # a checkpoint after rank 1's first step (one process here: its own state)
    uninterrupted = [request_seeds(16) for _ in range(2)]

    torch.manual_seed(42)  # a new process resumes: seed_everything again, then the checkpoint
    resumed = RolloutRandomness()
    resumed.load_state_dict(state)
    torch.rand(5)  # anything run between the restore and the first rollout
    resumed.before_rollout(1)
    assert [request_seeds(16) for _ in range(2)] == uninterrupted


def test_an_explicit_sleep_level_2_is_refused_at_setup_for_trd_with_its_own_teacher_engine():
    spec = ModelSpec(path="demo:student")
    module = DistillationModule(student=spec, teacher=SeparateTeacher(ModelSpec(path="demo:teacher")),
                                engine=VLLMEngine(sleep=True, sleep_level=2))
    with pytest.raises(SleepSettingsError, match="never reloaded"):
        module.configure_model()
    live = DistillationModule(student=spec, teacher=SelfTeacher(frozen=False), engine=VLLMEngine(sleep=True, sleep_level=2))
    live.configure_model()  # a live self-teacher generates through the student's engine: one engine
    assert live.engine_roles() == {"student"}
