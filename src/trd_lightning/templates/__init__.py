"""Prompt templates: the user message each model sees, with ``{problem}``, ``{solution}`` and ``{attempt}`` slots.

A template is named in config by a built-in name (``math_refine``), a path to a text file, or the
literal text itself. Only the three known slots are substituted, so other braces (``\\boxed{}``,
code) pass through untouched.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

PROBLEM, SOLUTION, ATTEMPT = "problem", "solution", "attempt"
FIELDS = (PROBLEM, SOLUTION, ATTEMPT)
_SLOT = re.compile(r"\{(" + "|".join(FIELDS) + r")\}")


def builtin_names() -> list[str]:
    return sorted(p.name[:-4] for p in resources.files(__package__).iterdir() if p.name.endswith(".txt"))


class Template:
    """A user-message template and the fields it needs."""

    def __init__(self, spec: str, role: str = "template"):
        self.spec, self.role = spec, role
        self.text = self._resolve(spec)
        self.fields = tuple(f for f in FIELDS if "{" + f + "}" in self.text)

    def _resolve(self, spec: str) -> str:
        if spec in builtin_names():
            return (resources.files(__package__) / f"{spec}.txt").read_text(encoding="utf-8").strip("\n")
        if "{" not in spec and Path(spec).is_file():
            return Path(spec).read_text(encoding="utf-8").strip("\n")
        if any("{" + f + "}" in spec for f in FIELDS):
            return spec
        raise ValueError(
            f"{self.role} {spec!r} is neither a built-in template ({', '.join(builtin_names())}), "
            f"an existing file, nor a template text with a {{problem}} slot"
        )

    def require(self, *fields: str) -> Template:
        """Fail unless every one of ``fields`` has a slot in the text."""
        missing = [f for f in fields if f not in self.fields]
        if missing:
            slots = ", ".join("{" + f + "}" for f in missing)
            raise ValueError(f"{self.role} {self.spec!r} lacks the placeholder {slots}; add it to the template text")
        return self

    def render(self, **values: str) -> str:
        for field in self.fields:
            if values.get(field) is None:
                raise ValueError(f"{self.role} {self.spec!r} needs a value for {{{field}}}")
        # One pass, so a slot-like string inside a value is never substituted again.
        return _SLOT.sub(lambda m: values[m[1]], self.text)

    def __repr__(self) -> str:
        return f"Template({self.spec!r})"
