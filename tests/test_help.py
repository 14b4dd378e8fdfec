"""``trd fit --help`` documents every option: each one a config can set has help text.

jsonargparse builds an option's help from the ``Args:`` section of its class's docstring (or ``__init__``'s); an option
without an entry there, or in an ``Args:`` section it cannot parse, shows only its type and default.
"""

from __future__ import annotations

import inspect
import pydoc
import typing

from jsonargparse import ArgumentParser
from lightning.pytorch import Callback
from lightning.pytorch.strategies import Strategy

from trd_lightning.cli import plugins

PACKAGE = "trd_lightning"


def subclasses(base: type, package: str = PACKAGE) -> set[type]:
    """The package's subclasses of ``base``, as ``plugins`` finds them."""
    found, todo = set(), [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return {c for c in found if in_package(c, package) and not inspect.isabstract(c)}


def in_package(cls: type, package: str) -> bool:
    return cls.__module__ == package or cls.__module__.startswith(package + ".")


def classes_in(hint, package: str) -> set[type]:
    """The package's classes a type hint names, at any depth (``Sampling | None``, ``list[Limits]``, ...)."""
    found = {hint} if inspect.isclass(hint) and in_package(hint, package) else set()
    for arg in typing.get_args(hint):
        found |= classes_in(arg, package)
    return found


def reachable(roots: set[type], package: str = PACKAGE) -> set[type]:
    """``roots`` and every class of the package that their ``__init__`` type hints reach, and theirs in turn
    (``DistillationModule`` -> ``ModelSpec`` -> ``LoRA``): each one's options are options of a config."""
    seen, todo = set(), list(roots)
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for hint in typing.get_type_hints(cls.__init__).values():
            todo.extend(classes_in(hint, package) - seen)
    return seen


def configurable_classes() -> set[type]:
    """Every plug-in ``trd_lightning.cli.plugins`` lists (a config's ``class_path``), the package's strategies and
    callbacks (``trainer.strategy``, ``trainer.callbacks``), and the classes their arguments take."""
    paths = [path for kind in plugins().split("; ") for path in kind.split(": ", 1)[1].split(" | ") if path]
    roots = {pydoc.locate(path) for path in paths}
    assert None not in roots, f"a class plugins() lists does not import: {paths}"
    return reachable(roots | subclasses(Strategy) | subclasses(Callback))


def options_without_help(classes) -> list[str]:
    """``module.Class.option`` for each option of these classes whose ``--help`` text is empty."""
    missing = []
    for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "x", fail_untyped=False, sub_configs=True)
        # jsonargparse has no public way to read an option's help text back (format_help() would have to be parsed,
        # wrapped lines and all), so this reads argparse's list of actions. The class's own options are ``x.<name>``;
        # ``x.<name>.help`` prints a subclass's help, and ``x`` itself is the --x config-file option.
        for action in parser._actions:
            name = action.dest.removeprefix("x.")
            if action.dest.startswith("x.") and "." not in name and not (action.help or "").strip():
                missing.append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    return missing


def test_every_option_has_help():
    classes = configurable_classes()
    assert len(classes) > 20, f"found only {sorted(c.__qualname__ for c in classes)}: the discovery is broken"
    missing = options_without_help(classes)
    assert not missing, (
        f"{len(missing)} options have no --help text; give each an entry in its class's Args: section "
        "(one 'name: description' line per parameter):\n  " + "\n  ".join(missing)
    )


# -- the check itself: it must flag what it is meant to flag ------------------------------------------------------


class _Inner:
    """Reached only through ``_Outer``'s type hints.

    Args:
        documented: has help.
    """

    def __init__(self, documented: int = 1, undocumented: int = 2):
        pass


class _Outer:
    """A plug-in with one option documented and one not.

    Args:
        inner: a nested class, checked in its turn.
    """

    def __init__(self, inner: _Inner | None = None, forgotten: float = 0.5):
        pass


def test_the_check_flags_undocumented_options():
    classes = reachable({_Outer}, package=__name__)
    assert classes == {_Outer, _Inner}
    assert options_without_help(classes) == [f"{__name__}._Inner.undocumented", f"{__name__}._Outer.forgotten"]
