"""Probes: real runs end to end (linear, k-NN, fine-tune, CLI), heads that tell signal from noise, and
splits whose report set never reaches the choice of layer and lr."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from pipelines.probe import (
    Classifier,
    ProbeConfig,
    Splits,
    eval_view,
    knn_scores,
    layer_decay_groups,
    linear_scores,
    make_splits,
    probe_features,
    run_probe,
    stratified_split,
    topk_accuracy,
)
from student.sizes import vit_config
from student.vit import VisionTransformer


@pytest.fixture(autouse=True)
def _one_thread():
    """The probe heads are hundreds of tiny ops; on a shared 2-core box, 2 intra-op threads make each
    op wait on a descheduled sibling (measured 60x slower), so these tests run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory):
    """A tiny-test D-iGPT student trained for 4 steps against a random-ViT cache of ``tiny_dataset``."""
    from student.data import DataConfig
    from student.objectives import StudentConfig
    from student.train import OptimConfig, TrainConfig, train
    from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
    from teacher_cache.extract import run_extract
    from teacher_cache.views import AugConfig

    before = torch.get_num_threads()  # module scope: set up before the per-test one-thread fixture
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("probe_run")
    cache = str(root / "cache")
    run_extract(
        ExtractConfig(
            shards=tiny_dataset,
            out=cache,
            teachers=(TeacherConfig("random-vit:32/8"),),
            aug=AugConfig(views=1),
            storage=StorageConfig(dtype="fp16"),
            executor="local",
        ),
        progress=False,
    )
    data = DataConfig(shards=tiny_dataset, cache=cache, img_size=32, batch_size=8, shuffle_buffer=8)
    train(
        TrainConfig(
            data=data,
            out=str(root / "run"),
            student=StudentConfig("tiny-test"),
            steps=4,
            optim=OptimConfig(base_lr=3e-3, warmup=0.25),
            log_every=4,
        ),
        progress=False,
    )
    torch.set_num_threads(before)
    return str(root / "run")


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _check_result(path: str, kind: str, depth: int) -> dict:
    out = _load(path)
    assert out["kind"] == kind and out["n_train"] + out["n_report"] == 48 and out["n_skipped"] == 0
    names = [r["layer"] for r in out["rows"]]
    assert names == ([f"block{i}" for i in range(1, depth + 1)] + ["norm"] if kind != "finetune" else ["norm"])
    assert out["best_layer"] in names
    for r in out["rows"]:
        assert 0.0 <= r["top1"] <= 1.0 and r["top5"] is None  # 4 classes: no top-5
    return out


@pytest.mark.parametrize("kind", ["linear", "knn"])
def test_probe_a_trained_run(kind, trained_run, tiny_dataset):
    result = run_probe(ProbeConfig(shards=tiny_dataset, kind=kind, run=trained_run, epochs=30), progress=False)
    out = _check_result(os.path.join(trained_run, f"probe_{kind}.json"), kind, depth=4)
    assert out["encoder"]["source"] == "trained" and out["top1"] == result.top1
    assert all((r["lr"] is None) == (kind == "knn") for r in out["rows"])
    assert "*" in result.table() and "block4" in result.table()


def test_finetune_one_epoch(trained_run, tiny_dataset, tmp_path):
    out = str(tmp_path / "ft.json")
    result = run_probe(
        ProbeConfig(shards=tiny_dataset, kind="finetune", run=trained_run, finetune_epochs=1, batch_size=16, out=out),
        progress=False,
    )
    saved = _check_result(out, "finetune", depth=4)
    assert result.rows[0].select_top1 is None and result.rows[0].lr == 1e-3  # no choice made: the given lr
    # A stratified quarter of 4 classes x 12 is held out, and top-1 is a count over it.
    assert (result.n_train, result.n_report) == (36, 12)
    assert result.top1 * 12 == pytest.approx(round(result.top1 * 12)) and saved["top1"] == result.top1


