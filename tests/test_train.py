"""The student trainer on a tiny cache: every objective trains, resume is exact, the cache equals the
online teacher, DDP runs on CPU, exports load in timm, and bad pairings are refused up front."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from student.data import CachedViews, CacheJoin, DataConfig, make_loader
from student.export import create_timm_from_export, export_encoder, load_encoder
from student.objectives import StudentConfig, TargetSpec, create_objective, list_objectives
from student.orders import list_orders
from student.train import OptimConfig, TrainConfig, build_run, online_targets, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tiny_dataset, cache, out, tokenizer="vit", **kw) -> TrainConfig:
    data = dict(shards=tiny_dataset, cache=cache, tokenizer=tokenizer, img_size=32, batch_size=8, shuffle_buffer=16)
    data.update(kw.pop("data", {}))
    kw.setdefault("steps", 12)
    kw.setdefault("optim", OptimConfig(base_lr=3e-3, warmup=0.1))
    return TrainConfig(data=DataConfig(**data), out=str(out), student=StudentConfig("tiny-test"), log_every=1, **kw)


TOKENIZER_FOR = {"digit": "codes", "next-patch": "pixel"}


@pytest.mark.parametrize("objective", list_objectives())
def test_each_objective_learns(objective, tiny_dataset, tiny_cache, tmp_path):
    cfg = _cfg(
        tiny_dataset,
        tiny_cache,
        tmp_path / objective,
        TOKENIZER_FOR.get(objective, "vit"),
        objective=objective,
        steps=36,
    )
    losses = [row["loss"] for row in train(cfg, progress=False).history]
    assert len(losses) == 36 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < first, f"{objective}: loss did not go down ({first:.4f} -> {last:.4f})"
    # tensorboard is a declared dependency: every run writes its events beside metrics.csv
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / objective / "tb"))


# The refusals we mean to make, and the words that explain each; every other combination must train.
# A new objective either trains in every combination or states its refusal here.
NO_ORDER = {"fd", "masked"}  # predict every token at once: an order means nothing to them
CODES_ONLY = {"digit"}  # predicts k-means codes: a feature cache cannot feed it


def _expected_refusal(objective: str, order: str | None, kind: str) -> list[str] | None:
    if order is not None and objective in NO_ORDER:
        return ["has no order", f"drop --order {order}"]
    if kind == "features" and objective in CODES_ONLY:
        return ["discrete tokens", "kmeans:<teacher>"]
    if objective == "digit" and order not in (None, "raster"):  # DiGIT's GPT reads its codes in raster order
        return ["raster order", f"drop --order {order}"]
    return None


@pytest.mark.parametrize("objective", list_objectives())
@pytest.mark.parametrize("order", [None, *list_orders()])
@pytest.mark.parametrize("kind", ["features", "codes"])
def test_every_combination_trains_or_is_refused(objective, order, kind):
    target = TargetSpec("t", 32, (4, 4), kind == "features", "codes" if kind == "codes" else "continuous", 16)
    refusal = _expected_refusal(objective, order, kind)
    if refusal is not None:
        with pytest.raises(ValueError) as e:
            create_objective(objective, StudentConfig("tiny-test"), target, order)
        assert f"objective {objective!r}" in str(e.value) and all(w in str(e.value) for w in refusal), str(e.value)
        return
    obj = create_objective(objective, StudentConfig("tiny-test"), target, order)
    batch = {
        "images": torch.rand(2, 3, 32, 32),
        "tokens": torch.randn(2, 16, 32),
        "order_seed": torch.tensor([1, 2]),
        "codes": torch.randint(0, 16, (2, 16)),
    }
    if target.has_cls:
        batch["cls"] = torch.randn(2, 32)
    loss, _ = obj(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.parameters()), "no gradient reached the model"


def test_resume_replays_the_same_steps(tiny_dataset, tiny_cache, tmp_path):
    """Train 12 steps straight; separately resume from the step-8 checkpoint: steps 9..12 are identical
    (same batches through 2 loader workers, same dropout RNG, same optimizer state)."""
    a = tmp_path / "a"
    kw = dict(steps=12, ckpt_every=4, data={"num_workers": 2})
    ref = train(_cfg(tiny_dataset, tiny_cache, a, **kw), progress=False).history
    b = tmp_path / "b"
    shutil.copytree(a, b)
    ckpts = b / "checkpoints"
    (ckpts / "latest").write_text("step_00000008")
    shutil.rmtree(ckpts / "step_00000012")
    rows = list(csv.DictReader(open(b / "metrics.csv")))[:8]
    with open(b / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    resumed = train(_cfg(tiny_dataset, tiny_cache, b, resume=True, **kw), progress=False).history
    assert [r["step"] for r in resumed] == [9, 10, 11, 12]
    for x, y in zip(ref[8:], resumed):
        assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"], (x, y)


def test_cached_targets_equal_online_teacher(tiny_dataset, tiny_cache, tmp_path):
    for tok in ("vit", "codes"):
        cfg = _cfg(tiny_dataset, tiny_cache, tmp_path / tok, tok, online_teacher=True)
        objective, ds, teacher, _ = build_run(cfg)
        batch = next(iter(make_loader(ds)))
        online = {**batch, **online_targets(teacher, batch)}
        for k in ("tokens", "cls", "codes"):
            if k in batch:
                assert torch.allclose(batch[k], online[k], atol=1e-5), k
        torch.manual_seed(0)
        cached_loss = objective(batch)[0]
        torch.manual_seed(0)
        online_loss = objective(online)[0]
        assert torch.allclose(cached_loss, online_loss, atol=1e-6)


def test_pca_tokenizer_trains_and_equals_online_teacher(tiny_dataset, tiny_cache, tmp_path):
    """K-dim PCA targets train unchanged, and the online teacher (rebuilt with the cache's basis) agrees."""
    cfg = _cfg(tiny_dataset, tiny_cache, tmp_path / "online", "pca", online_teacher=True)
    objective, ds, teacher, join = build_run(cfg)
    assert join.spec["dim"] == 8 and tuple(join.pca_basis.shape) == (9, 32) and join.codebook is None
    assert torch.equal(teacher.basis, join.pca_basis)
    batch = next(iter(make_loader(ds)))
    assert batch["tokens"].shape[-1] == 8 and batch["cls"].shape[-1] == 8
    online = {**batch, **online_targets(teacher, batch)}
    for k in ("tokens", "cls"):
        assert torch.allclose(batch[k], online[k], atol=1e-5), k
    torch.manual_seed(0)
    cached_loss = objective(batch)[0]
    torch.manual_seed(0)
    assert torch.allclose(cached_loss, objective(online)[0], atol=1e-6)
    losses = [
        row["loss"]
        for row in train(
            _cfg(tiny_dataset, tiny_cache, tmp_path / "run", "pca", objective="digpt"), progress=False
        ).history
    ]
    assert len(losses) == 12 and all(np.isfinite(losses))


def test_refuses_mismatched_cache(tiny_dataset, tiny_cache, tmp_path):
    from teacher_cache.prepare import SyntheticConfig, prepare_synthetic

    other = tmp_path / "other"
    prepare_synthetic(
        SyntheticConfig(out=str(other), num_samples=16, num_classes=2, image_size=32, shard_size=8, seed=9)
    )
    with pytest.raises(ValueError, match="other shards"):
        build_run(_cfg(str(other), tiny_cache, tmp_path / "r"))
    with pytest.raises(ValueError, match="several tokenizers"):
        build_run(_cfg(tiny_dataset, tiny_cache, tmp_path / "r", tokenizer=None))
    with pytest.raises(ValueError, match="grid"):  # 4x4 teacher tokens cannot split into 1-patch clusters of a
        create_objective("digpt", StudentConfig("small-cpu", cluster_size=1), TargetSpec("t", 8, (4, 4), False))
    with pytest.raises(ValueError, match="num_workers|worker"):
        CachedViews(DataConfig(tiny_dataset, tiny_cache, "vit", 32, 8, num_workers=4))


def test_export_loads_in_timm(tiny_dataset, tiny_cache, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny_dataset, tiny_cache, run, steps=3), progress=False)
    line = export_encoder(str(run), str(tmp_path / "enc.safetensors"))
    assert "timm.create_model" in line
    model = create_timm_from_export(str(tmp_path / "enc.safetensors"))  # strict load inside timm
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model.forward_features(x), load_encoder(str(run))(x), atol=1e-6)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tiny_dataset, tiny_cache, tmp_path):
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        os.path.join(REPO, "cli.py"),
        "train",
        "--shards",
        tiny_dataset,
        "--cache",
        tiny_cache,
        "--tokenizer",
        "vit",
        "--out",
        str(run),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--log-every",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "latest").exists()


