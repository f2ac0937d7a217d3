"""OpenCLIP image towers as teachers: ``openclip:<arch>@<pretrained>`` (e.g. ``ViT-L-14@openai``).

Targets follow the official D-iGPT code (OliverRensu/D-iGPT, ``DiGPT_torch/clip.py``): the visual
tower's last block output goes through ``ln_post`` and then the projection ``proj`` for *every*
token, not only the class token. So patch tokens live in the same projected (CLIP embedding) space
as the image embedding, and token 0 of that sequence is exactly ``encode_image`` (unnormalised).

Loading (DESIGN invariant 6): ``weights=FILE`` builds the architecture from open_clip's built-in
config and loads the file (``.safetensors``, or a state_dict ``.pt/.bin/.pth`` via
``torch.load(weights_only=True)``) — no network; the ``@pretrained`` tag is then only used to look
up, from open_clip's in-package table, the tag's QuickGELU flag and mean/std. Without a file the
teacher refuses unless ``allow_hub=True`` is passed, in which case open_clip downloads the tag.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .base import CLIP_MEAN, CLIP_STD, Teacher, TeacherOutput, TeacherSpec
from .registry import register_teacher
from .weights import load_model, seeded_init

TINY_ARCH = "digpt-tiny-vit"
"""open_clip config name registered in-process for ``openclip:tiny`` (tests; random weights)."""

_TINY_CFG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    # A trivial text tower: open_clip's CLIP class always builds one; we drop it after creation.
    "text_cfg": {"context_length": 4, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1},
}


def _register_tiny_config() -> None:
    """Make ``TINY_ARCH`` resolvable by ``open_clip.create_model`` (idempotent, in-process only).

    open_clip resolves built-in names through the module-level dict ``factory._MODEL_CONFIGS``
    (``add_model_config`` only takes JSON files on disk). ``_rescan_model_configs`` rebinds that
    dict but copies existing entries, so we look it up afresh on every call.
    """
    import open_clip.factory as f

    if TINY_ARCH not in f._MODEL_CONFIGS:
        f._MODEL_CONFIGS[TINY_ARCH] = _TINY_CFG


def build_tiny_clip(**create_kwargs: Any) -> nn.Module:
    """The full (image + text) open_clip model behind ``openclip:tiny``: random, seeded with 0.

    Tests save its ``state_dict()`` and load it back through ``create_teacher(..., weights=FILE)``,
    i.e. the same open_clip checkpoint path a real CLIP file takes.
    """
    import open_clip

    _register_tiny_config()
    with seeded_init():
        return open_clip.create_model(TINY_ARCH, pretrained=None, **create_kwargs)


def _parse_arg(arg: str | None) -> tuple[str, str | None]:
    if not arg:
        raise ValueError(
            "openclip teacher needs an architecture: 'openclip:<arch>@<pretrained>', e.g. openclip:ViT-B-16@openai"
        )
    arch, _, tag = arg.partition("@")
    return arch, (tag or None)


class OpenCLIPTeacher(Teacher):
    """Per-patch tokens ``[B, h*w, D_out]`` and class token ``[B, D_out]`` of an OpenCLIP ViT.

    Only the visual tower is kept (the text tower is dropped to save memory and is not part of the
    fingerprint). ``layer`` (1-based) takes the output of that residual block; ``ln_post`` and
    ``proj`` are applied to it exactly as to the last block.
    """

    def __init__(self, visual: nn.Module, spec: TeacherSpec, weights_path: str | None = None) -> None:
        super().__init__()
        self.visual = visual
        self.spec = spec
        self.weights_path = weights_path
        """The file the weights came from (kept out of the spec so the fingerprint is path-independent)."""

    def encode(self, x: torch.Tensor) -> TeacherOutput:
        v = self.visual
        x = x.to(v.conv1.weight.dtype)
        # Embedding: the same steps as open_clip's VisionTransformer._embeds, spelled out so that
        # intermediate blocks are reachable without running the whole stack.
        x = v.conv1(x).flatten(2).transpose(1, 2)  # [B, h*w, width], raster order
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)  # identity in eval mode
        x = v.ln_pre(x)
        tr = v.transformer
        if not tr.batch_first:
            x = x.transpose(0, 1)
        depth = self.spec.layer if self.spec.layer is not None else len(tr.resblocks)
        for blk in tr.resblocks[:depth]:
            x = blk(x)
        if not tr.batch_first:
            x = x.transpose(0, 1)
        # ln_post + proj on every token (D-iGPT): token 0 is then encode_image's output.
        x = v.ln_post(x)
        if v.proj is not None:
            x = x @ v.proj
        x = x.float()
        return TeacherOutput(tokens=x[:, 1:], cls=x[:, 0])


def _check_supported(visual: nn.Module, arch: str) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        # A configuration error (which arch was named), not a programming one: ValueError like the rest.
        raise ValueError(  # noqa: TRY004
            f"openclip:{arch}: only plain ViT image towers are supported (got {type(visual).__name__}; "
            "ResNet and timm-backed towers have no per-patch class-token layout)"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise ValueError(
            f"openclip:{arch}: image tower pools with attn_pool/pool_type={visual.pool_type!r}; "
            "only class-token ('tok') pooling is supported"
        )


@register_teacher("openclip", tiny="openclip:tiny")
def create_openclip_teacher(
    arg: str | None,
    *,
    weights: str | None = None,
    layer: int | None = None,
    allow_hub: bool = False,
    quick_gelu: bool | None = None,
    **options: Any,
) -> OpenCLIPTeacher:
    """OpenCLIP ViT image tower (``openclip:<arch>@<tag>``): ln_post+proj tokens of every patch, plus the class token.

    ``weights``: local checkpoint file (no network). ``allow_hub=True``: download ``tag`` via
    open_clip when no file is given. ``quick_gelu``: override the activation (default: the tag's
    setting from open_clip's pretrained table, else the arch config's). ``openclip:tiny``: a
    2-block, 32 px test model with random weights seeded by ``torch.manual_seed(0)``.
    """
    if options:
        raise ValueError(f"openclip teacher: unknown options {sorted(options)}")
    arch, tag = _parse_arg(arg)
    tiny = arch == "tiny"
    if tiny:
        arch = TINY_ARCH
        _register_tiny_config()
    arch_cfg = _arch_config(arg, arch, layer)
    kwargs, qg = _create_kwargs(arg, arch, tag, arch_cfg, quick_gelu)
    model = _load_clip(arg, arch, tag, weights, kwargs, tiny=tiny, allow_hub=allow_hub)
    spec = _clip_spec(model, arg, arch, tag, layer, quick_gelu=qg)
    teacher = OpenCLIPTeacher(model.visual, spec, weights_path=weights)
    teacher.eval()
    return teacher


def _arch_config(arg: str | None, arch: str, layer: int | None) -> dict[str, Any]:
    """open_clip's built-in config of ``arch``; ``layer`` is checked against it before any weights load
    (possibly gigabytes of them)."""
    import open_clip

    arch_cfg = open_clip.get_model_config(arch)
    if arch_cfg is None:
        raise ValueError(f"openclip:{arg}: unknown architecture {arch!r} (see open_clip.list_models())")
    n_blocks = arch_cfg["vision_cfg"].get("layers")
    if layer is not None and isinstance(n_blocks, int) and not 1 <= layer <= n_blocks:
        raise ValueError(f"openclip:{arg}: layer must be in 1..{n_blocks} (1-based block index), got {layer}")
    return arch_cfg


def _create_kwargs(
    arg: str | None, arch: str, tag: str | None, arch_cfg: dict[str, Any], quick_gelu: bool | None
) -> tuple[dict[str, Any], bool]:
    """``(open_clip.create_model keywords, whether the activation is QuickGELU)``: the keywords fix the
    activation and mean/std the ``tag`` was trained with (a weights file carries neither)."""
    import open_clip

    tag_cfg: dict[str, Any] = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if tag and not tag_cfg:
        # Not fatal (a private tag is just a label), but QuickGELU and mean/std then come from the
        # arch config alone — a typo'd 'openai' would silently build the wrong activation.
        warnings.warn(
            f"openclip:{arg}: tag {tag!r} is not in open_clip's pretrained table for {arch}; "
            f"using the arch config's activation and OpenAI mean/std (known tags: "
            f"{open_clip.list_pretrained_tags_by_model(arch)})",
            stacklevel=3,  # the factory's caller
        )
    kwargs: dict[str, Any] = {}
    qg = (tag_cfg.get("quick_gelu", False) or arch_cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    if qg:
        # open_clip only *warns* when a QuickGELU-trained tag (all OpenAI ones) is built on a GELU
        # config, and knows nothing of the tag when given a file: force the activation ourselves.
        kwargs["force_quick_gelu"] = True
    else:
        kwargs["quick_gelu"] = False  # model kwarg, overrides a '-quickgelu' arch config when asked to
    if "mean" in tag_cfg and "std" in tag_cfg:
        kwargs["force_preprocess_cfg"] = {"mean": tag_cfg["mean"], "std": tag_cfg["std"]}
    return kwargs, bool(qg)


def _load_clip(
    arg: str | None,
    arch: str,
    tag: str | None,
    weights: str | None,
    kwargs: dict[str, Any],
    *,
    tiny: bool,
    allow_hub: bool,
) -> nn.Module:
    """The full open_clip model: from ``weights``, else the seeded tiny model, else (``allow_hub``) the hub."""
    import open_clip

    def from_file(path: str) -> nn.Module:
        # A path as `pretrained` is loaded by open_clip's load_checkpoint (safetensors or
        # torch.load(weights_only=True)), strict; no tag lookup -> no download.
        return open_clip.create_model(arch, pretrained=path, require_pretrained=True, weights_only=True, **kwargs)

    def from_hub() -> nn.Module:
        if not tag:
            raise ValueError(f"openclip:{arg}: allow_hub needs a pretrained tag, e.g. openclip:{arch}@openai")
        return open_clip.create_model(arch, pretrained=tag, require_pretrained=True, **kwargs)

    return load_model(
        f"openclip:{arg}",
        weights,
        from_file=from_file,
        refused=f"could not load {weights} as an open_clip state_dict "
        "(.safetensors/.bin/.pt state_dict). OpenAI's original TorchScript .pt archives are refused "
        "by weights_only loading; use the open_clip conversion (e.g. open_clip_model.safetensors "
        "from the hub repo in open_clip's pretrained table)",
        tiny=(lambda: build_tiny_clip(**kwargs)) if tiny else None,
        from_hub=from_hub if allow_hub else None,
        needs=f"pass --weights FILE (an open_clip checkpoint for {arch}), "
        "or allow_hub=True to download the tag from the hub",
    )


def _clip_spec(
    model: nn.Module, arg: str | None, arch: str, tag: str | None, layer: int | None, quick_gelu: bool
) -> TeacherSpec:
    """The spec of a built model's image tower; refuses towers without a per-patch class-token layout."""
    import open_clip

    visual = model.visual
    _check_supported(visual, arch)
    n_blocks = len(visual.transformer.resblocks)
    if layer is not None and not 1 <= layer <= n_blocks:
        raise ValueError(f"openclip:{arg}: layer must be in 1..{n_blocks} (1-based block index), got {layer}")
    pp = open_clip.get_model_preprocess_cfg(model)
    size = visual.image_size
    patch = visual.patch_size
    if size[0] != size[1]:
        raise ValueError(f"openclip:{arg}: non-square input {size} is not supported")
    grid = (size[0] // patch[0], size[1] // patch[1])
    dim = visual.output_dim if visual.proj is not None else visual.conv1.out_channels
    return TeacherSpec(
        name=f"openclip:{arg}",
        input_size=int(size[0]),
        grid=grid,
        dim=int(dim),
        mean=tuple(float(m) for m in pp.get("mean", CLIP_MEAN)),
        std=tuple(float(s) for s in pp.get("std", CLIP_STD)),
        has_cls=True,
        layer=layer,
        extra={"arch": arch, "pretrained": tag, "quick_gelu": quick_gelu, "tokens": "ln_post+proj on every token"},
    )