def test_finetune_learns_what_a_frozen_head_cannot_miss():
    """Four classes that differ only in colour: fine-tuning a random tiny ViT must separate them on
    held-out views; trained on labels shifted by one, it must predict the shifted labels (top-1 0 on
    the true ones), so it is the training labels that are learned, not something in the setup."""
    from pipelines.probe import finetune_scores

    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], dtype=torch.uint8)
    labels = torch.arange(4).repeat(16)  # 64 views, 16 per class
    noise = torch.randint(-15, 16, (64, 3, 32, 32), generator=g)
    views = (colours[labels][:, :, None, None].int() + noise).clamp(0, 255).to(torch.uint8)
    train, test = slice(0, 48), slice(48, 64)
    enc = VisionTransformer(vit_config("tiny-test"))
    cfg = ProbeConfig(
        shards="-",
        run="-",
        kind="finetune",
        finetune_epochs=6,
        finetune_lr=3e-3,
        batch_size=16,
        warmup=0.0,
        device="cpu",
    )
    accs = {}
    for shift in (0, 1):
        scores = finetune_scores(cfg, enc, views[train], (labels[train] + shift) % 4, views[test], 4, progress=False)
        accs[shift] = topk_accuracy(scores, labels[test], 1)
    assert accs == {0: 1.0, 1: 0.0}, accs


