"""The ``prepare`` stage: turn images into webdataset shards plus a Parquet manifest.

Every source writes one output layout (the *dataset directory*). The sources, one module each, registered
by name (:func:`list_sources`, :func:`get_source`; a new source is one new module, see :mod:`.registry`):

* :mod:`.synthetic`   — generate the class-structured set of :mod:`teacher_cache.synthetic` into shards;
* :mod:`.imagefolder` — copy an ImageNet-style tree (``root/<class>/<image>``) into shards, bytes unchanged;
* :mod:`.wds`         — index existing webdataset shards in place (LAION/img2dataset style), never rewriting;
* :mod:`.parquet`     — Parquet files with an image-bytes column (the Hugging Face datasets layout),
  copied into tar shards with the image bytes unchanged.

The directory holds the shards (not for ``wds``), ``manifest.parquet`` (one row per sample, in shard
then stream order, bad samples included and named) and ``dataset.json`` (what was made, from what,
and the manifest's fingerprint). ``dataset.json`` is written last and removed first on a re-run, so
its presence means the directory is complete. That protocol and the manifest builder every source
shares are :mod:`.common`'s; a source is a config, a sample iterator and a call to it.

Sizes and decodability come from :func:`teacher_cache.images.decode_image`, the decoder every later
stage uses, so a row marked fine here decodes to the same pixels everywhere.

Reading a prepared directory back is :mod:`teacher_cache.dataset`'s job.
"""

from .common import ERR_DUPLICATE, ERR_NO_IMAGE, SHARD_PREFIX, expand_shard_pattern
from .imagefolder import ImageFolderConfig, prepare_imagefolder
from .parquet import ParquetConfig, prepare_parquet
from .registry import Source, get_source, list_sources, register_source
from .synthetic import JPEG_QUALITY, SyntheticConfig, prepare_synthetic
from .wds import ERR_UNKNOWN_LABEL, WDS_EXTRA_COLUMNS, WdsConfig, prepare_wds

__all__ = [
    "ERR_DUPLICATE",
    "ERR_NO_IMAGE",
    "ERR_UNKNOWN_LABEL",
    "JPEG_QUALITY",
    "SHARD_PREFIX",
    "WDS_EXTRA_COLUMNS",
    "ImageFolderConfig",
    "ParquetConfig",
    "Source",
    "SyntheticConfig",
    "WdsConfig",
    "expand_shard_pattern",
    "get_source",
    "list_sources",
    "prepare_imagefolder",
    "prepare_parquet",
    "prepare_synthetic",
    "prepare_wds",
    "register_source",
]
