"""``digpt export``: the trained encoder as a timm ViT checkpoint, and loading it back for probes.

The file is safetensors with timm's key names; its metadata records the timm model name and the
kwargs that make the architecture match, so

    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=FILE, **DATA), num_classes=0, **KWARGS)

loads it with no missing or unexpected keys (``digpt export`` prints that line).

``DATA`` tells timm how to feed the student, which is not how the base model is fed: without it
``timm.data.resolve_data_config({}, model=m)`` answers the base model's 224 px and mean/std 0.5, while
the student was trained at its own size on ``[0, 1]`` pixels with no mean/std. :func:`timm_data_config`
writes the student's input size, ``mean=(0, 0, 0)``, ``std=(1, 1, 1)``, bilinear interpolation (the
trainer's ``replay_view``: bilinear, antialiased), ``crop_pct=1`` and a centre crop — so timm's eval
transform (resize the shorter side, centre-crop) gives the probe's evaluation view.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import latest_checkpoint
from .sizes import timm_kwargs_for, vit_preset
from .vit import VisionTransformer, ViTConfig, timm_conv_stem_embed


def run_config(run: str) -> dict[str, Any]:
    """RUN's config.json; a clear error when RUN is not a run directory."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run {run!r} is not a run directory (no config.json); train one with `digpt train`")
    with open(path) as f:
        return json.load(f)


def run_encoder_config(run: str) -> ViTConfig:
    return ViTConfig(**run_config(run)["encoder"])


def encoder_state_dict(run: str) -> dict[str, torch.Tensor]:
    """The encoder's weights from RUN's latest checkpoint, under timm's names (prefix stripped)."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run} (train first)")
    full = load_file(os.path.join(ckpt, "model.safetensors"))
    for prefix in ("model.encoder.", "encoder."):
        enc = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        if enc:
            return enc
    raise ValueError(f"checkpoint {ckpt} holds no encoder weights")


def is_code_run(run_cfg: dict) -> bool:
    """Whether a run's config.json describes DiGIT's code model (objective ``digit``, ``student/code_gpt.py``)."""
    return run_cfg.get("train", {}).get("objective") == "digit"


def _refuse_code_run(run: str) -> None:
    if is_code_run(run_config(run)):
        raise ValueError(
            f"run {run} trained DiGIT's code model (objective digit): it reads k-means codes, not "
            "pixels, so it is no ViT encoder; probe it with `digpt probe --run` (which rebuilds its "
            "tokenizer)"
        )


def load_encoder(run: str) -> VisionTransformer:
    """Rebuild the trained encoder of RUN (strict load)."""
    _refuse_code_run(run)
    enc = VisionTransformer(run_encoder_config(run))
    enc.load_state_dict(encoder_state_dict(run), strict=True)
    return enc.eval()


def timm_data_config(enc: ViTConfig) -> dict[str, Any]:
    """timm ``pretrained_cfg`` fields that reproduce the student's input (see the module docstring)."""
    return {
        "input_size": (enc.in_chans, enc.img_size, enc.img_size),
        "mean": (0.0,) * enc.in_chans,
        "std": (1.0,) * enc.in_chans,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def timm_spec(run: str) -> tuple[str, dict[str, Any]]:
    _refuse_code_run(run)
    cfg = run_config(run)
    preset = vit_preset(cfg["train"]["student"]["size"])
    kwargs = timm_kwargs_for(run_encoder_config(run))
    kwargs.pop("num_classes", None)
    kwargs.pop("in_chans", None)
    return preset.timm_name, kwargs


def export_encoder(run: str, out: str) -> str:
    """Write the encoder to ``out`` (safetensors) and return the timm line that loads it."""
    # timm reads a pretrained file as safetensors only when its name says so (else torch.load).
    if not out.endswith(".safetensors") or os.path.basename(out) == ".safetensors":
        raise ValueError(f"out must be a file name ending in .safetensors, got {out!r}")
    if os.path.isdir(out):
        raise ValueError(f"out {out} is a directory; give a .safetensors file path")
    name, kwargs = timm_spec(run)
    data = timm_data_config(run_encoder_config(run))
    weights = {k: v.contiguous() for k, v in encoder_state_dict(run).items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = run_encoder_config(run).stem
    save_file(
        weights,
        out,
        metadata={
            "timm_name": name,
            "timm_kwargs": json.dumps(kwargs),
            "stem": stem,
            "timm_data_config": json.dumps(data),
            "source_run": os.path.abspath(run),
        },
    )
    kw = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    if stem == "conv":  # timm has no conv-stem ViT preset: hand it the stem as its embed_layer
        kw += ", embed_layer=timm_conv_stem_embed()"
    overlay = "".join(f", {k}={v!r}" for k, v in data.items())
    line = (
        f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={out!r}{overlay}), "
        f"num_classes=0{kw})"
    )
    return ("from student.vit import timm_conv_stem_embed; " + line) if stem == "conv" else line


def create_timm_from_export(path: str, **overrides: Any) -> torch.nn.Module:
    """Load an exported file with timm, reading name and kwargs from its metadata."""
    import timm

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    kwargs = {**json.loads(meta["timm_kwargs"]), "num_classes": 0, **overrides}
    if meta.get("stem") == "conv":
        kwargs.setdefault("embed_layer", timm_conv_stem_embed())
    # Files exported before the data config was recorded load as before (timm's base config).
    stored = json.loads(meta.get("timm_data_config", "{}"))
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    return timm.create_model(
        meta["timm_name"], pretrained=True, pretrained_cfg_overlay=dict(file=path, **data), **kwargs
    )
