"""The prepare sources by name: ``@register_source("wds", config=WdsConfig)`` on a source's prepare
function; :func:`list_sources` and :func:`get_source` look them up.

Every module of this package is imported the first time a name is asked for, so a new source is one new
module here (its config, its sample iterator, its registered prepare function) and its test. ``config=``
names the source's frozen config dataclass, defined in the same module: ``pipelines.cli_docs`` reads
``registered_configs("teacher_cache.prepare", "register_source")`` and each config's fields from source,
as ``digpt train`` does for the objectives' knobs, so the ``prepare`` subcommands can be built from here
without importing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from teacher_cache.dataset import PreparedDataset
from teacher_cache.registry import Registry, modules_of

PrepareFn = Callable[..., PreparedDataset]
"""``prepare(cfg, ...) -> PreparedDataset``: writes the dataset directory ``cfg.out``."""

SOURCES: Registry[PrepareFn] = Registry("prepare source", discover=modules_of(__package__))


@dataclass(frozen=True)
class Source:
    """A registered source: ``source.prepare(source.config(...))`` prepares a dataset directory."""

    name: str
    config: type
    """The source's frozen config dataclass (its fields are the ``digpt prepare <name>`` options)."""
    prepare: PrepareFn


def register_source(name: str, *, config: type) -> Callable[[PrepareFn], PrepareFn]:
    """Register ``prepare(cfg: config, ...) -> PreparedDataset`` as source ``name``; returns it unchanged."""
    return SOURCES.register(name, config=config)


def list_sources() -> list[str]:
    """The registered source names, sorted."""
    return SOURCES.names()


def get_source(name: str) -> Source:
    """Source ``name``; an unknown name is a ``ValueError`` that lists the registered ones."""
    entry = SOURCES.entry(name)
    return Source(entry.name, entry.meta["config"], entry.obj)
