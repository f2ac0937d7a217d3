"""One registry class for everything the project looks up by name: teacher families, objectives, orders,
ablation recipes, prepare sources.

Each entry is a thing (a factory, a class, a function) plus what it declares about itself (``meta``: an
objective's knobs config, an order's need for a similarity, a recipe's base configs). Registration is a
decorator in the module that defines the thing, so adding one is one file; a registry whose entries live
in a package imports every module of it the first time a name is asked for (``discover``). A name that
once ran something else is ``retired``: asking for it says where it went instead of "unknown".
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)


def modules_of(package: str) -> Callable[[], None]:
    """A ``discover`` that imports every module of ``package`` (each registers what it defines)."""

    def discover() -> None:
        pkg = importlib.import_module(package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{package}.{mod.name}")

    return discover


class Registry(Generic[T]):
    """Named things of one kind. ``kind`` names them in errors ("unknown objective 'x'; choose from ...")."""

    def __init__(
        self, kind: str, discover: Callable[[], None] | None = None, retired: dict[str, str] | None = None
    ) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._discover = discover
        self._discovered = discover is None
        self._loading = False
        self.retired: dict[str, str] = dict(retired or {})
        """Names that once ran something other than what they name, with where it went."""

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name", knob=...)`` on the thing; returns it unchanged."""
        if not name:
            raise ValueError(f"a {self.kind} needs a non-empty name")

        def deco(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return deco

    def add(self, name: str, obj: T, **meta: Any) -> None:
        old = self._entries.get(name)
        if (
            old is not None
            and old.obj is not obj
            and getattr(old.obj, "__qualname__", None) != getattr(obj, "__qualname__", object())
        ):
            # Re-importing a module re-registers the same thing (fine); two things under one name is a bug.
            raise ValueError(f"{self.kind} {name!r} is registered twice ({old.obj!r} and {obj!r})")
        self._entries[name] = Entry(name, obj, dict(meta))

    def _load(self) -> None:
        # A module that asks for names while discovery imports it must not recurse; a module that failed
        # to import fails the next lookup again instead of vanishing (discovered only once all imported).
        if self._discovered or self._loading:
            return
        self._loading = True
        try:
            assert self._discover is not None
            self._discover()
            self._discovered = True
        finally:
            self._loading = False

    @contextlib.contextmanager
    def scoped(self) -> Iterator[Registry[T]]:
        """Entries added inside the ``with`` are gone after it (a test's own objective or teacher)."""
        self._load()
        saved = dict(self._entries)
        try:
            yield self
        finally:
            self._entries = saved

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entry(self, name: str) -> Entry[T]:
        self._load()
        if name in self._entries:
            return self._entries[name]
        if name in self.retired:
            raise ValueError(f"{self.kind} {name!r} was retired: {self.retired[name]}")
        raise ValueError(f"unknown {self.kind} {name!r}; choose from {self.names()}")

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def meta(self, name: str) -> dict[str, Any]:
        return self.entry(name).meta

    def items(self) -> Iterator[tuple[str, T]]:
        return ((n, self._entries[n].obj) for n in self.names())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
