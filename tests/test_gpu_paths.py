"""The GPU-only paths: checked on CUDA where there is one (``-m gpu``; ``bench/gpu.py`` runs them), and their
CPU halves everywhere (a GPU-made cache verified on a CPU)."""

from __future__ import annotations

import json

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _digpt(attn: str, device: str, size: str = "small-cpu"):
    from student.objectives import StudentConfig, TargetSpec, create_objective

    target = TargetSpec(name="t", dim=64, grid=(4, 4), has_cls=True)
    torch.manual_seed(0)
    return create_objective("digpt", StudentConfig(size=size, attn_impl=attn), target).to(device)


def _batch(device: str, b: int = 8, size: int = 64):
    g = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.rand(b, 3, size, size, generator=g),
        "tokens": torch.randn(b, 16, 64, generator=g),
        "cls": torch.randn(b, 64, generator=g),
        "order_seed": torch.arange(b),
        "labels": torch.zeros(b, dtype=torch.long),
    }
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.gpu
@cuda
def test_digpt_step_with_flex_matches_sdpa_on_gpu():
    """The training step under bf16 autocast: FlexAttention's loss and gradients are SDPA's (same masks)."""
    out = {}
    for attn in ("sdpa", "flex"):
        obj = _digpt(attn, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = obj(_batch("cuda"))
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in obj.parameters() if p.grad is not None])
        out[attn] = (loss.item(), grads)
    (l_s, g_s), (l_f, g_f) = out["sdpa"], out["flex"]
    assert torch.isfinite(torch.tensor([l_s, l_f])).all()
    assert abs(l_s - l_f) <= 2e-2 * abs(l_s), (l_s, l_f)
    assert torch.nn.functional.cosine_similarity(g_s, g_f, dim=0) > 0.99


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["random-vit:vit_base_16", "efficientnet_lite0:224"])
def test_teacher_under_bf16_autocast_is_close_to_float32_on_gpu(name):
    """What ``extract --autocast bf16`` stores against the float32 forward ``verify`` runs on a CPU: above the
    floor verify applies there."""
    from teacher_cache.config import TeacherConfig
    from teacher_cache.extract.pipeline import Forward
    from teacher_cache.teachers import build_teacher
    from teacher_cache.verify import AUTOCAST_FLOOR, token_agreement

    teacher = build_teacher(TeacherConfig(name)).to("cuda")
    s = teacher.spec.input_size
    views = torch.rand(16, 3, s, s, generator=torch.Generator().manual_seed(0))
    fp32, _ = Forward(teacher, torch.device("cuda"))(views)
    bf16, _ = Forward(teacher, torch.device("cuda"), "bf16")(views)
    worst = min(token_agreement(bf16[i].float(), fp32[i].float()) for i in range(len(views)))
    assert worst >= AUTOCAST_FLOOR["bf16"], worst


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_targets_widened_on_gpu_equal_the_cpu(dtype):
    """``DecodeTargets`` on the GPU gives the CPU's float32 targets bit for bit."""
    from student.data import stored_targets, widen_targets
    from teacher_cache.store import decode_block, encode_block

    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(0))
    stored, scale = encode_block(x, dtype)
    t = {"tokens": list(stored)} | ({"token_scale": list(scale)} if scale is not None else {})
    batch = stored_targets(t, dtype, codes=False)
    cpu = widen_targets(dict(batch), None)
    gpu = widen_targets({k: v.cuda() for k, v in batch.items()}, None)
    assert gpu["tokens"].dtype == torch.float32 and torch.equal(gpu["tokens"].cpu(), cpu["tokens"])
    assert torch.equal(cpu["tokens"], decode_block(stored, dtype, scale))  # and both are what the store decodes


def test_a_gpu_autocast_cache_verifies_on_a_cpu_with_the_autocast_floor(tiny_dataset, tmp_path):
    """A cache extracted under CUDA autocast, verified on a machine without a GPU: the teacher is re-run in
    float32 and the floor is the autocast one, and the report says so. (CPU extraction cannot use autocast:
    the cache's provenance is edited to say it was.)"""
    import zarr

    from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
    from teacher_cache.extract import run_extract
    from teacher_cache.verify import AUTOCAST_FLOOR, COSINE_FLOOR, VerifyConfig, run_verify
    from teacher_cache.views import AugConfig

    cache = str(tmp_path / "c")
    run_extract(
        ExtractConfig(
            shards=tiny_dataset,
            out=cache,
            teachers=(TeacherConfig("random-vit:32/8", group="vit"),),
            aug=AugConfig(views=1),
            storage=StorageConfig(dtype="fp16"),
            executor="local",
        ),
        progress=False,
    )
    plain = {c.name: c for c in run_verify(VerifyConfig(tiny_dataset, cache, device="cpu"), progress=False).checks}
    assert plain["alignment"].ok and f"(floor {COSINE_FLOOR['fp16']})" in plain["alignment"].detail
    g = zarr.open_group(cache, mode="r+")["vit"]
    prov = dict(g.attrs["tokenizer"])
    g.attrs["tokenizer"] = {**prov, "autocast": "bf16"}
    report = run_verify(VerifyConfig(tiny_dataset, cache, device="cpu"), progress=False)
    check = {c.name: c for c in report.checks}["alignment"]
    assert check.ok, report.table()
    assert f"(floor {AUTOCAST_FLOOR['bf16']})" in check.detail
    assert "extracted under bf16 autocast, recomputed in float32 on cpu" in check.detail
    json.dumps(prov)  # provenance stays plain JSON
