"""Checkpoints: safetensors weights + a ``torch.load(weights_only=True)``-safe optimizer/RNG file +
JSON state, written into a temporary directory and renamed into place, then pointed to by ``latest``
(itself replaced atomically). A crash at any moment leaves either the previous checkpoint or the new
one, never a half-written one that could be loaded."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from teacher_cache.io import atomic_write_text

LATEST = "latest"


@dataclass
class TrainState:
    """Where training stands: optimizer steps done, and the loader position of the next micro-batch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def save_checkpoint(
    run: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> str:
    """Write ``RUN/checkpoints/step_XXXXXXXX`` and point ``latest`` at it; keep the newest ``keep``."""
    root = os.path.join(run, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step_{state.step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(tmp, "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, os.path.join(tmp, "optim.pt"))
    atomic_write_text(os.path.join(tmp, "state.json"), json.dumps({**asdict(state), **(extra or {})}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(os.path.join(root, LATEST), name)
    # Prune by step number, never by name order, and never the checkpoint just written.
    done = [d for _, d in _by_step(root) if d != name]
    for old in done[: max(0, len(done) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def _by_step(root: str) -> list[tuple[int, str]]:
    """``(step, name)`` of the finished checkpoint directories, oldest first."""
    found = []
    for d in os.listdir(root) if os.path.isdir(root) else []:
        head, _, num = d.partition("_")
        if head == "step" and num.isdigit() and os.path.isdir(os.path.join(root, d)):
            found.append((int(num), d))
    return sorted(found)


def latest_checkpoint(run: str) -> str | None:
    path = os.path.join(run, "checkpoints", LATEST)
    if not os.path.exists(path):
        return None
    ckpt = os.path.join(run, "checkpoints", open(path).read().strip())
    return ckpt if os.path.isdir(ckpt) else None


def candidate_checkpoints(run: str) -> list[str]:
    """Checkpoints to try on resume, best first: the one ``latest`` names, then the others by step, newest first."""
    root = os.path.join(run, "checkpoints")
    first = latest_checkpoint(run)
    rest = [os.path.join(root, d) for _, d in reversed(_by_step(root))]
    return ([first] if first else []) + [c for c in rest if c != first]


def load_latest(
    run: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, warn=print
) -> tuple[str, TrainState] | None:
    """Load the newest readable checkpoint of ``run``; one that cannot be read (truncated by a full disk,
    damaged on copy) is passed over with a warning naming it and why. ``None`` when there is none."""
    tried = candidate_checkpoints(run)
    for ckpt in tried:
        try:
            return ckpt, load_checkpoint(ckpt, model, optimizer)
        except Exception as e:  # safetensors, torch.load and json each raise their own types on damage
            warn(
                f"warning: checkpoint {ckpt} is unreadable ({type(e).__name__}: {str(e)[:160]}); "
                "falling back to the previous one"
            )
    if tried:  # never train on from weights a damaged checkpoint may have half-loaded
        raise ValueError(f"no readable checkpoint in {run} (tried {len(tried)}); start a new run with another --out")
    return None


def load_checkpoint(ckpt: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> TrainState:
    """Restore weights (strict), optimizer and torch RNG; return the saved :class:`TrainState`."""
    model.load_state_dict(load_file(os.path.join(ckpt, "model.safetensors")), strict=True)
    blob = torch.load(os.path.join(ckpt, "optim.pt"), map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    saved = json.load(open(os.path.join(ckpt, "state.json")))
    return TrainState(**{k: saved[k] for k in ("step", "epoch", "batch_in_epoch")})
