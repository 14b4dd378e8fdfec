"""Every fenced block of README.md and docs/*.md is run, checked, or marked with why not (docs/testing.md has the table).

The convention: a block's language says what it is (``bash``, ``yaml``, ``python``; ``text`` for output and diagrams,
not checked), and an HTML comment on the line right before its opening fence says how it is checked when it is not
simply run:

- no comment: a ``bash`` block runs (``test_the_page_runs``: slow), each command made short, in a scratch copy of the
  repository root, the page's blocks in order; only ``trd`` commands can run this way. A ``python`` block is executed.
- ``<!-- covered: PATH what -->``: PATH runs it (a test file, which must name the page, or ``.ci/run``).
- ``<!-- config only: why -->``: each ``trd`` command is parsed with ``--print_config``; nothing runs.
- ``<!-- not run here: why -->``: nothing runs; the reason says what the block needs.
- ``<!-- excerpt of: CONFIG -->`` (yaml): the block is part of CONFIG's printed config (``...`` matches anything).
- ``<!-- overlay on: CONFIG -->`` (yaml): laid over CONFIG with a second ``--config``, it parses and lands as written.
- ``<!-- output of: COMMAND -->`` (text): the block is what the ``trd`` COMMAND prints.

Fast tests check the markers, the links, ``--print_config`` of every ``trd`` command that is run or config-checked,
the YAML and Python blocks, and that the command-line switch in docs/methods.md is exactly ``configs/demo/trd.yaml``;
the runs and the ``output of:`` commands are slow.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from trd_lightning.cli import TRDCLI, PlanCLI, main

PAGES = [Path("README.md"), *sorted(p.relative_to(ROOT) for p in (ROOT / "docs").glob("*.md"))]
LANGUAGES = {"bash", "yaml", "python", "text"}
KINDS = ("not run here", "config only", "covered", "excerpt of", "overlay on", "output of")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\S*)\s*$")
COMMENT = re.compile(r"^\s*<!--(?P<text>.*)-->\s*$")
MARKER = re.compile(rf"^\s*(?P<kind>{'|'.join(KINDS)}):\s*(?P<what>.*?)\s*$")
SUBCOMMANDS = ("fit", "validate", "test", "plan")
SHELL = {"&&", "||", "|", ";", "&", ">", ">>", "<"}
# What a documented `trd` command gets to run in seconds on a CPU: one step, one evaluation batch of 4.
SHORT = {
    "fit": ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--data.init_args.batch_size=4",
            "--data.init_args.eval_batch_size=4", "--trainer.enable_progress_bar=false"],
    "validate": ["--trainer.limit_val_batches=1", "--data.init_args.eval_batch_size=4", "--trainer.enable_progress_bar=false"],
    "test": ["--trainer.limit_test_batches=1", "--data.init_args.eval_batch_size=4", "--trainer.enable_progress_bar=false"],
    "plan": [],
}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    comment: str | None  # the HTML comment on the line before the fence, if any
    kind: str | None  # the marker's kind, if the comment is a marker
    what: str  # the rest of the marker

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"

    def commands(self) -> list[list[str]]:
        """Each command line, its continuation lines joined and its comments dropped."""
        return [words for line in self.body.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]

    def trd_commands(self) -> list[list[str]]:
        return [c for c in self.commands() if c[0] == "trd"]


def blocks(page: Path) -> list[Block]:
    found, lines, i = [], (ROOT / page).read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, start = len(fence["indent"]), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page}:{i + 1}: a fence that is never closed"
        body = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[start + 1:end]) + "\n"
        comment = COMMENT.match(lines[start - 1]) if start else None
        marker = MARKER.match(comment["text"]) if comment else None
        found.append(Block(page, start + 1, fence["lang"], body, comment["text"].strip() if comment else None,
                           marker["kind"] if marker else None, marker["what"] if marker else ""))
        i = end + 1
    return found


BLOCKS = [b for page in PAGES for b in blocks(page)]
RUN = [b for b in BLOCKS if b.lang == "bash" and b.kind is None]
PARSED = [(b, k, c) for b in BLOCKS if b.lang == "bash" and b.kind in (None, "config only") for k, c in enumerate(b.trd_commands())]
YAML = [b for b in BLOCKS if b.lang == "yaml" and b.kind in ("excerpt of", "overlay on")]
OUTPUT = [b for b in BLOCKS if b.kind == "output of"]


def problems(block: Block) -> list[str]:
    """What is wrong with how the block is marked: nothing, for a block the tests below can run or check."""
    if block.lang not in LANGUAGES:
        return [f"fence language {block.lang!r}: use one of {sorted(LANGUAGES)} (text for output and diagrams)"]
    if block.comment is not None and block.kind is None and block.lang != "text":
        return [f"the comment before it, {block.comment!r}, is no marker: start it with one of {KINDS} and a colon"]
    if block.kind and not block.what:
        return [f"its marker {block.kind!r} says nothing after the colon: say why, or what"]
    if block.kind in ("excerpt of", "overlay on") and (block.lang != "yaml" or not (ROOT / block.what).is_file()):
        return [f"{block.kind!r} marks a yaml block and names a config file (got a {block.lang} block, {block.what!r})"]
    if block.kind == "output of" and (block.lang != "text" or not block.what.startswith("trd ")):
        return ["'output of' marks a text block and names a trd command"]
    if block.lang == "yaml" and block.kind in (None, "config only"):
        return ["a yaml block needs `<!-- excerpt of: CONFIG -->` or `<!-- overlay on: CONFIG -->` (or a reason it is not checked)"]
    if block.kind == "covered":
        path = block.what.split()[0]
        if not (ROOT / path).is_file():
            return [f"covered by {path!r}, which is not a file of the repository"]
        if path.startswith("tests/") and str(block.page) not in (ROOT / path).read_text(encoding="utf-8"):
            return [f"covered by {path}, which does not name {block.page}"]
    if block.kind == "config only" and not block.trd_commands():
        return ["'config only' checks trd commands, and this block has none: mark it `not run here`"]
    if block.lang == "bash" and block.kind is None:
        wrong = [shlex.join(c) for c in block.commands() if c[0] != "trd" or c[1:2] == [] or c[1] not in SUBCOMMANDS or SHELL & set(c)]
        if wrong:
            return [f"only plain `trd {'|'.join(SUBCOMMANDS)}` commands run here, not {wrong}: mark the block "
                    "`<!-- not run here: why -->`, `<!-- covered: PATH -->` or `<!-- config only: why -->`"]
    return []


def test_every_block_is_run_checked_or_marked():
    assert len(PAGES) > 10 and len(BLOCKS) > 30
    found = [f"{b}: {p}" for b in BLOCKS for p in problems(b)]
    assert not found, "\n".join(found)


def test_the_check_of_the_marks_can_fail():
    """Each kind of mistake is caught, naming what to do."""
    page = Path("docs/some.md")
    cases = {
        "``` with no language": Block(page, 1, "", "ls\n", None, None, ""),
        "pip, unmarked": Block(page, 1, "bash", "pip install -e .\n", None, None, ""),
        "a shell pipe": Block(page, 1, "bash", "trd fit --config x.yaml | tee log\n", None, None, ""),
        "unmarked yaml": Block(page, 1, "yaml", "a: 1\n", None, None, ""),
        "a comment that is no marker": Block(page, 1, "bash", "ls\n", "needs a GPU", None, ""),
        "no reason": Block(page, 1, "bash", "ls\n", "not run here:", "not run here", ""),
        "a missing test file": Block(page, 1, "python", "1\n", "covered: tests/test_nothing.py", "covered", "tests/test_nothing.py"),
        "a test that does not name the page": Block(page, 1, "python", "1\n", "covered: tests/test_cli.py", "covered", "tests/test_cli.py"),
    }
    assert {name for name, block in cases.items() if not problems(block)} == set()


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [str(p) for p in PAGES[1:] if f"]({p})" not in readme] == []


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose(page: Path) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^ *```.*?^ *```", "", (ROOT / page).read_text(encoding="utf-8"), flags=re.S | re.M)


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (ROOT / page).parent / path if path else ROOT / page
            if not file.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", prose(file.resolve().relative_to(ROOT)), flags=re.M)}
                if anchor not in anchors:
                    broken.append(f"{page}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# -- configs ------------------------------------------------------------------------------------------------
def printed(args: list[str], capsys, subcommand: str = "fit") -> dict:
    """The config ``trd SUBCOMMAND ARGS --print_config`` prints."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        TRDCLI(args=[subcommand, *args, "--print_config"])
    assert exit.value.code in (None, 0), f"trd {subcommand} {shlex.join(args)}: {exit.value.code}"
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("block, index, command", PARSED, ids=[f"{b}:{k}:trd-{c[1]}" for b, k, c in PARSED])
def test_every_trd_command_parses(block, index, command, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    if command[1] == "plan":
        assert PlanCLI(args=command[2:], run=False).config.config
    else:
        assert printed(command[2:], capsys, command[1])["model"]["class_path"]


def outside(part, whole, where: str = "") -> list[str]:
    """Where ``part`` is not contained in ``whole``: each key with its value, ``...`` standing for any value."""
    if part == "...":
        return []
    if isinstance(part, dict):
        if not isinstance(whole, dict):
            return [f"{where or '.'}: a mapping in the docs, {whole!r} in the config"]
        return [w for k, v in part.items()
                for w in (outside(v, whole[k], f"{where}.{k}".lstrip(".")) if k in whole else [f"{where}.{k}".lstrip(".") + ": not in the config"])]
    if isinstance(part, list):
        if not isinstance(whole, list) or len(part) != len(whole):
            return [f"{where}: {part!r} in the docs, {whole!r} in the config"]
        return [w for i, (p, q) in enumerate(zip(part, whole)) for w in outside(p, q, f"{where}[{i}]")]
    return [] if part == whole else [f"{where}: {part!r} in the docs, {whole!r} in the config"]


@pytest.mark.parametrize("block", YAML, ids=str)
def test_every_yaml_block_is_what_the_config_holds(block, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(ROOT)
    shown = yaml.safe_load(block.body)
    if block.kind == "overlay on":
        overlay = tmp_path / "overlay.yaml"
        overlay.write_text(block.body)
        config = printed(["--config", block.what, "--config", str(overlay)], capsys)
    else:
        config = printed(["--config", block.what], capsys)
    assert not outside(shown, config), f"{block} ({block.kind} {block.what}):\n" + "\n".join(outside(shown, config))


def test_the_check_of_a_yaml_block_can_fail():
    config = {"model": {"init_args": {"refiner": {"class_path": "A", "init_args": {"sampling": None}}}, "class_path": "M"}}
    assert outside({"model": {"init_args": {"refiner": "..."}}}, config) == []
    assert outside({"model": {"init_args": {"refiner": {"init_args": {"sampling": {"max_new_tokens": 48}}}}}}, config) == [
        "model.init_args.refiner.init_args.sampling: a mapping in the docs, None in the config"]
    assert outside({"model": {"init_args": {"refinr": 1}}}, config) == ["model.init_args.refinr: not in the config"]


@pytest.mark.slow  # runs the command through the CLI (trd plan: the models built on the meta device)
@pytest.mark.parametrize("block", OUTPUT, ids=str)
def test_every_output_block_is_what_the_command_prints(block, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    command = shlex.split(block.what)
    capsys.readouterr()
    main(command[1:])
    out = capsys.readouterr().out
    assert [line.rstrip() for line in out.strip().splitlines()] == [line.rstrip() for line in block.body.strip().splitlines()]


def test_every_unmarked_python_block_runs():
    for block in (b for b in BLOCKS if b.lang == "python" and b.kind is None):
        exec(compile(block.body, str(block), "exec"), {})


# -- the switch of docs/methods.md -----------------------------------------------------------------------------
def differences(a, b, where: str = "") -> set[str]:
    """The dotted keys at which two printed configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {d for k in a.keys() | b.keys() for d in differences(a.get(k), b.get(k), f"{where}.{k}".lstrip("."))}
    return set() if a == b else {where}


def test_the_command_line_switch_is_the_trd_config(monkeypatch, capsys):
    """The command that switches the OPD demo to TRD on the command line prints exactly configs/demo/trd.yaml's config;
    without the refiner's sampling and the logger's name (as the README once showed it) it differs at those two."""
    monkeypatch.chdir(ROOT)
    (command,) = [c for b in BLOCKS if b.page == Path("docs/methods.md") for c in b.trd_commands()
                  if "--model.init_args.refiner=trd_lightning.refiners.TeacherRewrite" in c]
    assert command[:4] == ["trd", "fit", "--config", "configs/demo/opd.yaml"]
    trd = printed(["--config", "configs/demo/trd.yaml"], capsys)
    assert differences(printed(command[2:], capsys), trd) == set()
    short = [a for a in command[2:] if not a.startswith(("--model.init_args.refiner.sampling", "--trainer.logger.init_args.name"))]
    assert differences(printed(short, capsys), trd) == {"trainer.logger.init_args.name", "model.init_args.refiner.init_args.sampling"}


# -- the runs ------------------------------------------------------------------------------------------------
def scratch(directory: Path) -> Path:
    """A copy of the repository root to run in: its files linked, so what a run writes (``runs/``) stays here."""
    for entry in ROOT.iterdir():
        if not entry.name.startswith(".") and entry.name != "runs":
            (directory / entry.name).symlink_to(entry)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted({b.page for b in RUN}), ids=str)
def test_the_page_runs(page, tmp_path, monkeypatch):
    """The page's unmarked bash blocks, in order, each ``trd`` command made short (``SHORT``)."""
    monkeypatch.chdir(scratch(tmp_path))
    for block in (b for b in RUN if b.page == page):
        for command in block.commands():
            try:
                main([*command[1:], *SHORT[command[1]]])
            except SystemExit as exit:
                assert exit.code in (None, 0), f"{block}: {shlex.join(command)}\n{exit.code}"
