"""Pretraining objectives: ``digpt``, ``gen``, ``fd``, ``masked``, ``next-patch``, ``digit`` — and any module added
here (each registers itself with :func:`register_objective`; README "Extending: a new objective")."""

from .base import (
    Objective,
    StudentConfig,
    TargetSpec,
    create_objective,
    list_objectives,
    objective_config,
    register_objective,
)

__all__ = [
    "Objective",
    "StudentConfig",
    "TargetSpec",
    "create_objective",
    "list_objectives",
    "objective_config",
    "register_objective",
]
