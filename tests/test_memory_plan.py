"""The memory plan (``memory_plan.py``, ``trd plan``): its terms against figures computed by hand from the real Qwen3
configs (shipped in configs/models/), and a run that cannot fit refused before any weight loads, with the numbers."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT
from trd_lightning.cli import main
from trd_lightning.memory_plan import GIB, PlanError, RunShape, Shape, build_plan, check_fits
from trd_lightning.models import LoRA, ModelSpec
from trd_lightning.rollout import EngineMemory, VLLMEngine

MODELS = ROOT / "configs" / "models"


def config(name: str) -> dict:
    return json.loads((MODELS / f"{name}.json").read_text())


def by_hand(c: dict) -> int:
    """Qwen3's parameters, written out: q/k/v/o, q/k norms, the gated MLP and two norms a layer; the embeddings, the
    final norm, and an LM head of its own unless tied."""
    h, i, n, kv, d, v = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"]
    layer = h * n * d + 2 * h * kv * d + n * d * h + 2 * d + 3 * h * i + 2 * h
    return c["num_hidden_layers"] * layer + v * h + h + (0 if c["tie_word_embeddings"] else v * h)


@pytest.mark.parametrize("name", ["Qwen3-1.7B", "Qwen3-8B", "Qwen3-32B"])
def test_parameters_and_kv_cache_per_token_by_hand(name):
    c, shape = config(name), Shape.of(config(name))
    assert shape.parameters == by_hand(c)
    assert shape.kv_bytes_per_token("bfloat16") == 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2


def test_the_issues_figures_for_qwen3_8b_and_lora_on_qwen3_1_7b():
    eight = Shape.of(config("Qwen3-8B"))
    assert round(eight.parameters / 1e9, 2) == 8.19 and round(eight.parameters * 2 / 1e9, 1) == 16.4  # bf16 weights, GB
    assert eight.kv_bytes_per_token("bfloat16") == 147_456 and round(40_960 * 147_456 / 1e9, 2) == 6.04
    c = config("Qwen3-1.7B")
    h, i, n, kv, d, r = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], 64
    adapters = c["num_hidden_layers"] * r * ((h + n * d) * 2 + (h + kv * d) * 2 + (h + i) * 3)  # q, o; k, v; gate, up, down
    assert Shape.of(c, LoRA(r=64, alpha=128)).trainable == adapters == 69_730_304


def reference_run(**overrides) -> RunShape:
    student = ModelSpec(path="/absent/Qwen3-1.7B", plan_config=str(MODELS / "Qwen3-1.7B.json"), dtype="bfloat16",
                        gradient_checkpointing=True, lora=LoRA(r=64, alpha=128))
    teacher = ModelSpec(path="/absent/Qwen3-8B", plan_config=str(MODELS / "Qwen3-8B.json"), dtype="bfloat16")
    engine = VLLMEngine(student=EngineMemory(kv_cache_memory_bytes=10 * GIB, max_model_len=18432),
                        teacher=EngineMemory(kv_cache_memory_bytes=20 * GIB, max_model_len=36864), sleep=True)
    settings = dict(student=student, teacher=teacher, teacher_engine=True, precision="bf16-mixed", world_size=8,
                    max_tokens_per_micro_batch=34816, engine=engine, device_bytes=int(79.6 * GIB))
    return RunShape(**{**settings, **overrides})


def test_the_reference_trd_plan_adds_up_and_fits_an_80_gb_card():
    plan = build_plan(reference_run())
    terms = {t.name: t for t in plan.terms}
    assert terms["student weights"].bytes == Shape.of(config("Qwen3-1.7B")).parameters * 2
    assert terms["teacher weights"].bytes == 8_190_735_360 * 2
    assert terms["trainable: AdamW state and the float32 adapters"].bytes == 69_730_304 * 12
    assert terms["teacher engine KV cache"].bytes == 20 * GIB and "4.0 sequences of 36,864" in terms["teacher engine KV cache"].note
    activations = terms["student activations or float32 gradients, the larger"]
    assert activations.estimate and not terms["teacher weights"].estimate
    assert activations.bytes > 69_730_304 * 4  # LoRA's gradients are small beside the activations of 34,816 tokens
    asleep = {t.name for t in plan.terms if t.phases == ("generate",)}
    assert {"student engine weights", "teacher engine KV cache"} <= asleep  # sleep: the engines are not there while training
    assert plan.phase("generate") == sum(t.bytes for t in plan.terms if "generate" in t.phases)
    assert plan.fits and plan.peak == max(plan.phase("generate"), plan.phase("train"))


def test_a_run_that_cannot_fit_is_refused_naming_its_largest_term_and_a_budget_that_fits():
    with pytest.raises(PlanError, match=r"more than its 79.6 GiB; the largest term is teacher engine KV cache \(60.0 GiB\)"):
        check_fits(reference_run(engine=VLLMEngine(teacher=EngineMemory(kv_cache_memory_bytes=60 * GIB), sleep=True)))
    with pytest.raises(PlanError, match=r"max_tokens_per_micro_batch: \d+ fits"):
        check_fits(reference_run(max_tokens_per_micro_batch=2_000_000))


def test_fit_refuses_a_run_that_cannot_fit_before_any_weight_loads(tmp_path):
    """``trd fit`` on a GPU plans at start-up (``DistillationModule.configure_callbacks``); here on a simulated 80 GB
    device, with the module as the demo TRD config builds it and a micro-batch budget no device holds."""
    from lightning.pytorch import Trainer

    from trd_lightning.module import DistillationModule
    from trd_lightning.refiners import TeacherRewrite
    from trd_lightning.teachers import SeparateTeacher

    module = DistillationModule(student=ModelSpec(path="demo:student"), teacher=SeparateTeacher(ModelSpec(path="demo:teacher")),
                                refiner=TeacherRewrite(template="demo_refine"), engine=VLLMEngine(sleep=True),
                                max_tokens_per_micro_batch=10**9)
    module.trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    with pytest.raises(PlanError, match="the largest term is student activations or float32 gradients"):
        check_fits(module.run_shape(80 * 10**9))
    assert module.student is None  # nothing loaded


@pytest.mark.slow
def test_trd_plan_prints_the_reference_plan_and_refuses_a_small_card(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(["plan", "--config", "configs/trd.yaml"])
    out = capsys.readouterr().out
    assert "8 processes (DDP), bf16-mixed" in out and "of 79.6 GiB: fits" in out and "teacher engine KV cache" in out
    main(["plan", "--config", "configs/trd.yaml", "--device_memory_gib", "40"])
    assert "DOES NOT FIT" in capsys.readouterr().out
