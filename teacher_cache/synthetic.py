"""A class-structured synthetic image set for tests, demos and CPU recipes.

A class is a *shape* (and, past 16 classes, a shape x fill texture). Everything else is nuisance,
drawn at random per image: foreground colour, position, scale (25-60% of the image), rotation, a
gradient or noise background, and a few soft blobs and lines. Colour is independent of class, so a
classifier cannot win from pixel colour statistics; it has to see form, which is what a teacher's
tokens and a student's features should capture.

Sample ``i`` of seed ``s`` is drawn from ``numpy.random.default_rng([s, i])`` alone, so it is the
same whether generated on its own, in a stream, or by another worker: :func:`iter_synthetic_jpegs`
spreads the drawing and JPEG encoding over spawned processes and yields the same bytes in the same order.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MIN_CLASSES, MAX_CLASSES = 2, 64
_SUPERSAMPLE = 2  # drawn at 2x and box-filtered down: antialiased edges at any size

Point = tuple[float, float]
# A shape is polygons in unit coordinates (inside the unit disc), each drawn with 255 (add) or 0
# (cut), in order. Polygons, not ellipses, so every shape rotates the same way.
Shape = list[tuple[list[Point], int]]


def _ngon(n: int, r: float = 1.0, cx: float = 0.0, cy: float = 0.0, phase: float = 0.0) -> list[Point]:
    return [
        (cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _star() -> list[Point]:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.42
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _semicircle() -> list[Point]:
    return [(math.cos(a), 0.45 - math.sin(a)) for a in np.linspace(0, math.pi, 33)]


_S = 0.7071  # half side of the square inscribed in the unit disc

SHAPES: dict[str, Shape] = {
    "circle": [(_ngon(64), 255)],
    "square": [(_rect(-_S, -_S, _S, _S), 255)],
    "triangle": [(_ngon(3, phase=-math.pi / 2), 255)],
    "cross": [(_rect(-0.95, -0.28, 0.95, 0.28), 255), (_rect(-0.28, -0.95, 0.28, 0.95), 255)],
    "ring": [(_ngon(64), 255), (_ngon(64, 0.55), 0)],
    "star": [(_star(), 255)],
    "crescent": [(_ngon(64), 255), (_ngon(64, 0.85, cx=0.45, cy=-0.1), 0)],
    "arrow": [([(-0.95, -0.2), (0.1, -0.2), (0.1, -0.6), (0.95, 0.0), (0.1, 0.6), (0.1, 0.2), (-0.95, 0.2)], 255)],
    "tee": [(_rect(-0.8, -0.8, 0.8, -0.4), 255), (_rect(-0.2, -0.4, 0.2, 0.85), 255)],
    "ell": [(_rect(-0.6, -0.85, -0.2, 0.85), 255), (_rect(-0.2, 0.45, 0.6, 0.85), 255)],
    "heart": [
        (_ngon(48, 0.45, cx=-0.42, cy=-0.3), 255),
        (_ngon(48, 0.45, cx=0.42, cy=-0.3), 255),
        ([(-0.85, -0.15), (0.85, -0.15), (0.0, 0.9)], 255),
    ],
    "semicircle": [(_semicircle(), 255)],
    "frame": [(_rect(-_S, -_S, _S, _S), 255), (_rect(-0.4, -0.4, 0.4, 0.4), 0)],
    "bars": [(_rect(-0.85, -0.6, 0.85, -0.2), 255), (_rect(-0.85, 0.2, 0.85, 0.6), 255)],
    "rhombus": [([(0.0, -1.0), (0.45, 0.0), (0.0, 1.0), (-0.45, 0.0)], 255)],
    "bowtie": [([(-0.9, -0.7), (0.0, 0.0), (-0.9, 0.7)], 255), ([(0.9, -0.7), (0.0, 0.0), (0.9, 0.7)], 255)],
}
SHAPE_NAMES = tuple(SHAPES)
TEXTURES = ("solid", "stripes", "dots", "checker")


def _check_num_classes(num_classes: int) -> None:
    if not MIN_CLASSES <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [{MIN_CLASSES}, {MAX_CLASSES}], got {num_classes}")


def _class_parts(label: int, num_classes: int) -> tuple[str, str]:
    """``(shape, texture)`` of a class: shapes first (solid), then the same shapes textured."""
    _check_num_classes(num_classes)
    if not 0 <= label < num_classes:
        raise ValueError(f"label must be in [0, {num_classes}), got {label}")
    return SHAPE_NAMES[label % len(SHAPE_NAMES)], TEXTURES[label // len(SHAPE_NAMES)]


def class_names(num_classes: int) -> list[str]:
    """Human names of the classes, e.g. ``circle`` or ``circle_stripes``."""
    _check_num_classes(num_classes)
    names = []
    for label in range(num_classes):
        shape, texture = _class_parts(label, num_classes)
        names.append(shape if texture == "solid" else f"{shape}_{texture}")
    return names


def _shape_mask(shape: str, canvas: int, cx: float, cy: float, radius: float, angle: float) -> Image.Image:
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    c, s = math.cos(angle), math.sin(angle)
    for poly, value in SHAPES[shape]:
        pts = [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in poly]
        draw.polygon(pts, fill=value)
    return mask


def _texture_mask(texture: str, canvas: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Where the fill uses its first colour; the pattern turns and scales with the shape."""
    if texture == "solid":
        return np.ones((canvas, canvas), dtype=bool)
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / radius  # shape-local coordinates, unit = radius
    v = (-(xx - cx) * s + (yy - cy) * c) / radius
    period = 0.5
    if texture == "stripes":
        return np.floor(u / period) % 2 == 0
    if texture == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    du, dv = u / period % 1.0 - 0.5, v / period % 1.0 - 0.5  # dots
    return du * du + dv * dv < 0.3**2


