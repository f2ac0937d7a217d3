"""Teachers (tokenizers): the models whose per-patch tokens the cache stores."""

from .base import Teacher, TeacherOutput, TeacherSpec
from .build import base_teacher, build_teacher, is_fitted, load_fitted
from .registry import (
    PRESETS,
    Fit,
    create_teacher,
    describe_teachers,
    family_fit,
    family_knobs,
    fitted_arrays,
    global_token_in_token_space,
    list_teachers,
    register_teacher,
    resolve_name,
)

__all__ = [
    "PRESETS",
    "Fit",
    "Teacher",
    "TeacherOutput",
    "TeacherSpec",
    "base_teacher",
    "build_teacher",
    "create_teacher",
    "describe_teachers",
    "family_fit",
    "family_knobs",
    "fitted_arrays",
    "global_token_in_token_space",
    "is_fitted",
    "list_teachers",
    "load_fitted",
    "register_teacher",
    "resolve_name",
]
