"""Views and contexts: alignment, masks and truncation, with the real demo tokenizer and its chat template."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trd_lightning.templates import Template
from trd_lightning.views import TRIM_MARK, ChatPrompts, PromptTooLongError, build_views, pack

ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))


def test_views_share_target_ids_and_masks_cover_them_only(tokenizer):
    prompts = ChatPrompts(tokenizer)
    student_ctx = [prompts.chat_ids("1+2"), prompts.chat_ids("3*4-5")]
    teacher_ctx = [prompts.chat_ids("1+2\nreference:1+2=3;a:3"), prompts.chat_ids("x")]
    targets = [tokenizer("1+2=3;a:3")["input_ids"] + [tokenizer.eos_token_id], tokenizer("a:7")["input_ids"]]
    views = build_views(student_ctx, teacher_ctx, targets, tokenizer.pad_token_id)
    for inputs, contexts in ((views.student, student_ctx), (views.teacher, teacher_ctx)):
        for row, (context, target) in enumerate(zip(contexts, targets)):
            expected = torch.zeros(inputs.input_ids.shape[1], dtype=torch.bool)
            expected[len(context): len(context) + len(target)] = True  # the response, not the prompt, not padding
            assert torch.equal(inputs.target_mask[row], expected)
            assert inputs.input_ids[row, inputs.target_mask[row]].tolist() == target
            assert inputs.attention_mask[row].sum() == len(context) + len(target)
        rows, cols = inputs.predicting_positions()
        assert torch.equal(inputs.input_ids[rows, cols + 1], views.target_ids)  # each position predicts the next token
    assert views.target_ids.tolist() == targets[0] + targets[1]
    assert views.target_lengths.tolist() == [len(t) for t in targets]


def test_views_refuse_mismatched_rows(tokenizer):
    with pytest.raises(ValueError, match="one context per target"):
        build_views([[1]], [[1], [2]], [[3]], tokenizer.pad_token_id)


def test_an_empty_context_is_refused():
    with pytest.raises(ValueError, match="empty context"):
        pack([[]], [[5, 6]], pad_id=0)


def test_long_context_trims_attempt_and_reference_never_the_problem(tokenizer):
    prompts = ChatPrompts(tokenizer)
    template = Template("demo_refine_reference")
    problem, reference, attempt = "9*9-1+2*3", "9*9=1;" * 20 + "a:5", "9*9=2;" * 30 + "a:4"
    full = prompts.encode(template, 10_000, problem=problem, solution=reference, attempt=attempt)
    limit = len(full) - 80
    ids = prompts.encode(template, limit, problem=problem, solution=reference, attempt=attempt)
    text = tokenizer.decode(ids)
    assert len(ids) <= limit
    assert f"\n{problem}\n" in text  # the problem statement is whole
    assert text.count(TRIM_MARK) == 2  # the longer attempt went first, then both down to a common length
    assert "reference:9*9=1;9*9=1" in text and "attempt:9*9=2;9*9=2" in text  # both keep their beginnings


def test_problem_alone_over_the_limit_is_a_clear_error(tokenizer):
    with pytest.raises(PromptTooLongError, match="over the limit of 10.*problem never is"):
        ChatPrompts(tokenizer).encode(Template("demo_student", "data prompt_template"), 10, problem="1+2*3-4+5*6")


def test_tokenizer_without_chat_template_is_refused(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*chatml"):
        ChatPrompts(bare)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    problem=st.text(ALPHABET, min_size=1, max_size=40),
    reference=st.text(ALPHABET, max_size=200),
    attempt=st.text(ALPHABET, max_size=200),
    target=st.lists(st.integers(0, 255), min_size=0, max_size=30),
    slack=st.integers(0, 400),
)
def test_property_truncation_and_alignment(tokenizer, problem, reference, attempt, target, slack):
    """For any strings and limits: the problem survives whole, the limit holds, target ids align, masks are exact."""
    prompts = ChatPrompts(tokenizer)
    template = Template("demo_refine_reference")
    floor = len(prompts.encode(template, 10_000, problem=problem, solution="", attempt=""))
    limit = floor + slack
    teacher_ctx = prompts.encode(template, limit, problem=problem, solution=reference, attempt=attempt)
    assert len(teacher_ctx) <= limit
    assert f"<|im_start|>user\n{problem}\nattempt:" in tokenizer.decode(teacher_ctx)
    student_ctx = prompts.encode(Template("demo_student"), limit, problem=problem)
    views = build_views([student_ctx], [teacher_ctx], [target], tokenizer.pad_token_id)
    for inputs, context in ((views.student, student_ctx), (views.teacher, teacher_ctx)):
        assert inputs.input_ids[0, inputs.target_mask[0]].tolist() == target
        assert inputs.target_mask[0].nonzero().flatten().tolist() == list(range(len(context), len(context) + len(target)))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_inputs_give_back_each_sequence_as_packed(packed):
    """A teacher scored elsewhere gets each (context, target) back from a micro-batch's inputs, padded or packed."""
    contexts, targets = [[5, 6, 7], [8], [9, 10]], [[1, 2], [3, 4, 5], []]
    inputs = pack(contexts, targets, pad_id=0, packed=packed)
    assert inputs.sequences() == list(zip(contexts, targets))


def test_views_hold_the_same_target_ids_packed_or_padded(tokenizer):
    student, teacher, targets = [[1, 2], [3, 4, 5]], [[6], [7, 8, 9, 10]], [[11, 12, 13], [14]]
    for packed in ((True, True), (False, False), (True, False)):
        views = build_views(student, teacher, targets, 0, packed)
        for inputs in (views.student, views.teacher):
            assert inputs.input_ids[inputs.target_mask].tolist() == [11, 12, 13, 14]
            assert int(inputs.target_mask.sum()) == 4  # the mask covers the targets and nothing else
    packed = build_views(student, teacher, targets, 0, (True, True)).student
    assert packed.input_ids.tolist() == [[1, 2, 11, 12, 13, 3, 4, 5, 14]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]] and packed.attention_mask is None