def test_target_norm_standardises_with_cache_statistics(tiny_dataset, tiny_cache, tmp_path):
    """Per-channel statistics come from the cache, deterministically; standardised targets have zero
    mean and unit variance per channel on the estimation sample; the run keeps a copy for --resume."""
    from student.targets import TargetNorm, estimate_target_norm
    from student.train import target_norm_for

    cfg = _cfg(tiny_dataset, tiny_cache, tmp_path / "r", target_norm="channel")
    join = CacheJoin(cfg.data)
    a, b = estimate_target_norm(join), estimate_target_norm(join)
    assert torch.equal(a.token_mean, b.token_mean) and torch.equal(a.token_std, b.token_std)
    assert a.token_mean.shape == (join.spec["dim"],) and (a.token_std > 0).all()
    # the statistics are the moments of every valid stored token
    toks = []
    for shard in join.ds.shards:
        g = join.group(shard)
        toks.append(np.asarray(g["tokens"][:])[join.valid[shard]])
    x = torch.from_numpy(np.concatenate(toks)).reshape(-1, join.spec["dim"]).double()
    z = a({"tokens": x.float()})["tokens"].double()
    assert z.mean(0).abs().max() < 1e-3 and (z.std(0, unbiased=False) - 1).abs().max() < 1e-3
    assert a({"tokens": x.float(), "cls": torch.zeros(2, join.spec["dim"])})["cls"].shape == (2, join.spec["dim"])
    # a run saves what it trained with, and a resume uses that copy
    train(_cfg(tiny_dataset, tiny_cache, tmp_path / "r", steps=2, target_norm="channel"), progress=False)
    saved = TargetNorm.load(str(tmp_path / "r"))
    assert torch.equal(saved.token_mean, a.token_mean)
    cfg_json = json.load(open(tmp_path / "r" / "config.json"))
    assert cfg_json["target_norm"]["kind"] == "channel"
    resumed = target_norm_for(_cfg(tiny_dataset, tiny_cache, tmp_path / "r", resume=True, target_norm="channel"), join)
    assert torch.equal(resumed.token_std, a.token_std)
    # 'none' (the default: D-iGPT as published) and code targets: nothing to standardise
    assert _cfg(tiny_dataset, tiny_cache, tmp_path / "d").target_norm == "none"
    assert target_norm_for(_cfg(tiny_dataset, tiny_cache, tmp_path / "n", target_norm="none"), join) is None
    codes = _cfg(tiny_dataset, tiny_cache, tmp_path / "c", tokenizer="codes")
    assert target_norm_for(codes, CacheJoin(codes.data)) is None
    with pytest.raises(ValueError, match="target_norm"):
        _cfg(tiny_dataset, tiny_cache, tmp_path / "x", target_norm="zscore")


