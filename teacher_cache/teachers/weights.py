"""Where a pretrained teacher's model comes from: a local file, the family's seeded tiny test model, or
(only when asked) the hub. One policy for every family that wraps a model zoo (``openclip``, ``timm``).

DESIGN invariant 6: a weights file is read with safetensors or ``torch.load(weights_only=True)`` (the
family's ``from_file`` guarantees that), never unpickled otherwise; without a file and without
``allow_hub`` nothing is downloaded and the teacher refuses, saying how to supply weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .base import load_error_reason


@contextmanager
def seeded_init(seed: int = 0) -> Iterator[None]:
    """Build a random model reproducibly (``torch.manual_seed(seed)``) without disturbing the caller's CPU RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_model(
    name: str,
    weights: str | None,
    *,
    from_file: Callable[[str], nn.Module],
    refused: str,
    tiny: Callable[[], nn.Module] | None,
    from_hub: Callable[[], nn.Module] | None,
    needs: str,
) -> nn.Module:
    """The model behind teacher ``name`` (``family:arg``, used in every message), from the first source given.

    * ``weights``: a local file, built by ``from_file(path)``. A missing file raises
      :class:`FileNotFoundError`; any failure inside ``from_file`` (a pickle ``weights_only`` refuses, a
      damaged file, another architecture's state_dict) raises ``ValueError("{name}: {refused}: {reason}")``.
    * ``tiny``: the family's offline test model (``None`` for a real architecture).
    * ``from_hub``: a download (``None`` unless the caller passed ``allow_hub=True``).

    With none of them: ``ValueError("{name} needs local weights: {needs}")``.
    """
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{name}: weights file not found: {weights}")
        try:
            return from_file(weights)
        except Exception as e:  # whatever the zoo's loader raises: one configuration error naming the file
            raise ValueError(f"{name}: {refused}: {load_error_reason(e)}") from e
    if tiny is not None:
        return tiny()
    if from_hub is not None:
        return from_hub()
    raise ValueError(f"{name} needs local weights: {needs}")
