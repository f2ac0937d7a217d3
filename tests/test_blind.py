"""The input-blind baseline: exact against a model that outputs the per-position statistic, optimal among
image-free predictors, logged by every run and read back on resume."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from torch import nn

from student.blind import BlindStats, estimate_blind_stats, image_share
from student.data import CachedViews, CacheJoin, DataConfig, make_loader
from student.objectives import StudentConfig, TargetSpec, create_objective
from student.targets import estimate_target_norm
from student.train import OptimConfig, TrainConfig, train

TOKENIZER_FOR = {"digit": "codes", "next-patch": "pixel"}


def _batches(tiny_dataset, tiny_cache, tokenizer: str, n: int = 3) -> tuple[list[dict], TargetSpec]:
    cfg = DataConfig(tiny_dataset, tiny_cache, tokenizer, 32, 8, shuffle_buffer=16)
    join = CacheJoin(cfg)
    norm = None if join.info.codes else estimate_target_norm(join)
    ds = CachedViews(cfg, join=join)
    ds.set_epoch(0)
    out = []
    for b in make_loader(ds):
        out.append(norm(b) if norm is not None else b)
        if len(out) == n:
            break
    return out, TargetSpec.from_spec(join.spec)


class _Const(nn.Module):
    """Stands in for a prediction head: ignores its input, returns a fixed per-position prediction."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _blind_model(objective, stats: BlindStats):
    """Make ``objective``'s own forward pass predict the per-position statistic at every row it scores,
    by replacing only its prediction heads: the index bookkeeping stays the objective's own."""
    name = objective.registry_name
    if name in ("fd", "masked"):

        def tokens(feats):
            return stats.token_unit_mean.expand(feats.shape[0], -1, -1)

        objective.head = _Const(tokens)
        if objective.cls_head is not None:
            objective.cls_head = _Const(lambda f: stats.cls_unit_mean.expand(f.shape[0], -1))
        return
    if name == "digit":  # the code GPT: its head scores the next code at each position
        objective.encoder.head = _Const(lambda h: stats.code_logp.expand(h.shape[0], -1, -1))
        return
    codes = getattr(objective, "codes", False)
    per_pos = stats.code_logp if codes else (stats.token_mean if name == "next-patch" else stats.token_unit_mean)
    for dec in (objective.model.gen, objective.model.dis):
        if dec is None:
            continue

        # The model reads ``features`` then ``head`` (not ``forward``): features return the statistic itself
        # and the head passes it through.
        def features(layers, targets, self_mask, cross_mask, with_cls, per_pos=per_pos):
            pred = per_pos[targets]  # student grid == teacher grid here: no resampling in between
            if with_cls:
                pred = torch.cat([stats.cls_unit_mean.expand(targets.shape[0], 1, -1), pred], dim=1)
            return pred

        dec.features = features
        dec.head = nn.Identity()


@pytest.mark.parametrize("objective", ["digpt", "gen", "fd", "masked", "next-patch", "digit"])
def test_blind_loss_equals_a_model_that_outputs_the_position_mean(objective, tiny_dataset, tiny_cache):
    tokenizer = TOKENIZER_FOR.get(objective, "pixel")  # pixel: 4x4 targets on the tiny student's 4x4 grid
    batches, spec = _batches(tiny_dataset, tiny_cache, tokenizer)
    obj = create_objective(objective, StudentConfig("tiny-test"), spec)
    stats = estimate_blind_stats(batches, spec.num_codes)
    blind = torch.stack([obj.blind_loss(b, stats) for b in batches])
    _blind_model(obj, stats)
    with torch.no_grad():
        model = torch.stack([obj(b)[0] for b in batches])
    torch.testing.assert_close(blind, model, rtol=1e-5, atol=1e-6)
    assert (blind > 0).all()


def test_blind_predictor_is_the_best_image_free_constant(tiny_dataset, tiny_cache):
    """In sample, any other per-position constant scores worse under D-iGPT's loss."""
    batches, spec = _batches(tiny_dataset, tiny_cache, "vit")
    obj = create_objective("digpt", StudentConfig("tiny-test"), spec)
    stats = estimate_blind_stats(batches)
    best = sum(float(obj.blind_loss(b, stats)) for b in batches)
    g = torch.Generator().manual_seed(0)
    for scale in (0.05, 0.3):
        other = BlindStats(
            token_unit_mean=stats.token_unit_mean + scale * torch.randn(stats.token_unit_mean.shape, generator=g),
            cls_unit_mean=stats.cls_unit_mean + scale * torch.randn(stats.cls_unit_mean.shape, generator=g),
        )
        assert sum(float(obj.blind_loss(b, other)) for b in batches) > best


def test_codes_blind_loss_is_the_position_entropy(tiny_dataset, tiny_cache):
    batches, spec = _batches(tiny_dataset, tiny_cache, "codes")
    stats = estimate_blind_stats(batches, spec.num_codes)
    p = stats.code_logp.exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]))
    # smoothed frequencies: every code keeps some mass, the observed ones the most
    counts = torch.zeros_like(p)
    for b in batches:
        counts += torch.nn.functional.one_hot(b["codes"].long(), spec.num_codes).sum(0).float()
    assert (p.argmax(-1) == counts.argmax(-1)).float().mean() > 0.9


def test_every_run_logs_its_blind_baseline_and_resume_reads_it_back(tiny_dataset, tiny_cache, tmp_path):
    data = DataConfig(tiny_dataset, tiny_cache, "vit", 32, 8, shuffle_buffer=16)
    kw = dict(
        data=data,
        student=StudentConfig("tiny-test"),
        optim=OptimConfig(base_lr=3e-3, warmup=0.1),
        log_every=1,
        blind_batches=4,
    )
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), steps=6, **kw), progress=False)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    blind = json.loads((run / "blind.json").read_text())["blind_loss"]
    assert blind > 0 and all(float(r["blind_loss"]) == blind for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["blind_loss"] == blind and summary["first_loss"] == float(rows[0]["loss"])
    assert "blind_verdict" in summary and "below_blind" in summary
    # resume: same baseline, read back (not re-measured on other batches)
    (run / "blind.json").write_text(json.dumps({"blind_loss": 1.2345, "batches": 4}))
    train(TrainConfig(out=str(run), steps=8, resume=True, **kw), progress=False)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["blind_loss"]) for r in rows[-2:]] == [1.2345, 1.2345]
    off = tmp_path / "off"
    train(TrainConfig(out=str(off), steps=2, **{**kw, "blind_batches": 0}), progress=False)
    assert not os.path.exists(off / "blind.json")
    with pytest.raises(ValueError, match="blind_batches"):
        TrainConfig(out=str(off), steps=2, **{**kw, "blind_batches": 1})


def test_image_share():
    assert image_share(4.0, 2.9, 3.0) == pytest.approx(0.1 / 1.1)
    assert image_share(4.0, 4.1, 3.0) is None
