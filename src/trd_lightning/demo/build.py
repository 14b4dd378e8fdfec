"""Rebuild the demo assets, bit for bit: ``python -m trd_lightning.demo.build [tokenizer] [data] [models]``.

- ``tokenizer``: a byte-level tokenizer (256 byte tokens + 3 specials) with a ChatML template;
- ``data``: ``data/{train,val,test}.jsonl`` of chain problems (held-out splits disjoint from train);
- ``models``: the teacher and the student, trained by ``trd fit`` with ``configs/demo/sft_*.yaml``
  (run from the repository root); each config's ``export_dir`` writes into ``assets/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trd_lightning.data.chain import sample_problems
from trd_lightning.models import CHATML_TEMPLATE

ASSETS = Path(__file__).parent / "assets"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPLITS = {"train": 2000, "val": 100, "test": 200}
STEPS = 5


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in sorted(bytes_to_unicode().items())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # one token per byte, no merges
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.save_pretrained(out)


def build_data(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for seed, (split, count) in enumerate(SPLITS.items()):
        problems = sample_problems(count, STEPS, seed=1000 + seed, exclude=taken)
        taken |= {p.text for p in problems}
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for p in problems:
                handle.write(json.dumps({"problem": p.text, "answer": p.answer, "solution": p.solution}) + "\n")


def build_models() -> None:
    from trd_lightning.cli import main

    for config in ("configs/demo/sft_teacher.yaml", "configs/demo/sft_student.yaml"):
        if not Path(config).exists():
            raise SystemExit(f"{config} not found: run `python -m trd_lightning.demo.build models` from the repository root")
        main(["fit", "--config", config])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", help="any of: tokenizer data models (default: all three)")
    args = parser.parse_args()
    args.parts = args.parts or ["tokenizer", "data", "models"]
    unknown = set(args.parts) - {"tokenizer", "data", "models"}
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from tokenizer, data, models")
    if "tokenizer" in args.parts:
        build_tokenizer(ASSETS / "tokenizer")
    if "data" in args.parts:
        build_data(ASSETS / "data")
    if "models" in args.parts:
        build_models()


if __name__ == "__main__":
    main()
