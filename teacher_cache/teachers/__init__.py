"""Teachers (tokenizers): the models whose per-patch tokens the cache stores."""

from .base import Teacher, TeacherOutput, TeacherSpec
from .registry import PRESETS, create_teacher, describe_teachers, list_teachers, register_teacher, resolve_name

__all__ = [
    "PRESETS",
    "Teacher",
    "TeacherOutput",
    "TeacherSpec",
    "create_teacher",
    "describe_teachers",
    "list_teachers",
    "register_teacher",
    "resolve_name",
]
