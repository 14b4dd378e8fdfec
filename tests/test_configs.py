"""Every YAML in configs/ parses and instantiates, so a broken config fails here in seconds rather than at the start of a run.

How each file is checked (``test_config``):
- A base, a file that another config ``extends``, is parsed alone (keys, types, class paths). It names no teacher, so
  it is not run alone; its settings are instantiated through every file that extends it.
- Every other file is checked as the ``trd fit`` command its own header shows (``#   trd fit --config ...``), so an
  overlay (a baseline, a refiner, a strategy) is composed with what it says it stacks on, and the documented command
  is the one that is checked. A file whose header shows no such command fails, saying what to add.
- Instantiated means what ``trd fit`` builds before training starts: the model, the data module, and the Trainer with
  its logger, callbacks and strategy (``TRDCLI(run=False)``). No weights load: that happens in ``configure_model``,
  which is not called, and no data file is read (that happens in ``setup``). Tokenizers and model configs named
  ``demo:...`` are the real ones; any other path (the reference configs' Qwen3 directories, SmolLM2's package) is
  stood in for by the demo student's tokenizer and config, since nothing may download here.
- A Trainer that asks for an accelerator other than the CPU (the reference configs' 8 GPUs, or 2 nodes) is built with
  accelerator cpu, 1 device and 1 node; everything else in it (strategy, precision, logger, callbacks, loop settings)
  is as the config says.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from trd_lightning.cli import TRDCLI, expand_extends

CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))
COMMAND = re.compile(r"\btrd fit (?P<args>[^`\n]+)")


def header(path: Path) -> str:
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines[: next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))])


def extended() -> set[Path]:
    """Every file some config names in ``extends``."""
    named = set()
    for path in CONFIGS:
        base = (yaml.safe_load((ROOT / path).read_text(encoding="utf-8")) or {}).get("extends")
        if base:
            named.add((ROOT / path).parent.joinpath(base).resolve().relative_to(ROOT))
    return named


BASES = extended()


def command(path: Path) -> list[str]:
    """The arguments of the first ``trd fit`` command in the file's header that names the file."""
    for match in COMMAND.finditer(header(path)):
        args = shlex.split(match["args"])
        if any(arg == str(path) or arg.endswith(f"={path}") for arg in args):
            return args
    pytest.fail(f"{path}: its header shows no `trd fit` command that uses it, so this test cannot tell what it stacks on. "
                f"Add a comment line to its header such as\n#   trd fit --config configs/demo/opd.yaml --config {path}\n"
                "(the config it is laid over first; a trainer file with --trainer), or `extends: <base>` if it is a method config.")


class Built(TRDCLI):
    """``trd fit`` up to the start of training, on this machine's CPU (see the module docstring)."""

    def instantiate_trainer(self, **kwargs):
        trainer = self.config_init.trainer
        if trainer.accelerator != "cpu":
            trainer.accelerator, trainer.devices, trainer.num_nodes = "cpu", 1, 1
        return super().instantiate_trainer(**kwargs)


@pytest.fixture
def stood_in(monkeypatch) -> list[str]:
    """Paths outside the demo assets load the demo student's tokenizer and config instead; the list says which did."""
    import transformers

    from trd_lightning import models

    resolve, tokenizer = models.resolve_path, transformers.AutoTokenizer.from_pretrained
    paths: list[str] = []

    def demo_or_stand_in(path: str, what: str = "model") -> Path:
        if path.startswith(models.DEMO_PREFIX):
            return resolve(path, what)
        paths.append(path)
        return resolve("demo:student", what)

    monkeypatch.setattr(models, "resolve_path", demo_or_stand_in)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path, **kwargs: tokenizer(path, **{k: v for k, v in kwargs.items() if k != "gguf_file"}))
    monkeypatch.chdir(ROOT)
    return paths


def build(args: list[str]) -> Built:
    try:
        return Built(args=[*args, "--trainer.enable_progress_bar=false"], run=False)
    except SystemExit as error:  # TRDCLI reports a bad config as `trd: error: ...`
        pytest.fail(f"{shlex.join(args)}\n{error}")


