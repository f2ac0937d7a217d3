"""timm ViTs as teachers: ``timm:<model name>`` (DINO, DINOv2, DINOv2 with registers, ...).

Loading (DESIGN invariant 6): ``weights=FILE`` goes through timm's own pretrained loader with the
pretrained config's ``file`` overridden (``pretrained_cfg_overlay=dict(file=...)``): timm then reads
the file (``.safetensors`` via safetensors, anything else via ``torch.load(weights_only=True)``),
runs the model's checkpoint filter (which converts official DINO/DINOv2 checkpoints and resamples
position embeddings to ``img_size``) and loads strictly — without touching the network. With no file
the teacher refuses unless ``allow_hub=True`` is passed explicitly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Teacher, TeacherOutput, TeacherSpec
from .registry import register_teacher
from .weights import load_model, seeded_init

DEFAULT_IMG_SIZE = 224
"""D-iGPT's teacher resolution; DINOv2 checkpoints (trained at 518) are resampled to it by timm."""

# Test-sized variants: name -> (timm architecture, overrides). Built with seeded random weights.
# Based on the DINOv2-with-registers architecture so the tiny model exercises register tokens,
# layer scale and ``no_embed_class`` exactly like the real ``*_reg4_dinov2`` teachers.
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_tiny_test": (
        "vit_small_patch14_reg4_dinov2",
        # init_values 0.5 (not DINOv2's 1e-5) so the two random blocks visibly change the tokens.
        {
            "img_size": 32,
            "patch_size": 8,
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "reg_tokens": 2,
            "init_values": 0.5,
        },
    ),
}


class TimmViTTeacher(Teacher):
    """Final-norm patch tokens ``[B, h*w, D]`` (all prefix tokens dropped) and the class token ``[B, D]``."""

    def __init__(self, model: nn.Module, spec: TeacherSpec, weights_path: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.weights_path = weights_path
        """The file the weights came from (kept out of the spec so the fingerprint is path-independent)."""

    def encode(self, x: torch.Tensor) -> TeacherOutput:
        m = self.model
        npt = m.num_prefix_tokens  # class token + register tokens (+ distillation token)
        if self.spec.layer is None:
            feats = m.forward_features(x)  # [B, prefix + h*w, D], final norm applied
            prefix, tokens = feats[:, :npt], feats[:, npt:]
        else:
            # forward_intermediates(norm=True) applies the same final norm to the chosen block.
            ((tokens, prefix),) = m.forward_intermediates(
                x,
                indices=[self.spec.layer - 1],
                norm=True,
                return_prefix_tokens=True,
                output_fmt="NLC",
                intermediates_only=True,
                stop_early=True,
            )
        cls = prefix[:, 0].float() if self.spec.has_cls else None
        return TeacherOutput(tokens=tokens.float(), cls=cls)


@register_teacher("timm", tiny="timm:vit_tiny_test")
def create_timm_teacher(
    arg: str | None,
    *,
    weights: str | None = None,
    layer: int | None = None,
    allow_hub: bool = False,
    img_size: int | None = None,
    **options: Any,
) -> TimmViTTeacher:
    """timm ViT (``timm:<name>``, e.g. DINOv2): final-norm patch tokens without class/register tokens, plus the class token.

    ``weights``: local checkpoint (``.safetensors`` or state_dict ``.pth``), no network.
    ``allow_hub=True``: download timm's pretrained weights when no file is given.
    ``img_size``: teacher resolution (default 224; 32 for the tiny test model).
    Other options are passed to ``timm.create_model``.
    """
    import timm

    if not arg:
        raise ValueError("timm teacher needs a model name: 'timm:<name>', e.g. timm:vit_small_patch14_dinov2.lvd142m")
    tiny = arg in TINY_MODELS
    if tiny:
        arch, kwargs = TINY_MODELS[arg]
        kwargs = dict(kwargs)
    else:
        arch, kwargs = arg, {}
    kwargs.update(options)
    if img_size is not None:
        kwargs["img_size"] = img_size
    kwargs.setdefault("img_size", DEFAULT_IMG_SIZE)

    def from_file(path: str) -> nn.Module:  # timm reads the file with safetensors or torch.load(weights_only=True)
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)

    def seeded() -> nn.Module:
        with seeded_init():
            return timm.create_model(arch, pretrained=False, **kwargs)

    model = load_model(
        f"timm:{arg}",
        weights,
        from_file=from_file,
        refused=f"could not load weights {weights} for {arch}",
        tiny=seeded if tiny else None,
        from_hub=(lambda: timm.create_model(arch, pretrained=True, **kwargs)) if allow_hub else None,
        needs=f"pass --weights FILE (a .safetensors or .pth state_dict for {arch}), "
        "or allow_hub=True to download timm's pretrained weights",
    )

    spec = _timm_spec(model, arg, arch, int(kwargs["img_size"]), layer, tiny)
    teacher = TimmViTTeacher(model, spec, weights_path=weights)
    teacher.eval()
    return teacher


def _timm_spec(model: nn.Module, arg: str, arch: str, size: int, layer: int | None, tiny: bool) -> TeacherSpec:
    """The spec of a built timm ViT; refuses a model without prefix tokens and a ``layer`` out of range."""
    if not hasattr(model, "num_prefix_tokens") or not hasattr(model, "forward_intermediates"):
        raise ValueError(f"timm:{arg}: {type(model).__name__} is not a ViT-style model with prefix tokens")
    n_blocks = len(model.blocks)
    if layer is not None and not 1 <= layer <= n_blocks:
        raise ValueError(f"timm:{arg}: layer must be in 1..{n_blocks} (1-based block index), got {layer}")
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    cfg = model.pretrained_cfg
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    return TeacherSpec(
        name=f"timm:{arg}",
        input_size=int(size),
        grid=(grid[0], grid[1]),
        dim=int(model.embed_dim),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        has_cls=has_cls,
        layer=layer,
        extra={
            "arch": arch,
            "pretrained_tag": None if tiny else cfg.get("tag"),
            "num_prefix_tokens": int(model.num_prefix_tokens),
            "tokens": "final norm, prefix (class/register) tokens dropped",
        },
    )
