"""Models: a packed row's sequences never see each other (the demo's Qwen3, SmolLM2's Llama), LoRA merged into the
weights an engine receives, remote code off unless asked, and the ChatML fallback for a tokenizer without a template."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.conftest import SMOLLM2, TINY, fit_args, lora_model, scalars
from trd_lightning.cli import main
from trd_lightning.models import ModelSpec, hf_state_dict, last_hidden_at, load_model, output_head, packs_correctly, packs_sequences
from trd_lightning.views import pack


def packed_and_alone(model, sequences, split):
    contexts, targets = [s[:split] for s in sequences], [s[split:] for s in sequences]
    weight, _ = output_head(model)
    packed = last_hidden_at(model, pack(contexts, targets, 0, packed=True)) @ weight.T
    alone = torch.cat([last_hidden_at(model, pack([c], [t], 0)) @ weight.T for c, t in zip(contexts, targets)])
    return packed, alone


def check_packing(model, vocab, logit_atol=1e-5):
    torch.manual_seed(0)
    sequences = [torch.randint(0, vocab, (n,)).tolist() for n in (13, 9, 21)]
    with torch.no_grad():
        packed, alone = packed_and_alone(model.eval(), sequences, split=4)
        torch.testing.assert_close(packed, alone, atol=logit_atol, rtol=1e-5)
        torch.testing.assert_close(packed.softmax(-1), alone.softmax(-1), atol=1e-5, rtol=0)
        # No target token sees another sequence: rewrite the first sequence entirely, the others' logits stay put.
        changed = [[(t + 1) % vocab for t in sequences[0]], *sequences[1:]]
        moved, _ = packed_and_alone(model, changed, split=4)
    others = slice(len(sequences[0]) - 4, None)
    torch.testing.assert_close(moved[others], packed[others], atol=1e-6, rtol=0)
    assert not torch.allclose(moved[: len(sequences[0]) - 4], packed[: len(sequences[0]) - 4])
    assert packs_correctly(model, "cpu", vocab)


def test_last_hidden_at_keeps_its_own_forward_while_another_thread_runs_the_model():
    model = load_model(ModelSpec(path="demo:student")).eval()
    inputs, other = pack([[5, 6, 7]], [[8, 9]], 0), pack([[1, 2]], [[3]], 0)

    def another_thread_runs_the_model(*_):  # between this thread's decoder and its head (a teacher generating on a request thread)
        if threading.current_thread() is threading.main_thread():
            worker = threading.Thread(target=model, kwargs={"input_ids": other.input_ids})
            worker.start()
            worker.join()

    with torch.no_grad():
        alone = last_hidden_at(model, inputs)
        hook = model.lm_head.register_forward_hook(another_thread_runs_the_model)
        try:
            during = last_hidden_at(model, inputs)
        finally:
            hook.remove()
    torch.testing.assert_close(during, alone, atol=0, rtol=0)


def test_packed_forward_equals_each_sequence_alone_demo_qwen3():
    check_packing(load_model(ModelSpec(path="demo:student")), TINY["vocab_size"])


@pytest.mark.slow
def test_packed_forward_equals_each_sequence_alone_smollm2_llama():
    model = load_model(SMOLLM2)
    # 30 layers of fp32 rounding on logits up to ~36: 8.5e-5 to 1.05e-4 apart at most (under 3e-6 of their range;
    # seen to vary between runs of the same machine), probabilities 3e-6. A leak across sequences is off by O(1).
    check_packing(model, model.config.vocab_size, logit_atol=2e-4)


def test_a_model_that_mixes_packed_sequences_is_caught(student_dir):
    """A model whose forward drops the position ids runs the packed row as one sequence: the check must see it."""
    model = load_model(ModelSpec(path=student_dir))
    forward = model.forward
    model.forward = lambda *args, position_ids=None, **kwargs: forward(*args, **kwargs)
    assert not packs_correctly(model, "cpu", TINY["vocab_size"])


def test_lora_weights_are_merged_for_the_engine_and_the_model_is_untouched(student_dir):
    model = lora_model(student_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = hf_state_dict(model)
    # Independently: W + (alpha / r) * B @ A, for each adapted linear layer.
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            expected = module.base_layer.weight + 2.0 * module.lora_B["default"].weight @ module.lora_A["default"].weight
            torch.testing.assert_close(state[name.removeprefix("base_model.model.") + ".weight"], expected)
    assert set(state) == set(load_model(ModelSpec(path=student_dir)).state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_remote_code_is_off_unless_asked(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trd_lightning.models import ModelSpec, load_model, load_tokenizer

    seen = []
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: seen.append(k["trust_remote_code"]) or _Stop())
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: seen.append(k["trust_remote_code"]) or _Stop())
    for spec in (ModelSpec(path="demo:student"), ModelSpec(path="demo:student", trust_remote_code=True)):
        for load in (load_tokenizer, load_model):
            with pytest.raises(_StopError):
                load(spec)
    assert seen == [False, False, True, True]


class _StopError(Exception):
    pass


class _Stop:
    def __getattr__(self, name):
        raise _StopError


@pytest.mark.slow
def test_the_chatml_fallback_serves_a_tokenizer_without_a_template(bad_files, tmp_path):
    main(fit_args("opd", tmp_path, "chatml", 1, f"--model.init_args.student.tokenizer={bad_files['bare_tokenizer']}",
                  "--model.init_args.student.chat_template=chatml"))
    assert scalars(tmp_path / "chatml/version_0")["train/loss"]


@pytest.mark.slow
def test_flex_attention_packs_under_auto_and_each_sequence_comes_out_as_alone():
    """torch's flex_attention needs no package beyond torch: ``packing: auto`` packs under it, and the packed logits
    equal each sequence's alone (the first call compiles the kernel: tens of seconds on a CPU)."""
    model = load_model(ModelSpec(path="demo:student", attn_implementation="flex_attention"))
    check_packing(model, TINY["vocab_size"])
    assert packs_sequences(model, "auto", "cpu", "student")
    assert not packs_sequences(load_model(ModelSpec(path="demo:student")), "auto", "cpu", "student")  # sdpa pads


def test_a_flex_attention_student_is_refused_on_a_cpu_naming_the_fix():
    from trd_lightning.module import DistillationModule, SettingsError
    from trd_lightning.teachers import SeparateTeacher

    module = DistillationModule(student=ModelSpec(path="demo:student", attn_implementation="flex_attention"),
                                teacher=SeparateTeacher(ModelSpec(path="demo:teacher", attn_implementation="flex_attention")))
    with pytest.raises(SettingsError, match="no backward pass on CPUs; set student.attn_implementation: sdpa"):
        module.configure_model()
