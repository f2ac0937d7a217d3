"""Fidelity to the published methods: SemAIM's order reads the teacher's raw tokens (and a global token in
their space), DiGIT's model reads codes and is probed on its own features, and an exported student tells
timm how it is fed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.probe import ProbeConfig, eval_view, run_probe
from student.code_gpt import load_code_probe_encoder
from student.data import DataConfig, make_loader
from student.export import create_timm_from_export, export_encoder, load_encoder
from student.objectives import StudentConfig, TargetSpec, create_objective
from student.orders import get_order
from student.targets import TargetNorm
from student.train import OptimConfig, TrainConfig, build_run, train


def _cfg(tiny_dataset, cache, out, tokenizer, **kw) -> TrainConfig:
    data = DataConfig(
        shards=tiny_dataset, cache=cache, tokenizer=tokenizer, img_size=32, batch_size=8, shuffle_buffer=16
    )
    return TrainConfig(
        data=data,
        out=str(out),
        student=StudentConfig("tiny-test"),
        log_every=1,
        optim=OptimConfig(base_lr=3e-3, warmup=0.1),
        **kw,
    )


# ------------------------------------------------------------------------------------ SemAIM's order


def _order_batch(seed: int = 0, b: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.rand(b, 3, 32, 32, generator=g),
        "order_seed": torch.arange(b),
        "tokens": torch.randn(b, 16, 32, generator=g) + 3.0 * torch.randn(32, generator=g),
        "cls": torch.randn(b, 32, generator=g),
    }


def _norm(seed: int) -> TargetNorm:
    g = torch.Generator().manual_seed(seed)
    std = lambda: torch.exp(2 * torch.randn(32, generator=g))  # noqa: E731  (channel spreads 0.02x .. 50x)
    return TargetNorm(3 * torch.randn(32, generator=g), std(), torch.randn(32, generator=g), std())


def test_similarity_order_reads_raw_tokens_not_normalisation_statistics():
    obj = create_objective("digpt", StudentConfig("tiny-test"), TargetSpec("t", 32, (4, 4), True), "similarity")
    batch = _order_batch()
    raw = obj.cluster_order(batch)
    # The trainer standardises the batch before the objective sees it: two runs whose caches gave
    # different statistics order every sample alike, as the raw tokens do.
    for seed in (1, 2):
        normed = _norm(seed)(batch)
        assert torch.equal(obj.cluster_order(normed), raw)
        obj(normed)[0].backward()  # and the loss still trains on the standardised targets
    # Teeth: the order read from the standardised tokens (what the trainer used to hand it) moves with the
    # statistics.
    similarity = get_order("similarity")
    stripped = [{k: v for k, v in _norm(s)(batch).items() if not k.startswith("raw_")} for s in (1, 2)]
    stale = [similarity(b, 4, obj.model.cluster_targets) for b in stripped]
    assert not torch.equal(stale[0], stale[1])
    # A change of the raw tokens does move it: make cluster 3 of sample 0 the one most like the global token.
    moved = dict(batch)
    moved["tokens"] = batch["tokens"].clone()
    moved["tokens"][0, obj.model.cluster_targets[3]] = 5 * batch["cls"][0]
    new = obj.cluster_order(_norm(1)(moved))
    assert new[0, 0] == 3 and not torch.equal(new[0], raw[0]) and torch.equal(new[1:], raw[1:])


def test_similarity_order_uses_a_global_token_in_the_tokens_space():
    base = {"name": "t", "dim": 32, "grid": [4, 4], "has_cls": True}
    effnet = {**base, "name": "efficientnet_lite0:128", "layer": None, "extra": {"arch": "efficientnet-lite0"}}
    assert not TargetSpec.from_spec(effnet).cls_in_token_space
    assert not TargetSpec.from_spec(
        {
            **effnet,
            "name": "pca:efficientnet_lite0",
            "extra": {"arch": "efficientnet-lite0", "base": "efficientnet_lite0"},
        }
    ).cls_in_token_space
    assert TargetSpec.from_spec({**effnet, "layer": 4}).cls_in_token_space  # a stage's pool is its tokens' mean
    assert TargetSpec.from_spec({**base, "extra": {"depth": 2}}).cls_in_token_space  # ViT: same layer, same proj
    batch = _order_batch(3)
    other_cls = {**batch, "cls": torch.randn(8, 32, generator=torch.Generator().manual_seed(9))}
    no_cls = {k: v for k, v in batch.items() if k != "cls"}
    obj = create_objective("digpt", StudentConfig("tiny-test"), TargetSpec.from_spec(effnet), "similarity")
    # EfficientNet: the pooled post-ReLU6 vector plays no part; the mean patch token is the global token.
    assert torch.equal(obj.cluster_order(batch), obj.cluster_order(other_cls))
    assert torch.equal(obj.cluster_order(batch), obj.cluster_order(no_cls))
    vit = create_objective("digpt", StudentConfig("tiny-test"), TargetSpec.from_spec(base), "similarity")
    assert not torch.equal(vit.cluster_order(batch), vit.cluster_order(other_cls))


def test_efficientnet_global_token_is_in_another_space():
    """The real teacher: its spec is recognised, and the reason holds — its pooled token barely points
    along its own patch tokens, while their mean does."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from teacher_cache.teachers import create_teacher

    teacher = create_teacher("efficientnet_lite0:128")
    assert not TargetSpec.from_spec(teacher.spec.to_json()).cls_in_token_space
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g), size=128, mode="bilinear")
    out = teacher(x)
    cos = torch.nn.functional.cosine_similarity
    to_cls = cos(out.tokens, out.cls[:, None], dim=-1).mean()
    to_mean = cos(out.tokens, out.tokens.mean(1, keepdim=True), dim=-1).mean()
    assert to_cls < 0.4 and to_mean > 0.8, (to_cls, to_mean)


