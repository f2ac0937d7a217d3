"""Storage forms: encode/decode round trips and their error bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_cache.store import decode_block, encode_block, shard_ids, slug


@pytest.mark.parametrize("dtype,tol", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 8e-3), ("int8", 2e-2)])
def test_round_trip_error(dtype, tol):
    x = torch.randn(4, 2, 49, 64, generator=torch.Generator().manual_seed(0)) * 3
    stored, scale = encode_block(x, dtype)
    y = decode_block(stored, dtype, scale)
    rel = ((y - x).norm(dim=-1) / x.norm(dim=-1)).max().item()
    assert rel <= tol + 1e-7
    assert (scale is not None) == (dtype == "int8")
    if dtype == "int8":  # the hard bound of round-to-nearest: half a quantisation step per element
        step = torch.from_numpy(scale).unsqueeze(-1)
        assert ((y - x).abs() <= step / 2 + 1e-6).all()


def test_int8_zero_rows_are_safe():
    stored, scale = encode_block(torch.zeros(2, 3, 8), "int8")
    assert np.isfinite(scale).all() and (decode_block(stored, "int8", scale) == 0).all()


def test_unknown_dtype():
    with pytest.raises(ValueError, match="int4"):
        encode_block(torch.zeros(1, 2), "int4")


def test_shard_ids_unique_and_safe():
    ids = shard_ids(["a/shard-0.tar", "b/shard-0.tar", "s3://bucket/x y.tar"])
    assert len(set(ids.values())) == 3
    assert all("/" not in v and " " not in v for v in ids.values())
    assert slug("openclip:ViT-B-16@openai") == "openclip_ViT-B-16_openai"


def test_feature_targets_stored_raw_and_codes_zstd(tmp_path):
    """``auto``: no compressor for (near-incompressible) float features, zstd for codes and metadata;
    every chain ends in a crc32c checksum."""
    import zarr

    from teacher_cache.store import ShardLayout, create_shard_group

    root = zarr.open_group(str(tmp_path / "c"), mode="w")
    for codes in (False, True):
        lay = ShardLayout(
            rows=4,
            views=2,
            tokens=4,
            dim=8,
            has_cls=not codes,
            codes=codes,
            dtype="fp16",
            chunk_rows=2,
            clevel=3,
            num_codes=16 if codes else 0,
            codec="auto",
        )
        g = create_shard_group(root.require_group(f"t{int(codes)}"), "s", "s.tar", lay)
        names = [type(c).__name__ for c in g["tokens"].compressors]
        assert names == (["BloscCodec", "Crc32cCodec"] if codes else ["Crc32cCodec"]), names
        if codes:
            assert g["tokens"].compressors[0].cname.value == "zstd"
        assert g["seeds"].compressors[0].cname.value == "zstd"
        if not codes:
            assert [type(c).__name__ for c in g["cls"].compressors] == ["Crc32cCodec"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8"])
def test_loader_batch_decode_equals_decode_block_of_the_stack(dtype):
    """The loader's batch of stored rows (read-only rows too), widened as the train stages widen it, is what
    decoding the stacked block gives."""
    from student.data import stored_targets, widen_targets

    stored, scale = encode_block(torch.randn(5, 7, 16, generator=torch.Generator().manual_seed(1)), dtype)
    rows = [stored[i] for i in range(5)]
    rows[1] = rows[1].copy()
    rows[1].setflags(write=False)
    t = {"tokens": rows} if scale is None else {"tokens": rows, "token_scale": [scale[i] for i in range(5)]}
    batch = widen_targets(stored_targets(t, dtype, codes=False), None)
    assert list(batch) == ["tokens"] and torch.equal(batch["tokens"], decode_block(stored, dtype, scale))