def class_mask(label: int, num_classes: int, size: int, angle: float = 0.0) -> np.ndarray:
    """``[size, size]`` bool mask of the class's first fill colour, centred, at 80% scale.

    The canonical form of a class, for checking that classes differ in form (tests, docs).
    """
    shape, texture = _class_parts(label, num_classes)
    canvas, centre, radius = size * _SUPERSAMPLE, size * _SUPERSAMPLE / 2, size * _SUPERSAMPLE * 0.4
    mask = np.asarray(_shape_mask(shape, canvas, centre, centre, radius, angle)) > 127
    mask &= _texture_mask(texture, canvas, centre, centre, radius, angle)
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BOX)
    return np.asarray(small) > 127


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _background(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """``[canvas, canvas, 3]`` float: a two-colour linear gradient or smooth coloured noise."""
    if rng.random() < 0.5:
        a, b = _colour(rng), _colour(rng)
        theta = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32) / canvas
        t = (xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return a + (b - a) * t[..., None]
    # A base colour with low-frequency variation and fine grain: textured, but calm enough that
    # the shape stays the most salient thing at 32 px.
    cells = int(rng.integers(2, 5))
    low = np.clip(_colour(rng) + rng.normal(0, 45, size=(cells, cells, 3)), 0, 255).astype(np.uint8)
    smooth = Image.fromarray(low).resize((canvas, canvas), Image.Resampling.BICUBIC)
    # Per-pixel draws come from a child generator, so the draws after this one (and with them the
    # image's layout) do not depend on the image size.
    grain_rng = np.random.default_rng(int(rng.integers(2**62)))
    grain = grain_rng.normal(0, 8, size=(canvas, canvas, 1)).astype(np.float32)
    return np.asarray(smooth, dtype=np.float32) + grain


def _distractors(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A few soft blobs and thin lines, so the shape is not the only thing in the picture."""
    canvas = img.size[0]
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(1, 4))):
        x, y = rng.uniform(0, canvas, size=2)
        rx, ry = rng.uniform(0.04, 0.14, size=2) * canvas
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=(*_colour(rng).astype(int).tolist(), 140))
    layer = layer.filter(ImageFilter.GaussianBlur(canvas * 0.03))  # soft: never mistaken for a circle
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0, x1, y1 = rng.uniform(0, canvas, size=4)
        width = max(1, int(canvas * rng.uniform(0.005, 0.015)))
        draw.line([x0, y0, x1, y1], fill=(*_colour(rng).astype(int).tolist(), 200), width=width)
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """A random colour far enough from ``against`` to stay visible; still uniform otherwise."""
    for _ in range(16):
        colour = _colour(rng)
        if np.abs(colour - against).sum() > 150:
            return colour
    return 255.0 - against  # rare: the complement is always far


def make_synthetic_image(label: int, rng: np.random.Generator, size: int, num_classes: int) -> Image.Image:
    """An RGB ``size x size`` image of class ``label``; all nuisance drawn from ``rng``."""
    shape, texture = _class_parts(label, num_classes)
    canvas = size * _SUPERSAMPLE
    bg = _background(rng, canvas)
    img = _distractors(Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)), rng)

    radius = rng.uniform(0.25, 0.60) * canvas / 2
    cx, cy = rng.uniform(radius, canvas - radius, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    local_bg = np.asarray(img, dtype=np.float32)[int(cy), int(cx)]
    fg = _contrasting_colour(rng, local_bg)
    second = _contrasting_colour(rng, fg)  # the texture's other colour; unused for solid fills

    pattern = _texture_mask(texture, canvas, cx, cy, radius, angle)
    fill = np.where(pattern[..., None], fg, second).astype(np.uint8)
    img.paste(Image.fromarray(fill), mask=_shape_mask(shape, canvas, cx, cy, radius, angle))
    return img.resize((size, size), Image.Resampling.BOX)


def sample_key(index: int) -> str:
    """Key of synthetic sample ``index``: zero-padded, no dots or slashes."""
    return f"{index:08d}"


def iter_synthetic(
    num_samples: int, num_classes: int, image_size: int, seed: int
) -> Iterator[tuple[str, int, Image.Image]]:
    """``(key, label, image)`` for samples ``0..num_samples-1``; ``label = index % num_classes``."""
    _check_num_classes(num_classes)
    for index in range(num_samples):
        label = index % num_classes
        rng = np.random.default_rng([seed, index])
        yield sample_key(index), label, make_synthetic_image(label, rng, image_size, num_classes)


def synthetic_jpegs(indices: range, num_classes: int, image_size: int, seed: int, quality: int) -> list[bytes]:
    """JPEG bytes of samples ``indices`` (the unit of work of a generating process)."""
    out = []
    for index in indices:
        img = make_synthetic_image(index % num_classes, np.random.default_rng([seed, index]), image_size, num_classes)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def default_processes(num_samples: int, image_size: int) -> int:
    """Processes worth spawning for a set this size: one per core, none below ~2 s of drawing (a spawn
    costs ~0.2 s; a 64 px image ~3.5 ms to draw and encode, a 256 px one ~36 ms, on one core here)."""
    work_s = num_samples * 3.5e-3 * (image_size / 64) ** 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if work_s < 2.0 else max(1, min(cores, 32))


def iter_synthetic_jpegs(
    num_samples: int,
    num_classes: int,
    image_size: int,
    seed: int,
    quality: int,
    processes: int | None = None,
    chunk: int = 64,
) -> Iterator[tuple[str, int, bytes]]:
    """``(key, label, jpeg bytes)`` of samples ``0..num_samples-1`` in order, drawn by ``processes`` spawned
    processes (None: :func:`default_processes`; 1: here). The bytes do not depend on ``processes``."""
    _check_num_classes(num_classes)
    n = processes if processes is not None else default_processes(num_samples, image_size)
    chunks = [range(lo, min(lo + chunk, num_samples)) for lo in range(0, num_samples, chunk)]
    args = (num_classes, image_size, seed, quality)
    if n <= 1 or len(chunks) <= 1:
        results: Iterator[list[bytes]] = (synthetic_jpegs(c, *args) for c in chunks)
        executor = None
    else:
        from .runtime import spawn_pool

        executor = spawn_pool(min(n, len(chunks)))
        # A window of chunks in flight: memory stays bounded, every process stays busy.
        results = _ordered(executor, chunks, args, window=4 * n)
    try:
        for c, jpegs in zip(chunks, results):
            for index, data in zip(c, jpegs):
                yield sample_key(index), index % num_classes, data
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _ordered(executor, chunks: list[range], args: tuple, window: int) -> Iterator[list[bytes]]:
    from collections import deque

    pending: deque = deque()
    todo = iter(chunks)
    for c in todo:
        pending.append(executor.submit(synthetic_jpegs, c, *args))
        if len(pending) >= window:
            break
    while pending:
        yield pending.popleft().result()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(executor.submit(synthetic_jpegs, nxt, *args))