# ------------------------------------------------------------------------------------------ DiGIT


def _markov_codes(n: int, k: int = 16, length: int = 16, stay: float = 0.9, seed: int = 0) -> torch.Tensor:
    """Sequences of a Markov chain: the next code is ``perm[code]`` with probability ``stay``, else uniform.
    Its stationary (unigram) distribution is uniform, so unigram entropy is ~log k."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(123))
    codes = torch.zeros(n, length, dtype=torch.long)
    codes[:, 0] = torch.randint(0, k, (n,), generator=g)
    for t in range(1, length):
        jump = torch.rand(n, generator=g) > stay
        codes[:, t] = torch.where(jump, torch.randint(0, k, (n,), generator=g), perm[codes[:, t - 1]])
    return codes


def test_digit_reads_codes_and_beats_unigram_entropy():
    k = 16
    target = TargetSpec("kmeans:t", 1, (4, 4), False, "codes", k)
    torch.manual_seed(0)
    obj = create_objective("digit", StudentConfig("tiny-test"), target)
    # Causal over codes: changing code t changes the predictions after it and none at or before it.
    codes = _markov_codes(2, seed=5)
    with torch.no_grad():
        a = obj.encoder(codes)
        changed = codes.clone()
        changed[:, 7] = (changed[:, 7] + 1) % k
        b = obj.encoder(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert (a[:, 8] - b[:, 8]).abs().max() > 1e-4
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-2)
    for step in range(30):
        loss, _ = obj({"codes": _markov_codes(16, seed=step)})  # no images: the model reads codes only
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = _markov_codes(512, seed=10_000)
    freq = torch.bincount(held.flatten(), minlength=k).double() / held.numel()
    unigram = float(-(freq * freq.log()).sum())
    with torch.no_grad():
        loss, metrics = obj({"codes": held})
    assert unigram > 0.95 * math.log(k)
    assert loss.item() < 0.5 * unigram, (loss.item(), unigram)  # the chain's own entropy is ~0.7 nats


def test_digit_run_is_probed_on_the_codes_of_its_tokenizer(tiny_dataset, tiny_cache, tmp_path):
    run = tmp_path / "digit"
    losses = [
        r["loss"]
        for r in train(_cfg(tiny_dataset, tiny_cache, run, "codes", objective="digit", steps=4), progress=False).history
    ]
    assert len(losses) == 4 and np.isfinite(losses).all()
    enc = load_code_probe_encoder(str(run))
    # The probe's tokenizer is the cache's: replayed training views give exactly the stored codes.
    cfg = _cfg(tiny_dataset, tiny_cache, tmp_path / "online", "codes", objective="digit", steps=1, online_teacher=True)
    _, ds, _, _ = build_run(cfg)
    batch = next(iter(make_loader(ds)))
    assert torch.equal(enc.codes(batch["teacher_images"]), batch["codes"])
    with torch.no_grad():
        layers = enc.forward_intermediates(batch["teacher_images"])
    assert len(layers) == 4 and layers[0].shape == (8, 16, 32)
    for random_init in (False, True):
        res = run_probe(
            ProbeConfig(
                shards=tiny_dataset,
                run=str(run),
                random_init=random_init,
                epochs=20,
                out=str(tmp_path / f"p{random_init}.json"),
            ),
            progress=False,
        )
        assert res.encoder["config"]["input"].startswith("codes of tokenizer kmeans:")
        assert [r.layer for r in res.rows] == ["block1", "block2", "block3", "block4", "norm"]
        assert 0.0 <= res.top1 <= 1.0
    with pytest.raises(ValueError, match="linear or knn"):
        run_probe(ProbeConfig(shards=tiny_dataset, run=str(run), kind="finetune"), progress=False)
    with pytest.raises(ValueError, match="code model"):
        export_encoder(str(run), str(tmp_path / "x.safetensors"))


# ------------------------------------------------------------------------------------------- export


def test_export_tells_timm_how_the_student_is_fed(tiny_dataset, tiny_cache, tmp_path):
    import timm
    from timm.data import create_transform, resolve_data_config

    run = tmp_path / "run"
    train(_cfg(tiny_dataset, tiny_cache, run, "vit", steps=2), progress=False)
    path = str(tmp_path / "enc.safetensors")
    line = export_encoder(str(run), path)
    model = eval(line, {"timm": timm}).eval()  # the printed line, as a user pastes it
    data = resolve_data_config({}, model=model)
    assert data == {
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    assert resolve_data_config({}, model=create_timm_from_export(path)) == data
    # Teeth: the base model's own config is what timm answered before (224 px, mean/std 0.5).
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    assert resolve_data_config({}, model=base)["input_size"][1] == 224
    tf, enc = create_transform(**data), load_encoder(str(run))
    rng = np.random.default_rng(0)
    for h, w in ((96, 96), (96, 128)):
        img = np.clip(np.linspace(0, 255, w)[None, :, None] + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        ref = eval_view(torch.from_numpy(img).permute(2, 0, 1).contiguous(), 32)  # the probe's (= trainer's) pixels
        x = tf(Image.fromarray(img))
        with torch.no_grad():
            f_timm, f_ref = model.forward_features(x[None]), enc(ref[None])
        cos = torch.nn.functional.cosine_similarity(f_timm[:, 1:].mean(1), f_ref[:, 1:].mean(1)).item()
        if h == w:  # PIL's uint8 output is the only difference: within one grey level
            assert (x - ref).abs().max() <= 1 / 255 + 1e-6
            torch.testing.assert_close(tf(torch.from_numpy(img).permute(2, 0, 1) / 255.0), ref, atol=0, rtol=0)
            assert cos > 0.99999
        else:  # timm resizes then crops, the probe crops then resizes: the crop's border pixels differ
            assert (x - ref).abs().mean() < 0.01
            assert cos > 0.999