def print_config(args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        TRDCLI(args=["fit", *args, "--print_config"])
    assert exit.value.code in (None, 0), exit.value.code
    return capsys.readouterr().out


@pytest.mark.parametrize("path", CONFIGS, ids=str)
@pytest.mark.filterwarnings("ignore:pivot words with no single-token spelling")  # the demo tokenizer standing in for Qwen3's
def test_config(path, stood_in, capsys):
    if path in BASES:
        assert yaml.safe_load(print_config(["--config", str(path)], capsys))["model"]["class_path"]
        return
    cli = build(command(path))
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    assert cli.datamodule.tokenizer is cli.model.tokenizer  # linked on instantiation
    if path.parts[1] == "demo":
        assert not stood_in, f"a demo config loads only the demo's own assets, not {stood_in}"


@pytest.mark.parametrize("broken, problem", [
    ("model: {init_args: {max_context_tokns: 256}}", "max_context_tokns"),
    ("model: {init_args: {teacher: {class_path: trd_lightning.teachers.SeperateTeacher}}}", "SeperateTeacher"),
    ("model: {init_args: {packing: sometimes}}", "packing"),
    ("model: {init_args: {pass_k: [1, 8]}}", r"pass@k needs 1 <= k <= n"),  # refused by the module: eval_sampling draws 1
], ids=["misspelled key", "unknown class_path", "bad value", "refused on instantiation"])
def test_a_broken_config_fails(broken, problem, stood_in, tmp_path):
    """The check above can fail: one wrong line laid over a shipped config is caught, naming what is wrong."""
    overlay = tmp_path / "broken.yaml"
    overlay.write_text(f"extends: {ROOT / 'configs/demo/opd.yaml'}\n{broken}\n")
    with pytest.raises(pytest.fail.Exception, match=problem):
        build(["--config", str(overlay)])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_file_without_a_command_fails_saying_what_to_add(tmp_path):
    overlay = write(tmp_path / "new_overlay.yaml", "# A new baseline; its header shows no command.\nmodel: {init_args: {pass_k: [1]}}\n")
    with pytest.raises(pytest.fail.Exception, match=r"shows no `trd fit` command(.|\n)*#   trd fit --config configs/demo/opd.yaml --config "):
        command(overlay)


def test_extends_chains_each_file_over_its_base(tmp_path, capsys):
    """c extends b (in another folder) extends configs/demo/opd.yaml extends configs/demo/base.yaml: each laid over
    the one before, exactly as the files given in that order; relative names are relative to the file naming them."""
    b = write(tmp_path / "methods" / "b.yaml", f"extends: {ROOT / 'configs/demo/opd.yaml'}\nseed_everything: 7\ntrainer: {{max_steps: 5}}\n")
    c = write(tmp_path / "c.yaml", "extends: methods/b.yaml\nseed_everything: 8\n")
    assert expand_extends(["fit", "--config", str(c), "--trainer.max_steps=6"]) == [
        "fit", "--config", str(ROOT / "configs/demo/base.yaml"), "--config", str(ROOT / "configs/demo/opd.yaml"),
        "--config", str(b), "--config", str(c), "--extends=null", "--trainer.max_steps=6"]
    assert expand_extends([f"--config={c}"]) == expand_extends(["-c", str(c)]) == expand_extends(["--config", str(c)])
    merged = yaml.safe_load(print_config(["--config", str(c)], capsys))
    assert (merged["seed_everything"], merged["trainer"]["max_steps"], merged["extends"]) == (8, 5, None)
    assert merged["trainer"]["logger"]["init_args"]["name"] == "demo_opd"  # from opd.yaml
    assert merged["data"]["init_args"]["batch_size"] == 32  # from base.yaml
    flat = ["--config", "configs/demo/base.yaml", "--config", "configs/demo/opd.yaml", "--config", str(b), "--config", str(c)]
    assert print_config(flat, capsys) == print_config(["--config", str(c)], capsys)


@pytest.mark.parametrize("files, problem", [
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, r"extends loops: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"),
    ({"a.yaml": "extends: a.yaml\n"}, r"extends loops: .*a\.yaml -> .*a\.yaml"),
    ({"a.yaml": "extends: missing/base.yaml\n"}, r"a\.yaml: extends 'missing/base\.yaml', but .*missing/base\.yaml is not a file"),
    ({"a.yaml": "extends: [b.yaml]\n"}, r"extends must be one path"),
], ids=["a loop", "itself", "a missing base", "not a path"])
def test_extends_refuses_a_loop_or_a_missing_base(files, problem, tmp_path):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(SystemExit, match=problem):
        TRDCLI(args=["fit", "--config", str(tmp_path / "a.yaml"), "--print_config"])


def test_extends_is_read_only_from_a_config_file():
    with pytest.raises(SystemExit, match="here it would do nothing"):
        TRDCLI(args=["--config", str(ROOT / "configs/demo/opd.yaml"), "--extends", "base.yaml"], run=False)


def test_a_printed_config_stands_alone(tmp_path, capsys):
    """The printed config of an overlay, saved elsewhere, parses to the same printed config: its `extends` is null."""
    first = print_config(["--config", str(ROOT / "configs/code/trd.yaml")], capsys)  # code/trd -> code/base -> base
    saved = write(tmp_path / "elsewhere" / "printed.yaml", first)
    assert print_config(["--config", str(saved)], capsys) == first
    assert yaml.safe_load(first)["extends"] is None
