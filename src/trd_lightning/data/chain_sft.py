"""SFT examples for the demo models, generated from the chain task.

Four kinds, mixed by weight, each written with the same templates the demo configs use:
- ``plain``: the problem -> its worked solution (the student's and the teacher's own task);
- ``privileged``: the problem and its reference solution -> the solution (the OPSD self-teacher);
- ``refine``: the problem and an attempt -> the corrected solution (the TRD teacher);
- ``refine_reference``: as ``refine``, with the reference too (the TRD-on-OPSD self-teacher).

Attempts are flawed with probability ``flawed`` (by the ``corruptions`` of ``chain.flawed_attempt``),
else correct, so a refiner also learns to keep a solution that is already right.
"""

from __future__ import annotations

import random

from trd_lightning.data.chain import CORRUPTIONS, flawed_attempt, sample_problem
from trd_lightning.data.sft import SFTDataModule
from trd_lightning.data.sources import read_rows
from trd_lightning.templates import Template

KINDS = ("plain", "privileged", "refine", "refine_reference")


class ChainSFTData(SFTDataModule):
    """SFT on generated chain problems, of the kinds this module's docstring lists.

    Every response is the problem's worked solution. Validation and test read problem files, as ``PromptDataModule`` does.

    Args:
        mixture: the relative weight of each kind of example (``plain``, ``privileged``, ``refine``,
            ``refine_reference``), drawn per example; null: ``plain`` only.
        num_examples: how many training examples to generate.
        steps: operations per generated problem.
        flawed: the probability that an example's attempt is flawed rather than the correct solution, in [0, 1]
            (seen only by kinds whose template shows the attempt: ``refine``, ``refine_reference``).
        corruptions: the kinds of mistake a flawed attempt is drawn from (``slip``, ``copy``, ``noise``,
            ``truncate``; see ``chain.flawed_attempt``); null: ``slip`` only.
        seed: seeds the draw of problems, kinds and attempts: the same seed gives the same examples.
        exclude_paths: data files whose rows' ``problem`` is never generated, to keep validation and test
            problems out of training; null: none.
        templates: the user-message template of a kind, as ``{kind: template}``, over the defaults
            ``demo_student``, ``demo_privileged``, ``demo_refine`` and ``demo_refine_reference``.
        val_path: the validation problems, as in ``PromptDataModule``; null: no validation.
        test_path: the test problems, as in ``PromptDataModule``.
        prompt_template: the student's user message for validation and test problems (training uses ``templates``).
        batch_size: training examples per process per batch.
        eval_batch_size: prompts per process per evaluation batch (default: ``batch_size``).
        max_tokens: the longest training example (prompt + response, in tokens); a longer one is an error at setup.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        tokenizer: the student's tokenizer; the CLI passes the model's own.
    """

    def __init__(
        self,
        mixture: dict[str, float] | None = None,
        num_examples: int = 20000,
        steps: int = 5,
        flawed: float = 0.8,
        corruptions: list[str] | None = None,
        seed: int = 0,
        exclude_paths: list[str] | None = None,
        templates: dict[str, str] | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        prompt_template: str = "demo_student",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        max_tokens: int = 512,
        num_workers: int = 0,
        tokenizer=None,
    ):
        super().__init__(
            val_path=val_path, test_path=test_path, prompt_template=prompt_template, batch_size=batch_size,
            eval_batch_size=eval_batch_size, max_tokens=max_tokens, num_workers=num_workers, tokenizer=tokenizer,
        )
        self.mixture = mixture or {"plain": 1.0}
        unknown = set(self.mixture) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown SFT example kinds {sorted(unknown)}; choose from {list(KINDS)}")
        self.num_examples, self.steps, self.flawed, self.seed = num_examples, steps, flawed, seed
        self.corruptions = tuple(corruptions or ["slip"])
        unknown = set(self.corruptions) - set(CORRUPTIONS)
        if unknown:
            raise ValueError(f"unknown corruptions {sorted(unknown)}; choose from {list(CORRUPTIONS)}")
        self.exclude_paths = exclude_paths or []
        names = {"plain": "demo_student", "privileged": "demo_privileged", "refine": "demo_refine", "refine_reference": "demo_refine_reference"}
        names.update(templates or {})
        self.templates = {kind: Template(spec, f"{kind} template") for kind, spec in names.items()}

    def train_examples(self) -> list[tuple[str, str]]:
        held_out = {str(r["problem"]) for path in self.exclude_paths for r in read_rows(path)}
        rng = random.Random(self.seed)
        kinds, weights = list(self.mixture), list(self.mixture.values())
        examples = []
        while len(examples) < self.num_examples:
            problem = sample_problem(rng, self.steps)
            if problem.text in held_out:
                continue
            kind = rng.choices(kinds, weights)[0]
            attempt = flawed_attempt(problem, rng, self.corruptions)[0] if rng.random() < self.flawed else problem.solution
            message = self.templates[kind].render(problem=problem.text, solution=problem.solution, attempt=attempt)
            examples.append((message, problem.solution))
        return examples
