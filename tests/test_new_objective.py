"""A new objective is one file plus a test (README "Extending: a new objective"): this module defines one —
cosine distillation of the visible tokens, with a knob of its own — registers it, and trains it through the
real ``train()``. Nothing else in the code base learns of it: the loop, the stages, the logger, config.json
and ``--resume`` all take it as they are.

The registration happens in a fixture (and is undone after), not at import: the other test modules
parametrise over ``list_objectives()`` and would otherwise pick this toy up mid-session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from student.blind import BlindStats
from student.data import DataConfig
from student.digpt_model import gather_targets, loss_cos
from student.objectives import Objective, StudentConfig, TargetSpec, base, list_objectives, register_objective
from student.objectives.distill import MaskedConfig
from student.train import OptimConfig, TrainConfig, train
from student.vit import VisionTransformer


@dataclass(frozen=True)
class VisibleCosConfig:
    """The knobs of ``visible-cos``."""

    keep_ratio: float = 0.5
    """Fraction of patches the encoder sees; the loss is on the teacher tokens at those positions."""

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")


class VisibleCos(Objective):
    """Encode a random ``keep_ratio`` of the patches; predict the teacher's token at each (``2 - 2 cos``)."""

    def __init__(self, student: StudentConfig, target: TargetSpec, order: str | None, knobs: VisibleCosConfig):
        super().__init__()
        self.encoder = VisionTransformer(student.encoder_config(), student.attn_impl)
        grid = self.encoder.cfg.grid_size
        if tuple(target.grid) != (grid, grid):
            raise ValueError(f"objective 'visible-cos' needs the teacher grid {target.grid} to be ({grid}, {grid})")
        self.keep = max(1, round(knobs.keep_ratio * self.encoder.cfg.num_patches))
        self.head = nn.Linear(self.encoder.cfg.embed_dim, target.dim)

    def visible(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, keep]`` patch indices, a pure function of each sample's seed (so ``--resume`` replays)."""
        n = self.encoder.cfg.num_patches
        rows = [
            torch.randperm(n, generator=torch.Generator().manual_seed(s))[: self.keep]
            for s in batch["order_seed"].tolist()
        ]
        return torch.stack(rows).to(batch["images"].device)

    def forward(self, batch):
        index = self.visible(batch)
        feats, _ = self.encoder.forward_features(batch["images"], order=index)
        loss = loss_cos(self.head(feats[:, 1:]), gather_targets(batch["tokens"], index)).mean()
        return loss, {"loss": loss.detach()}

    def blind_loss(self, batch, stats: BlindStats):
        index = self.visible(batch)
        return loss_cos(stats.token_unit_mean[index], gather_targets(batch["tokens"], index)).mean()


@pytest.fixture
def visible_cos():
    """``visible-cos`` in the registry for one test (gone after it)."""
    with base.OBJECTIVES.scoped():
        register_objective("visible-cos", config=VisibleCosConfig)(VisibleCos)
        yield "visible-cos"


def _cfg(tiny_dataset, tiny_cache, out, **kw) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(tiny_dataset, tiny_cache, "vit", 32, 8, shuffle_buffer=16),
        out=str(out),
        student=StudentConfig("tiny-test"),
        optim=OptimConfig(base_lr=3e-3, warmup=0.1),
        log_every=1,
        blind_batches=4,
        device="cpu",
        **kw,
    )


def test_a_registered_objective_trains_through_the_real_loop(visible_cos, tiny_dataset, tiny_cache, tmp_path):
    assert visible_cos in list_objectives()
    run = tmp_path / "run"
    knobs = VisibleCosConfig(keep_ratio=0.25)
    result = train(_cfg(tiny_dataset, tiny_cache, run, objective=visible_cos, objective_knobs=knobs, steps=3), False)
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert all(0 < h["loss"] < 4 and h["blind_loss"] > 0 for h in result.history)  # 2 - 2 cos is in [0, 4]
    recorded = json.loads((run / "config.json").read_text())["train"]
    assert recorded["objective"] == visible_cos and recorded["objective_knobs"] == {"keep_ratio": 0.25}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["objective_knobs"] == {"keep_ratio": 0.25}
    # The knob is the run's: resuming with another value is refused, naming it.
    with pytest.raises(ValueError, match=r"objective_knobs.keep_ratio: run has 0.25, asked 0.5"):
        train(_cfg(tiny_dataset, tiny_cache, run, objective=visible_cos, steps=4, resume=True), False)


def test_the_knob_reaches_the_objective_and_is_checked(visible_cos, tiny_dataset, tiny_cache):
    from student.data import make_loader
    from student.train import build_run

    seen = []
    for ratio in (0.25, 1.0):
        cfg = _cfg(
            tiny_dataset, tiny_cache, "unused", objective=visible_cos, objective_knobs=VisibleCosConfig(ratio), steps=1
        )
        objective, ds, _, _ = build_run(cfg)
        seen.append(objective.visible(next(iter(make_loader(ds)))).shape[1])
    assert seen == [4, 16]  # of the tiny student's 4x4 patches
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        VisibleCosConfig(keep_ratio=0.0)
    # Another objective's knobs: refused when the run is built, before any step (the config module has no
    # registry to check them against: it imports no model).
    wrong = _cfg(tiny_dataset, tiny_cache, "unused", objective=visible_cos, objective_knobs=MaskedConfig(), steps=1)
    with pytest.raises(ValueError, match="takes its knobs as a VisibleCosConfig, got MaskedConfig"):
        build_run(wrong)