def test_token_norm_standardises_each_token_and_trains(tiny_dataset, tiny_cache, tmp_path):
    """``--target-norm token`` (MAE's norm-pix): each target token has zero mean and unit variance over its
    own channels, the raw tokens stay in the batch for the orders, and a run trains and records it."""
    from student.targets import TokenNorm
    from student.train import target_norm_for

    cfg = _cfg(tiny_dataset, tiny_cache, tmp_path / "t", target_norm="token", steps=2)
    norm = target_norm_for(cfg, CacheJoin(cfg.data))
    assert isinstance(norm, TokenNorm)
    x = 5 + 3 * torch.randn(4, 16, 32)
    out = norm({"tokens": x, "cls": 2 * torch.randn(4, 32) - 1})
    assert torch.equal(out["raw_tokens"], x)
    assert out["tokens"].mean(-1).abs().max() < 1e-4
    assert (out["tokens"].var(-1, unbiased=False) - 1).abs().max() < 1e-3
    assert out["cls"].mean(-1).abs().max() < 1e-4
    result = train(cfg, progress=False)
    assert np.isfinite(result.final_loss)
    assert json.load(open(tmp_path / "t" / "config.json"))["target_norm"]["kind"] == "token"
    assert not (tmp_path / "t" / "target_norm.safetensors").exists()  # nothing to save: stateless


