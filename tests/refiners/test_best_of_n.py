"""BestOfNRewrite, the plug-in that changes two steps of a rewrite (propose -> accept -> select): N rewrites per rollout,
the accepted one the teacher scores highest kept."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.conftest import DEMO, scalars
from trd_lightning.cli import main
from trd_lightning.data import PromptDataModule
from trd_lightning.models import ModelSpec
from trd_lightning.module import DistillationModule
from trd_lightning.refiners.best_of_n import BestOfNRewrite
from trd_lightning.rollout import Sampling
from trd_lightning.rollout.base import STUDENT
from trd_lightning.teachers import SeparateTeacher
from trd_lightning.verifiers import ChainVerifier


def mean_logprob(model, context: list[int], target: list[int]) -> float:
    """Independently of the trainer: one plain forward of context + target, the target tokens' mean log-probability."""
    with torch.no_grad():
        logits = model(torch.tensor([context + target])).logits[0, len(context) - 1 : -1].double()
    return float(logits.log_softmax(-1).gather(-1, torch.tensor(target)[:, None]).mean())


def test_best_of_n_trains_on_the_accepted_rewrite_the_teacher_scores_highest():
    refiner = BestOfNRewrite("demo_refine", sampling=Sampling(temperature=1.0, max_new_tokens=48), n=4)
    module = DistillationModule(student=ModelSpec(path="demo:student"), teacher=SeparateTeacher(ModelSpec(path="demo:teacher")),
                                refiner=refiner, verifier=ChainVerifier(), max_context_tokens=256)
    module.configure_model()
    data = PromptDataModule(train_path="demo:data/train.jsonl", test_path="demo:data/test.jsonl", prompt_template="demo_student",
                            eval_batch_size=6, tokenizer=module.tokenizer)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    torch.manual_seed(0)
    rollouts = module.engine.generate(STUDENT, module.student, batch.prompt_ids, Sampling(temperature=1.0, max_new_tokens=48))
    proposed = []

    def generate(prompts, sampling):  # the real teacher's generation, recorded
        out = module.teacher_access.generate(prompts, sampling)
        proposed.append((prompts, out))
        return out

    targets = refiner.refine(batch, rollouts, replace(module.teacher_access, generate=generate))
    (prompts, candidates), = proposed
    assert candidates.prompt_index == [k for k in range(len(rollouts)) for _ in range(4)]
    differs = 0
    for k in range(len(rollouts)):
        mine = [c for c, owner in enumerate(candidates.prompt_index) if owner == k]
        kept = [c for c in mine if not candidates.truncated[c] and ChainVerifier().extract(candidates.texts[c]) is not None]
        if not kept:
            assert targets.fallback[k] and targets.token_ids[k] == rollouts.token_ids[k]
            continue
        scores = {c: mean_logprob(module.teacher_model, prompts[k], candidates.token_ids[c]) for c in kept}
        best = max(kept, key=scores.get)
        assert targets.refined[k] and targets.token_ids[k] == candidates.token_ids[best], k
        assert targets.teacher_contexts[k] == prompts[k]  # scored under the refine prompt it was written in
        differs += best != kept[0]
    assert sum(targets.metrics["best_of_n_not_first"]) == differs
    assert len(targets.metrics["best_of_n_accepted"]) == len(rollouts)


@pytest.mark.slow
def test_best_of_n_trains_on_the_demo_from_its_overlay(tmp_path):
    main(["fit", "--config", str(DEMO / "trd.yaml"), "--config", str(DEMO / "refiners" / "best_of_n.yaml"), "--trainer.max_steps=2",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.name=best", "--trainer.enable_progress_bar=false",
          "--trainer.log_every_n_steps=1", "--validate_before_fit=false", "--data.init_args.batch_size=4",
          "--trainer.callbacks.init_args.every_n_train_steps=100", "--model.init_args.export_student=false"])
    logged = scalars(tmp_path / "best" / "version_0")
    for tag in ("refine/best_of_n_accepted", "refine/best_of_n_not_first", "train/loss"):
        assert [step for step, _ in logged[tag]] == [0, 1], tag
    assert all(0.0 <= value <= 1.0 for _, value in logged["refine/best_of_n_accepted"])


def test_best_of_n_refuses_no_candidates():
    with pytest.raises(ValueError, match="n >= 1"):
        BestOfNRewrite("demo_refine", n=0)
