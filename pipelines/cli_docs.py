"""What the command line says about a config, read from the source without importing it.

``digpt``'s flags take their defaults and help from the frozen config dataclasses (each field's default
and the docstring under it) and their lists of accepted values from the registries
(``@register_objective("digpt")``, ``VIT_SIZES``, ...). Importing those modules imports torch and timm,
which takes seconds; reading their source with :mod:`ast` takes milliseconds, so ``digpt --help`` and
``digpt train --help`` answer at once. ``tests/test_cli_help.py`` checks that everything read here equals
what the imported modules say, so the help cannot drift from the code.

Only literals are read (numbers, strings, tuples, None); a default that is an expression or a
``field(default_factory=...)`` reads as :data:`NO_DEFAULT`.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NO_DEFAULT: Any = object()
"""The default of a required field, or of one whose default is not a literal."""


@dataclass(frozen=True)
class FieldDoc:
    name: str
    default: Any
    """The literal default, or :data:`NO_DEFAULT`."""
    doc: str
    """The docstring under the field (cleaned), or ``""``."""
    required: bool = False
    """No default at all (as opposed to a default that is not a literal)."""

    def help(self) -> str:
        """The docstring's first paragraph, as one line of plain text (RST markup removed)."""
        first = self.doc.split("\n\n")[0].replace("\n", " ")
        return re.sub(r":\w+:`~?([^`]+)`|``([^`]+)``", lambda m: m.group(1) or m.group(2), first).strip()


def source_path(module: str) -> Path:
    """The file of ``module`` (``student.train``) or of a package's ``__init__``, found without importing
    anything below the top-level package (whose ``__init__`` is empty)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no package {top!r} on the path")
    path = Path(spec.origin).parent.joinpath(*rest)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _literal(node: ast.expr | None) -> Any:
    if node is None:
        return NO_DEFAULT
    try:
        return ast.literal_eval(node)
    except ValueError:
        return NO_DEFAULT


def config_fields(module: str, cls: str) -> dict[str, FieldDoc]:
    """The fields of dataclass ``cls`` in ``module``, in order, with their literal defaults and docstrings;
    the fields of its base classes defined in the same module first (a subclass's redeclaration wins, as
    in ``dataclasses``)."""
    classes = {n.name: n for n in _tree(source_path(module)).body if isinstance(n, ast.ClassDef)}
    if cls not in classes:
        raise LookupError(f"no class {cls} in {source_path(module)}")
    node = classes[cls]
    out: dict[str, FieldDoc] = {}
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            out.update(config_fields(module, base.id))
    for stmt, nxt in zip(node.body, [*node.body[1:], None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            doc = ""
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                doc = inspect.cleandoc(nxt.value.value)
            out[stmt.target.id] = FieldDoc(stmt.target.id, _literal(stmt.value), doc, stmt.value is None)
    return out


def class_doc(module: str, cls: str) -> str:
    """The first line of class ``cls``'s docstring in ``module`` (a subcommand's one-line help)."""
    for node in _tree(source_path(module)).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return (ast.get_docstring(node) or "").strip().splitlines()[0] if ast.get_docstring(node) else ""
    raise LookupError(f"no class {cls} in {source_path(module)}")


def registered(package: str, decorator: str) -> list[str]:
    """Sorted names registered with ``@decorator("name")`` in the modules of ``package`` (or in one module)."""
    path = source_path(package)
    files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
    names = set()
    for f in files:
        for node in ast.walk(_tree(f)):
            for deco in getattr(node, "decorator_list", ()):
                func = deco.func if isinstance(deco, ast.Call) else None
                called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if called == decorator and deco.args and isinstance(deco.args[0], ast.Constant):
                    names.add(deco.args[0].value)
    return sorted(names)


def registered_configs(package: str, decorator: str) -> dict[str, tuple[str, str]]:
    """``{name: (module, config class)}`` for every ``@decorator("name", config=Cls)`` in the modules of
    ``package`` (an objective's own knobs: ``student.objectives.base.register_objective``)."""
    path = source_path(package)
    files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
    out = {}
    for f in files:
        module = f"{package}.{f.stem}" if path.name == "__init__.py" else package
        for node in ast.walk(_tree(f)):
            for deco in getattr(node, "decorator_list", ()):
                func = deco.func if isinstance(deco, ast.Call) else None
                called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if called != decorator or not deco.args or not isinstance(deco.args[0], ast.Constant):
                    continue
                config = next((k.value for k in deco.keywords if k.arg == "config"), None)
                if isinstance(config, ast.Name):
                    out[deco.args[0].value] = (module, config.id)
    return dict(sorted(out.items()))


def module_value(module: str, name: str) -> Any:
    """A module-level literal (``ATTN_IMPLS = (...)``), or the keys of a module-level dict display
    (``VIT_SIZES = {"tiny-test": ..., ...}``) as a list in source order."""
    for node in _tree(source_path(module)).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == name and node.value is not None:
            if isinstance(node.value, ast.Dict):
                return [_literal(k) for k in node.value.keys]
            value = _literal(node.value)
            if value is NO_DEFAULT:
                raise ValueError(f"{module}.{name} is not a literal")
            return value
    raise LookupError(f"no module-level {name} in {source_path(module)}")