def _views_cfg(tiny_dataset, tiny_cache, **kw) -> DataConfig:
    return DataConfig(
        shards=tiny_dataset, cache=tiny_cache, tokenizer="vit", img_size=32, batch_size=8, shuffle_buffer=16, **kw
    )


def test_max_views_trains_on_the_first_stored_views_only(tiny_dataset, tiny_cache):
    """``--max-views 1`` on a 2-view cache: every sample, every epoch, is its stored view 0 (seed and box)."""
    join = CacheJoin(_views_cfg(tiny_dataset, tiny_cache))
    assert join.aug.views == 2
    shard = join.ds.shards[0]
    seeds, boxes, _ = join.plan(shard)
    one = CachedViews(_views_cfg(tiny_dataset, tiny_cache, max_views=1), join=join)
    both = CachedViews(_views_cfg(tiny_dataset, tiny_cache), join=join)
    seen_both = set()
    for epoch in range(3):
        one.set_epoch(epoch)
        both.set_epoch(epoch)
        samples = list(one._shard_samples(shard))
        assert samples and {s["view"] for s in samples} == {0}
        assert all(
            s["seed"] == int(seeds[s["row"], 0]) and tuple(s["box"]) == tuple(boxes[s["row"], 0]) for s in samples
        )
        seen_both |= {s["view"] for s in both._shard_samples(shard)}
    assert seen_both == {0, 1}  # without the limit both stored views are drawn
    with pytest.raises(ValueError, match="stores 2 per sample"):
        CachedViews(_views_cfg(tiny_dataset, tiny_cache, max_views=3), join=join)
    with pytest.raises(ValueError, match="max_views must be >= 1"):
        _views_cfg(tiny_dataset, tiny_cache, max_views=0)


def test_fresh_views_need_the_online_teacher_and_are_new_each_epoch(tiny_dataset, tiny_cache, tmp_path):
    """Invariant 1: a view the cache never stored has no cached targets, so fresh views are refused without
    the online teacher; with it, each epoch draws new crops that re-derive from their seeds and train."""
    join = CacheJoin(_views_cfg(tiny_dataset, tiny_cache))
    with pytest.raises(ValueError, match="--online-teacher"):
        CachedViews(_views_cfg(tiny_dataset, tiny_cache, fresh_views=True), join=join)
    ds = CachedViews(_views_cfg(tiny_dataset, tiny_cache, fresh_views=True), join=join, teacher_size=32)
    shard = join.ds.shards[0]
    _, boxes, flips = join.plan(shard)
    stored = {(i, tuple(boxes[i, v]), bool(flips[i, v])) for i in range(len(boxes)) for v in range(2)}
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append({s["row"]: (s["row"], tuple(s["box"]), s["flip"]) for s in ds._shard_samples(shard)})
    rows = sorted(epochs[0])
    assert rows and all(s["view"] == -1 for s in ds._shard_samples(shard))
    assert sum(epochs[0][i] != epochs[1][i] for i in rows) > len(rows) // 2  # new crops each epoch
    assert sum(epochs[0][i] in stored for i in rows) < len(rows) // 2  # not the stored ones
    batch = next(iter(make_loader(ds)))  # the collate re-derives every box from its seed and checks it
    assert batch["teacher_images"].shape == batch["images"].shape
    assert "tokens" not in batch and "cls" not in batch  # nothing read from the cache: the teacher makes them
    cfg = _cfg(tiny_dataset, tiny_cache, tmp_path / "fresh", online_teacher=True, steps=4, data={"fresh_views": True})
    losses = [r["loss"] for r in train(cfg, progress=False).history]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert json.load(open(tmp_path / "fresh" / "config.json"))["train"]["data"]["fresh_views"] is True
    with pytest.raises(ValueError, match="--online-teacher"):
        train(_cfg(tiny_dataset, tiny_cache, tmp_path / "cached", steps=1, data={"fresh_views": True}), progress=False)


