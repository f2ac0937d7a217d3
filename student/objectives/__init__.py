"""Pretraining objectives: ``digpt``, ``gen``, ``fd``, ``masked``, ``igpt``, ``digit``."""

from .base import Objective, StudentConfig, TargetSpec, create_objective, list_objectives, register_objective

__all__ = ["Objective", "StudentConfig", "TargetSpec", "create_objective", "list_objectives", "register_objective"]
