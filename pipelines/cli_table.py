"""A command's flags as a table: each flag names the dotted path of the config field it sets.

Each command is declared as data (``pipelines/cli_commands.py``), not as code: the flag's help and default come
from the field's docstring and default (read from source by :mod:`pipelines.cli_docs`, so ``--help``
imports nothing heavy), the config is built from the paths, and every field of the config is either a
flag or listed in ``hidden`` with the reason it has none (``tests/test_cli_table.py`` checks both ways).
The same table reads a run's ``config.json`` back (``train --config``): the file gives the values, the
flags given on the command line override them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines import cli_docs

_UNSET: Any = object()


@dataclass(frozen=True)
class Opt:
    """One flag of a command."""

    flag: str
    """``--batch-size``."""
    path: str
    """Dotted path of the config field it sets (``data.batch_size``); the help and default are that field's."""
    also: tuple[str, ...] = ()
    """Further paths set to the same value (``--seed`` seeds the model and the loader)."""
    type: Callable[[str], Any] | None = None
    """argparse ``type``."""
    choices: Callable[[], Sequence[str]] | None = None
    """Accepted values, read from a registry when the parser is built (listed in the help)."""
    strict: bool = False
    """argparse checks ``choices`` (its error names the flag) instead of the config (names the field)."""
    default: Any = _UNSET
    """A command-line default that differs from the config's, said in a comment where it is declared."""
    switch: bool = False
    """A ``store_true`` flag."""
    nargs: int | None = None
    """Values the flag takes (a tuple field: ``--betas 0.9 0.95``)."""
    group: str | None = None
    """Flags with the same group are mutually exclusive."""
    required: bool = False
    """Required (unless the command reads ``--config`` and the file gives it)."""
    append: bool = False
    """Repeatable; the values in order (a tuple field, or a per-item list a ``finish`` step expands)."""
    positional: bool = False
    """A positional argument (``flag`` is its name)."""
    invert: bool = False
    """A switch that sets its field to False (``--no-knn``)."""
    help: str | None = None
    """Help of a flag that is not one field's (a per-item list); default: the field's docstring."""
    metavar: str | None = None
    aliases: tuple[str, ...] = ()
    """Other spellings users already type (``extract --group`` for ``--tokenizer``)."""

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Command:
    """A command's config tree and flags."""

    sections: dict[str, tuple[str, str]]
    """Config path prefix -> (module, dataclass) whose fields live there; ``""`` is the root."""
    opts: tuple[Opt, ...]
    hidden: dict[str, str]
    """Config fields with no flag, each with the reason (derived, set by the run, or a file's business)."""
    finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """Turns the flags' tree into the config's where they differ (``extract``'s per-teacher lists)."""
    from_file: bool = False
    """The command takes ``--config FILE``: required flags may come from the file instead."""

    def root(self) -> type:
        import importlib

        module, cls = self.sections[""]
        return getattr(importlib.import_module(module), cls)

    def doc(self, path: str) -> cli_docs.FieldDoc:
        section, _, name = path.rpartition(".")
        return cli_docs.config_fields(*self.sections[section])[name]

    def paths(self) -> set[str]:
        """Every init field of the config tree, as dotted paths (sections themselves excluded)."""
        out = set()
        for section, (module, cls) in self.sections.items():
            for name in cli_docs.config_fields(module, cls):
                path = f"{section}.{name}" if section else name
                if path not in self.sections:
                    out.add(path)
        return out


def add_options(p: argparse.ArgumentParser, cmd: Command) -> None:
    """The command's flags on ``p``, each with its field's help and default."""
    groups: dict[str, Any] = {}
    for o in cmd.opts:
        fd = cmd.doc(o.path)
        target = p
        required = o.required and not cmd.from_file
        if o.group:
            if o.group not in groups:
                groups[o.group] = p.add_mutually_exclusive_group(required=required)
            target, required = groups[o.group], False
        text = o.help or fd.help()
        kwargs: dict[str, Any] = {} if o.positional else {"dest": o.dest}
        if o.switch:
            kwargs["action"] = "store_true"
        elif o.type is not None:
            kwargs["type"] = o.type
        if o.append:
            kwargs["action"] = "append"
        if o.nargs is not None:
            kwargs.update(nargs=o.nargs, metavar=tuple(o.dest.upper() for _ in range(o.nargs)))
        if o.metavar:
            kwargs["metavar"] = o.metavar
        if o.choices is not None:
            choices = list(o.choices())
            if o.strict or o.positional:
                kwargs["choices"] = choices
            elif not all(c in text for c in choices):
                text = f"{text} One of: {', '.join(choices)}."
        if required and not o.positional:
            kwargs["required"] = True
        if o.required and cmd.from_file:
            text += " Required unless --config gives it."
        if o.default is not _UNSET:
            kwargs["default"] = o.default
        elif o.switch or o.append:
            kwargs["default"] = None
        elif not fd.required and not o.positional:
            kwargs["default"] = None if fd.default is cli_docs.NO_DEFAULT else fd.default
        target.add_argument(o.flag, *o.aliases, help=text.replace("%", "%%"), **kwargs)


def explicit(build: Callable[[], argparse.ArgumentParser], argv: Sequence[str]) -> set[str]:
    """The dests of the flags ``argv`` gives, found by parsing it again with every default suppressed."""
    p = build()
    for action in _all_actions(p):
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(list(argv))))


def _all_actions(p: argparse.ArgumentParser):
    for action in p._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)


def set_path(tree: dict, path: str, value: Any) -> None:
    *parents, name = path.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[name] = value


def get_path(tree: dict, path: str, default: Any = None) -> Any:
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def apply(a: argparse.Namespace, cmd: Command, tree: dict, given: set[str] | None) -> dict:
    """``tree`` (a config as nested dicts) with the flags of ``a`` set at their paths: every flag when
    ``given`` is None, else only those in ``given`` (the ones on the command line)."""
    for o in cmd.opts:
        if given is not None and o.dest not in given:
            continue
        value = getattr(a, o.dest, None)
        if value is None or (o.switch and not value):
            continue
        if o.invert:
            value = False
        for path in (o.path, *o.also):
            set_path(tree, path, value)
    return tree


def build_config(a: argparse.Namespace, cmd: Command, tree: dict | None = None, given: set[str] | None = None):
    """The command's config: ``tree`` (default: nothing, so the dataclass defaults) with the flags over it."""
    from teacher_cache.config_io import from_dict

    tree = apply(a, cmd, dict(tree or {}), given)
    if cmd.finish is not None:
        tree = cmd.finish(tree)
    return from_dict(cmd.root(), tree)


def missing_required(a: argparse.Namespace, cmd: Command) -> list[str]:
    """Required flags not given (``--steps/--epochs``: one of a group is enough)."""
    out, groups = [], {}
    for o in cmd.opts:
        value = getattr(a, o.dest, None)
        if o.group:
            groups.setdefault(o.group, []).append((o, value))
        elif o.required and value is None:
            out.append(o.flag)
    for opts in groups.values():
        if any(o.required for o, _ in opts) and all(v is None for _, v in opts):
            out.append("/".join(o.flag for o, _ in opts))
    return out


def registered(package: str, decorator: str) -> Callable[[], list[str]]:
    return lambda: cli_docs.registered(package, decorator)


def value(module: str, name: str) -> Callable[[], Any]:
    return lambda: cli_docs.module_value(module, name)