def test_layer_decay_scales_from_the_head_down():
    model = Classifier(VisionTransformer(vit_config("tiny-test")), 3, "mean")
    groups = layer_decay_groups(model, 1e-3, 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    enc = model.encoder
    assert scale[id(model.head.weight)] == scale[id(enc.norm.weight)] == 1.0
    assert scale[id(enc.blocks[3].attn.qkv.weight)] == 0.5 and scale[id(enc.blocks[0].mlp.fc1.weight)] == 0.5**4
    assert scale[id(enc.patch_embed.proj.weight)] == scale[id(enc.cls_token)] == 0.5**5
    assert id(enc.pos_embed) not in scale  # frozen sin-cos positions are not optimised
    no_wd = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(enc.cls_token) in no_wd and id(model.head.bias) in no_wd and id(model.head.weight) not in no_wd
    # ... but the fine-tune trains them (D-iGPT's and MAE's fine-tuning: timm's trainable pos_embed), in layer 0
    from pipelines.finetune import finetune_model

    cfg = ProbeConfig(shards="s", kind="finetune", random_init=True, student="tiny-test", out="o.json")
    ft = finetune_model(cfg, enc, 3)
    groups = layer_decay_groups(ft, 1e-3, 0.05, 0.5)
    pos = [g for g in groups for p in g["params"] if p is ft.encoder.pos_embed]
    assert len(pos) == 1 and pos[0]["lr_scale"] == 0.5**5 and pos[0]["weight_decay"] == 0.0
    assert torch.equal(ft.encoder.pos_embed, enc.pos_embed) and not enc.pos_embed.requires_grad  # a copy


def test_finetune_crop_scale_is_checked_and_reaches_the_crops():
    from dataclasses import replace

    from pipelines.probe import augment

    cfg = ProbeConfig(shards="s", kind="finetune", random_init=True, student="tiny-test", out="o.json")
    assert (cfg.layer_decay, cfg.crop_scale) == (0.75, 0.35)  # the floor's recipe is a trained encoder's
    with pytest.raises(ValueError, match=r"ProbeConfig.crop_scale must be in \(0, 1\]"):
        replace(cfg, crop_scale=0.0)
    views = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(0)
    for v, o in zip(views.float() / 255, augment(views, 16, 1.0)):  # the whole image, maybe mirrored
        assert torch.allclose(o, v, atol=1e-5) or torch.allclose(o, v.flip(-1), atol=1e-5)
    assert not all(torch.allclose(o, v, atol=1e-2) for v, o in zip(views.float() / 255, augment(views, 16, 0.35)))


# ------------------------------------------------------------------------- heads on known features


def _features(n_per_class=24, classes=5, dim=16, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, 2, D]``: layer 0 = class mean + noise (carries the label), layer 1 = pure noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat(n_per_class)
    means = torch.randn(classes, dim, generator=g) * 3
    signal = means[y] + torch.randn(len(y), dim, generator=g)
    noise = torch.randn(len(y), dim, generator=g)
    return torch.stack([signal, noise], dim=1), y


@pytest.mark.parametrize("kind", ["linear", "knn"])
def test_heads_find_signal_and_not_noise(kind):
    feats, y = _features()
    cfg = ProbeConfig(shards="unused", kind=kind, run="unused", epochs=100)
    splits = make_splits(y.numpy(), 0, 0.25, 0.25, seed=0)
    rows = probe_features(cfg, feats, y, splits, ["signal", "noise"], num_classes=5)
    assert rows[0].top1 > 0.95 and rows[0].top5 == 1.0 and rows[0].select_top1 > 0.9
    assert rows[1].top1 < 0.5 and rows[1].select_top1 < 0.5  # chance is 0.2
    assert max(rows, key=lambda r: r.select_top1).layer == "signal"
    # The same features with the labels shuffled carry nothing.
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    rows = probe_features(cfg, feats, shuffled, make_splits(shuffled.numpy(), 0, 0.25, 0.25, 0), ["s", "n"], 5)
    assert all(r.top1 < 0.5 for r in rows)


def test_knn_and_linear_scores_directly():
    feats, y = _features()
    train, test = torch.arange(0, 100), torch.arange(100, 120)
    votes = knn_scores(feats[train, 0], y[train], feats[test, 0], 5, k=500, temperature=0.07)  # k capped
    assert votes.shape == (20, 5) and topk_accuracy(votes, y[test], 1) > 0.95
    lr = torch.tensor([[1e-2, 1e-2], [1e-1, 1e-1]])
    logits = linear_scores(feats[train], y[train], feats[test], 5, lr, epochs=100)
    assert logits.shape == (2, 2, 20, 5)
    assert topk_accuracy(logits[1, 0], y[test], 1) > 0.95 and topk_accuracy(logits[1, 1], y[test], 1) < 0.6
    # One batched fit equals a separate fit of each candidate.
    alone = linear_scores(feats[train][:, 1:], y[train], feats[test][:, 1:], 5, lr[:1, 1:], epochs=100)
    assert torch.allclose(alone[0, 0], logits[0, 1], atol=1e-5)


# ----------------------------------------------------------------------------------------- splits


def test_splits_are_disjoint_stratified_and_deterministic():
    y = np.repeat(np.arange(4), 12)
    s = make_splits(y, 0, 0.25, 0.25, seed=3)
    fit, sel, rep = set(s.fit), set(s.select), set(s.report)
    assert not (fit & sel) and not (fit & rep) and not (sel & rep) and fit | sel | rep == set(range(48))
    assert np.bincount(y[s.report]).tolist() == [3] * 4 and np.bincount(y[s.select]).tolist() == [2] * 4
    again = make_splits(y, 0, 0.25, 0.25, seed=3)
    assert all(np.array_equal(getattr(s, n), getattr(again, n)) for n in ("fit", "select", "report"))
    assert not np.array_equal(make_splits(y, 0, 0.25, 0.25, seed=4).report, s.report)
    # With validation shards the report set is exactly the validation rows.
    v = make_splits(np.concatenate([y, [0, 1, 2, 3]]), 4, 0.25, 0.25, seed=3)
    assert v.report.tolist() == [48, 49, 50, 51] and sorted(v.train.tolist()) == list(range(48))
    kept, held = stratified_split(np.array([0, 0, 1]), 0.5, 0)  # a singleton class is never held out
    assert 2 in kept and len(held) == 1
    with pytest.raises(ValueError, match="select split is empty"):
        make_splits(np.array([0, 1, 0, 1]), 0, 0.25, 0.25, 0)


@pytest.mark.parametrize("kind", ["linear", "knn"])
def test_choice_never_sees_the_report_set(kind):
    """Poison the report rows with NaN: every select score and chosen lr stays the same (the choice
    and the standardisation statistics never touch them); only the report scores change."""
    feats, y = _features(seed=2)
    cfg = ProbeConfig(shards="unused", kind=kind, run="unused", epochs=60)
    splits = make_splits(y.numpy(), 0, 0.25, 0.25, seed=0)
    clean = probe_features(cfg, feats, y, splits, ["a", "b"], 5)
    poisoned = feats.clone()
    poisoned[splits.report] = float("nan")
    dirty = probe_features(cfg, poisoned, y, splits, ["a", "b"], 5)
    assert [(r.select_top1, r.lr) for r in clean] == [(r.select_top1, r.lr) for r in dirty]
    assert clean[0].top1 > 0.95 and dirty[0].top1 != clean[0].top1
    # Structurally, too: the rows of each part are where the splits say.
    assert isinstance(splits, Splits) and not set(splits.report) & set(splits.train)


# ---------------------------------------------------------------------------------- data and CLI


def _folder_with_a_bad_image(root) -> str:
    """Two classes of non-square images (dark vs bright) plus one corrupt file, prepared as shards."""
    from teacher_cache.prepare import ImageFolderConfig, prepare_imagefolder

    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("bright", 210)):
        os.makedirs(root / "tree" / name)
        for i in range(6):
            arr = np.clip(rng.normal(level, 20, (24 + 4 * i, 40, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "PNG")
            (root / "tree" / name / f"{i}.png").write_bytes(buf.getvalue())
    (root / "tree" / "dark" / "broken.png").write_bytes(b"\x89PNG not really")
    prepare_imagefolder(ImageFolderConfig(root=str(root / "tree"), out=str(root / "ds"), shard_size=5))
    return str(root / "ds")


@pytest.mark.parametrize("kind", ["knn", "linear"])
def test_random_floor_skips_bad_rows_and_center_crops(kind, tmp_path):
    ds = _folder_with_a_bad_image(tmp_path)
    out = str(tmp_path / "probe.json")
    result = run_probe(
        ProbeConfig(shards=ds, kind=kind, random_init=True, student="tiny-test", out=out, k=3, epochs=50),
        progress=False,
    )
    assert result.n_skipped == 1 and result.skipped == {"manifest error": 1}
    assert result.n_train + result.n_report == 12 and result.encoder["source"] == "random-init"
    assert _load(out)["encoder"]["student"] == "tiny-test"
    # Dark vs bright is visible to any encoder, even a random one: through the real image path, the
    # labelled signal scores perfectly.
    assert result.top1 == 1.0 and all(r.select_top1 == 1.0 for r in result.rows)
    img = torch.arange(2 * 6, dtype=torch.uint8).reshape(1, 2, 6).expand(3, 2, 6)
    view = eval_view(img, 2)  # a 2x6 image: its centred 2x2 square, unscaled
    assert torch.allclose(view * 255, img[:, :, 2:4].float(), atol=1e-4)


def test_cli(trained_run, tiny_dataset, tmp_path, capsys):
    assert cli.main(["probe", "--run", trained_run, "--shards", tiny_dataset, "--kind", "knn", "--k", "5"]) == 0
    printed = capsys.readouterr().out
    assert "probe knn (trained" in printed and os.path.exists(os.path.join(trained_run, "probe_knn.json"))
    # --run with --random-init: the run's architecture, random weights, its own file.
    assert cli.main(["probe", "--run", trained_run, "--shards", tiny_dataset, "--kind", "knn", "--random-init"]) == 0
    out = _load(os.path.join(trained_run, "probe_knn_random.json"))
    assert out["encoder"]["source"] == "random-init" and out["encoder"]["run"] == trained_run
    for bad, field in (
        (["--kind", "svm"], "kind"),
        (["--k", "0"], ".k "),
        (["--pool", "max"], "pool"),
        (["--lrs", "fast"], "--lrs"),
        (["--random-init", "--student", "tiny-test"], "student"),
    ):
        assert cli.main(["probe", "--run", trained_run, "--shards", tiny_dataset, *bad]) == 2
        assert field in capsys.readouterr().err, bad
    assert cli.main(["probe", "--shards", tiny_dataset, "--random-init", "--student", "tiny-test"]) == 2
    assert "ProbeConfig.out" in capsys.readouterr().err


def test_probes_of_one_encoder_share_its_features(tiny_dataset, tmp_path, monkeypatch):
    """Linear and k-NN in one call extract the features once and score exactly what two separate
    probes score; a fine-tune (which changes the encoder) or configs that differ otherwise are refused."""
    import pipelines.probe as probe_mod
    from pipelines.probe import run_probes

    def cfg(kind: str, name: str, **kw) -> ProbeConfig:
        base = dict(shards=tiny_dataset, kind=kind, random_init=True, student="tiny-test", k=3, epochs=30)
        return ProbeConfig(out=str(tmp_path / f"{name}.json"), **{**base, **kw})

    apart = [run_probe(cfg(k, f"apart_{k}"), progress=False) for k in ("linear", "knn")]
    calls = []
    real = probe_mod.extract_features
    monkeypatch.setattr(probe_mod, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    together = run_probes([cfg("linear", "lin"), cfg("knn", "knn")], progress=False)
    assert len(calls) == 1  # (tiny_dataset has no val_shards: one dataset, one pass)
    for a, b in zip(apart, together):
        assert (a.kind, a.top1, a.best_layer, a.report_correct) == (b.kind, b.top1, b.best_layer, b.report_correct)
    assert _load(str(tmp_path / "knn.json"))["kind"] == "knn"
    with pytest.raises(ValueError, match="may differ only in kind and out"):
        run_probes([cfg("linear", "a"), cfg("knn", "b", seed=1)])
    with pytest.raises(ValueError, match="fine-tune changes the encoder"):
        run_probes([cfg("linear", "a"), cfg("finetune", "b")])