@pytest.fixture(scope="module")
def dtype_cache(tiny_dataset, tmp_path_factory):
    """One tokenizer group per stored dtype that is not fp32 (tiny_cache holds fp32 and codes)."""
    from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
    from teacher_cache.extract import run_extract
    from teacher_cache.views import AugConfig

    out = {}
    for dtype in ("fp16", "bf16", "int8"):
        out[dtype] = str(tmp_path_factory.mktemp("dt") / dtype)
        run_extract(
            ExtractConfig(
                shards=tiny_dataset,
                out=out[dtype],
                teachers=(TeacherConfig("random-vit:32/8", group="vit"),),
                aug=AugConfig(views=2),
                storage=StorageConfig(dtype=dtype),
                executor="local",
            ),
            progress=False,
        )
    return out


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8", "codes"])
def test_targets_decoded_on_the_device_equal_the_loaders(dtype, tiny_dataset, tiny_cache, dtype_cache, tmp_path):
    """`digpt train` ships stored targets (half the bytes for fp16) and decodes them in its stages: the
    batches the objective sees are bit-identical to the ones a decoding loader gives."""
    from student.stages import DecodeTargets, build_stages

    cache = tiny_cache if dtype in ("fp32", "codes") else dtype_cache[dtype]
    cfg = _cfg(tiny_dataset, cache, tmp_path / "r", "codes" if dtype == "codes" else "vit")
    _, decoded, _, join = build_run(cfg)
    _, stored, _, _ = build_run(cfg, decode_targets=False)
    stages = build_stages(cfg, join, "cpu")
    assert isinstance(stages.stages[1], DecodeTargets)
    raw = next(iter(make_loader(stored)))
    if dtype == "codes":
        assert "tokens" not in raw and raw["codes"].dtype == torch.int64
    else:
        want = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}[dtype]
        assert raw["tokens"].dtype == want and raw["cls"].dtype == want
        assert ("token_scale" in raw) == (dtype == "int8")
    for a, b in zip(make_loader(decoded), make_loader(stored)):
        a, b = stages(a), stages(b)
        assert a.keys() == b.keys() and "token_scale" not in b
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_accumulation_all_reduces_once_per_optimizer_step(tmp_path):
    """DDP with gradient accumulation: ``micro_step`` skips the all-reduce on all but the last micro-batch
    (``no_sync``) and leaves the same accumulated gradients as a plain module."""
    import contextlib

    import torch.distributed as dist

    from student.checkpoint import TrainState
    from student.train import micro_step

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, batch):
            loss = self.lin(batch["x"]).pow(2).mean()
            return loss, {"loss": loss.detach()}

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain, wrapped = Toy(), Toy()
        wrapped.load_state_dict(plain.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(wrapped)
        calls = []

        def count(state, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, count)
        batches = [{"x": torch.randn(5, 4)} for _ in range(4)]
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            micro_step(plain, b, contextlib.nullcontext(), 4, last, TrainState())
            micro_step(ddp, b, contextlib.nullcontext(), 4, last, TrainState())
            assert len(calls) == (1 if last else 0), i  # one bucket, reduced once, at the last micro-batch
        for p, q in zip(plain.parameters(), wrapped.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)
    finally:
        dist.destroy_process_group()
