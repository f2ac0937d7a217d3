"""``imagefolder``: copy an ImageNet-style tree (``root/<class>/<image>``) into shards, bytes unchanged.

Labels are class indices in sorted name order. What cannot be a sample (a stray file, a hidden class, a
non-image extension, a symlink loop, a FIFO or device, an unreadable file) is skipped and named, with the
reason, under ``skipped_files`` in dataset.json.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from teacher_cache.dataset import PreparedDataset
from teacher_cache.shards import IMAGE_EXTS, RawSample

from .common import require, write_dataset
from .registry import register_source


@dataclass(frozen=True)
class ImageFolderConfig:
    """Copy an ImageNet-style folder tree into shards."""

    root: str
    """Tree root: ``root/<class>/<image>`` (images may sit in sub-folders of a class)."""
    out: str
    """Dataset directory to write; must not lie inside ``root``."""
    shard_size: int = 1000
    """Samples per tar shard."""

    def __post_init__(self) -> None:
        require(bool(self.root), "root must be a non-empty path")
        require(bool(self.out), "out must be a non-empty path")
        require(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        root, out = os.path.realpath(self.root), os.path.realpath(self.out)
        # An out inside root would be scanned as a class on the next run.
        require(
            os.path.commonpath([root, out]) != root,
            f"out must not be inside root, got out={self.out!r} root={self.root!r}",
        )


@dataclass(frozen=True)
class _FolderFile:
    path: str
    label: int
    key: str
    ext: str


@dataclass
class _FolderListing:
    classes: list[str]
    files: list[_FolderFile] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _folder_key(label: int, rel_path: str, used: set[str]) -> str:
    """``{label:04d}_{path without extension, [A-Za-z0-9_-] only}``, made unique with ``-N``."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(rel_path)[0])
    key = f"{label:04d}_{stem}"
    candidate, n = key, 1
    while candidate in used:
        candidate, n = f"{key}-{n}", n + 1
    used.add(candidate)
    return candidate


def _scan_imagefolder(root: str) -> _FolderListing:
    """Classes (sorted non-hidden sub-directories) and their image files, in sorted order."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    listing = _FolderListing(classes=[e.name for e in entries if e.is_dir() and not e.name.startswith(".")])
    for e in entries:
        if not e.is_dir():
            listing.skipped.append({"path": e.name, "reason": "not in a class directory"})
        elif e.name.startswith("."):
            listing.skipped.append({"path": e.name, "reason": "hidden directory"})
    used: set[str] = set()
    # The root and every class directory: a link back to one of them inside a class is a loop (or
    # would file another class's images under this one).
    tree = {os.path.realpath(root)} | {os.path.realpath(os.path.join(root, c)) for c in listing.classes}
    for label, name in enumerate(listing.classes):
        class_dir = os.path.join(root, name)
        rel_paths = _walk_class_dir(class_dir, name, listing.skipped, tree)
        for rel in rel_paths:
            ext = os.path.splitext(rel)[1][1:].lower()
            if ext not in IMAGE_EXTS:
                listing.skipped.append({"path": f"{name}/{rel}", "reason": f"not an image extension: {ext!r}"})
                continue
            key = _folder_key(label, rel, used)
            listing.files.append(_FolderFile(os.path.join(class_dir, rel), label, key, ext))
    return listing


def _walk_class_dir(class_dir: str, name: str, skipped: list[dict[str, str]], tree: set[str]) -> list[str]:
    """Relative paths of the regular files under ``class_dir``, following links to directories once.

    A directory reached twice (a symlink loop, or two links to one folder) is walked once; a FIFO (it
    would block ``open`` forever), a device (``/dev/zero`` never ends), a socket or a dangling link is
    skipped with its reason instead of being read."""
    rel_paths: list[str] = []
    seen = set(tree)
    for d, dirs, files in os.walk(class_dir, followlinks=True):
        for sub in sorted(dirs):
            real = os.path.realpath(os.path.join(d, sub))
            if real in seen or any(t.startswith(real.rstrip(os.sep) + os.sep) for t in tree):  # also ancestors
                dirs.remove(sub)
                rel = os.path.relpath(os.path.join(d, sub), class_dir).replace(os.sep, "/")
                skipped.append(
                    {"path": f"{name}/{rel}", "reason": "directory already listed (symlink loop or second link to it)"}
                )
            else:
                seen.add(real)
        for f in files:
            path = os.path.join(d, f)
            rel = os.path.relpath(path, class_dir).replace(os.sep, "/")
            try:
                mode = os.stat(path).st_mode  # follows links: what open() would read
            except OSError as e:
                skipped.append({"path": f"{name}/{rel}", "reason": f"unreadable: {e.strerror or e}"})
                continue
            if not stat.S_ISREG(mode):
                kind = (
                    "fifo"
                    if stat.S_ISFIFO(mode)
                    else "device"
                    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "socket"
                    if stat.S_ISSOCK(mode)
                    else "special file"
                )
                skipped.append({"path": f"{name}/{rel}", "reason": f"not a regular file ({kind})"})
                continue
            rel_paths.append(rel)
    return sorted(rel_paths)


def _read_folder_samples(listing: _FolderListing, root: str) -> Iterator[tuple[RawSample, int]]:
    """The listed files as samples; one that cannot be read now (removed or locked since the scan) is
    added to ``listing.skipped`` instead of ending the run."""
    for f in listing.files:
        try:
            with open(f.path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            rel = os.path.relpath(f.path, root).replace(os.sep, "/")
            listing.skipped.append({"path": rel, "reason": f"unreadable: {e.strerror or e}"})
            continue
        yield RawSample(f.key, {f.ext: data, "cls": str(f.label).encode()}), f.label


@register_source("imagefolder", config=ImageFolderConfig)
def prepare_imagefolder(cfg: ImageFolderConfig) -> PreparedDataset:
    """Copy ``root/<class>/<image>`` into shards; labels are class indices in sorted name order.

    Image bytes are copied unchanged with their extension (lower-cased); files with other
    extensions, hidden class directories and files outside class directories are skipped and
    listed under ``skipped_files`` in dataset.json.
    """
    if not os.path.isdir(cfg.root):
        raise FileNotFoundError(f"root {cfg.root!r} is not a directory")
    listing = _scan_imagefolder(cfg.root)
    if not listing.classes:
        raise ValueError(f"root {cfg.root!r} has no class directories (expected root/<class>/<image>)")
    if not listing.files:
        raise ValueError(f"root {cfg.root!r} has no image files ({', '.join(IMAGE_EXTS)})")
    samples = _read_folder_samples(listing, cfg.root)
    return write_dataset(
        "imagefolder", cfg, samples, len(listing.files), listing.classes, skipped_files=listing.skipped
    )
