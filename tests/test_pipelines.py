"""Ablation recipes end to end at a test-sized budget: real extraction, training and probes; the
report's structure; one cache shared by every recipe (each teacher extracted once)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest

from pipelines.ablate import RECIPES, AblateConfig, findings, format_table, noise_margin, run_ablation


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ablate") / "cache")


def _on_tiny(recipe: str, tmp_path, dataset: str, cache: str, **changes) -> AblateConfig:
    """An ablation of ``recipe`` on the tiny shared dataset and cache: 3 steps of the tiny student."""
    return AblateConfig(
        recipe=recipe,
        out=str(tmp_path),
        shards=dataset,
        image_size=32,
        num_classes=4,
        student="tiny-test",
        steps=3,
        batch_size=8,
        executor="local",
        workers=0,
        semantic_teacher="random-vit:32/8",
        cache=cache,
        **changes,
    )


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_writes_a_report(recipe, tiny_dataset, shared_cache, tmp_path):
    cfg = _on_tiny(recipe, tmp_path, tiny_dataset, shared_cache)
    results = run_ablation(cfg)
    variants = RECIPES[recipe](cfg)
    rows = results["rows"]
    assert [r["variant"] for r in rows] == [v.name for v in variants] + ["random-init (floor)"]
    for r in rows:
        assert 0.0 <= r["linear_top1"] <= 1.0 and 0.0 <= r["knn_top1"] <= 1.0
    assert all(r["bytes_per_view"] > 0 for r in rows[:-1])
    assert results["chance"] == 0.25
    # Every trained variant has its own run with a checkpoint and its probe output beside it.
    for run in results["runs"]:
        if run["run"]:
            assert os.path.exists(os.path.join(run["run"], "probe_linear.json"))
            assert len(run["losses"]) >= 1
            # the loss plot's x axis: the optimizer step of each logged loss, ending at the last step
            assert len(run["loss_steps"]) == len(run["losses"]) and run["loss_steps"][-1] == 3
    report = open(tmp_path / "report.md").read()
    assert "| variant | teacher |" in report and "## Findings" in report
    assert json.load(open(tmp_path / "results.json"))["rows"] == json.loads(json.dumps(rows, default=str))
    assert (tmp_path / "accuracy.png").stat().st_size > 1000 and (tmp_path / "losses.png").exists()
    if recipe == "all":  # one table per comparison, each row's gap to the base with its error bar
        assert "## The paper's comparisons" in report and report.count("Paper: ") == len(results["comparisons"])
        assert {n for c in results["comparisons"].values() for n in c["rows"]} == {v.name for v in variants}
        assert "gap to `digpt`" in report and "noise" in report.split("## The paper's comparisons")[1]
    if recipe == "views":  # K = 1, 2, 4, 8 against the online teacher, plotted
        assert [r["max_views"] for r in rows[:4]] == [1, 2, 4, 8] and rows[4]["fresh_views"]
        assert (tmp_path / "views.png").stat().st_size > 1000
    # The teachers' own features are probed too (continuous tokenizers), and reported beside the students.
    ceil = results["ceilings"]
    assert ceil and all(0.0 <= c["linear_top1"] <= 1.0 for c in ceil.values())
    assert set(ceil) <= {v.tokenizer for v in variants}
    assert "Teacher features" in report and "own pooled features reach" in report


def test_findings_state_the_comparison_honestly():
    rows = [
        {"variant": "digpt/pixel", "teacher": "pixel:32/8", "linear_top1": 0.40},
        {"variant": "digpt/semantic", "teacher": "efficientnet_lite0:256", "linear_top1": 0.30},
        {"variant": "random-init (floor)", "teacher": "-", "linear_top1": 0.35},
    ]
    text = " ".join(findings({"rows": rows, "chance": 0.25}))
    assert (
        "did NOT beat pixel" in text
        and "At or below the random-init floor (by less than its error bar): digpt/semantic" in text
    )
    rows[1]["linear_top1"] = 0.9
    assert "beat pixel targets (0.900 vs 0.400" in " ".join(findings({"rows": rows, "chance": 0.25}))


def test_semantic_vs_pixel_compares_rows_that_differ_only_in_the_teacher():
    """The best semantic row (here feature distillation) against the pixel D-iGPT row would credit the
    tokenizer with the objective's gap: the finding pairs the rows equal in all but the teacher, and says
    nothing when no such pair exists."""
    common = {"order": "default", "storage": "fp16", "decoder_depth": 2, "target_norm": "none", "probe": "ViT"}
    rows = [
        {"variant": "digpt", "teacher": "efficientnet_lite0:128", "objective": "digpt", "linear_top1": 0.20},
        {"variant": "fd", "teacher": "efficientnet_lite0:128", "objective": "fd", "linear_top1": 0.90},
        {"variant": "pca-64", "teacher": "pca:efficientnet_lite0:128", "objective": "digpt", "linear_top1": 0.95},
        {"variant": "digpt/pixel", "teacher": "pixel:64/8", "objective": "digpt", "linear_top1": 0.40},
        {"variant": "random-init (floor)", "teacher": "-", "linear_top1": 0.10},
    ]
    for r in rows[:4]:
        r |= common | {"varies": [] if r["variant"] == "digpt" else ["x"]}
    text = " ".join(findings({"rows": rows, "chance": 0.1}))
    assert "did NOT beat pixel targets (0.200 vs 0.400; `digpt` vs `digpt/pixel`, which differ only in" in text
    assert "0.900 vs" not in text and "0.950 vs" not in text
    rows[3]["objective"] = "fd"  # now the pixel row's twin is fd, not the base
    assert "beat pixel targets (0.900 vs 0.400; `fd` vs `digpt/pixel`" in " ".join(
        findings({"rows": rows, "chance": 0.1})
    )
    rows[3]["storage"] = "int8"  # no row differs from it only in the teacher: no verdict at all
    assert "pixel targets" not in " ".join(findings({"rows": rows, "chance": 0.1}))


def test_one_teacher_stored_twice_is_reported_once_per_storage():
    rows = [
        {"variant": "digpt", "teacher": "t:128", "storage": "fp16", "linear_top1": 0.3},
        {"variant": "int8", "teacher": "t:128", "storage": "int8", "linear_top1": 0.5},
        {"variant": "random-init (floor)", "teacher": "-", "linear_top1": 0.1},
    ]
    ceil = {k: {"teacher": "t:128", "storage": k, "same_probe_set": True, "linear_top1": 0.9} for k in ("fp16", "int8")}
    text = findings({"rows": rows, "chance": 0.1, "ceilings": ceil, "n_report": 1000})
    assert any("t:128 (fp16)'s own pooled features" in x and "best student 0.300" in x for x in text)
    assert any("t:128 (int8)'s own pooled features" in x and "best student 0.500" in x for x in text)


def test_table_has_one_line_per_row():
    row = {
        "variant": "v",
        "teacher": "t",
        "objective": "digpt",
        "order": "random",
        "storage": "fp16",
        "bytes_per_view": 10.0,
        "train_seconds": 1.0,
        "linear_top1": 0.5,
        "linear_top1_std": 0.1,
        "knn_top1": 0.4,
        "knn_top1_std": 0.0,
        "seeds": 2,
    }
    table = format_table({"rows": [row, row]})
    assert table.count("\n") == 3 and "0.500 ± 0.100" in table


def test_unknown_recipe_is_named(tmp_path):
    with pytest.raises(ValueError, match="recipe must be one of"):
        run_ablation(AblateConfig(recipe="nope", out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_findings_do_not_call_noise_a_win():
    """On 128 report samples, 0.141 vs 0.078 is within two standard errors: no verdict is drawn."""
    from pipelines.ablate import noise_margin

    rows = [
        {"variant": "digpt/pixel", "teacher": "pixel:64/8", "linear_top1": 0.078},
        {"variant": "digpt/semantic", "teacher": "efficientnet_lite0:256", "linear_top1": 0.141},
        {"variant": "random-init (floor)", "teacher": "-", "linear_top1": 0.125},
    ]
    text = " ".join(findings({"rows": rows, "chance": 0.125, "n_report": 128}))
    assert "within noise" in text and "does not separate them" in text and " beat" not in text
    assert "Above the floor only within noise: digpt/semantic" in text
    assert noise_margin(0.141, 0.078, 128) == pytest.approx(0.078, abs=2e-3)
    rows[1]["linear_top1"] = 0.6
    text = " ".join(findings({"rows": rows, "chance": 0.125, "n_report": 128}))
    assert "beat pixel targets (0.600 vs 0.078; beyond noise" in text and "within noise" not in text


def test_paired_error_bar_uses_the_shared_report_samples():
    """Two probes scored on one split disagree on few samples: the paired error bar sees that, the binomial
    one (independent samples) does not. 20 more right answers in 512 is beyond paired noise only."""
    from pipelines.noise import how as _how
    from pipelines.noise import margin, paired_margin

    n = 512
    floor = [1.0 if i < 80 else 0.0 for i in range(n)]  # 0.156
    student = [1.0 if i < 100 else 0.0 for i in range(n)]  # 0.195: the floor's right answers and 20 more
    d = [a - b for a, b in zip(student, floor)]
    mean = sum(d) / n
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5
    assert paired_margin({"0": student}, {"0": floor}) == pytest.approx(2 * sd / n**0.5)
    rows = [
        {"variant": "digpt/semantic", "teacher": "t", "linear_top1": 100 / n, "report_correct": {"0": student}},
        {"variant": "random-init (floor)", "teacher": "-", "linear_top1": 80 / n, "report_correct": {"0": floor}},
    ]
    assert margin(rows[0], rows[1], n) < 0.039 < noise_margin(100 / n, 80 / n, n)
    text = " ".join(findings({"rows": rows, "chance": 0.125, "n_report": n}))
    assert "Above the floor beyond noise" in text and f"paired over the same {n} report samples" in text
    rows[0].update(knn_top1=100 / n, knn_correct={"0": student})
    rows[1].update(knn_top1=80 / n, knn_correct={"0": floor})
    text = " ".join(findings({"rows": rows, "chance": 0.125, "n_report": n}))
    assert "k-NN, gap to the floor on the same report samples" in text and "digpt/semantic +0.039 ± 0.01" in text
    assert "beyond noise" in text.split("k-NN")[1]
    rows[1]["report_correct"] = {"1": floor}  # another seed's split: nothing pairs, so the bar is binomial
    assert "Above the floor only within noise: digpt/semantic" in " ".join(
        findings({"rows": rows, "chance": 0.125, "n_report": n})
    )
    assert _how(rows[0], rows[1], n) == f" on {n} report samples, binomial"  # and says so
    for r in rows:
        r["report_correct"] = None  # without the vectors: binomial, and the same gap is within noise
    text = " ".join(findings({"rows": rows, "chance": 0.125, "n_report": n}))
    assert "Above the floor only within noise: digpt/semantic" in text
    assert paired_margin({"0": student}, None) is None and paired_margin({"0": student}, {"0": floor[:10]}) is None
    assert paired_margin({"0": student}, {"1": floor}) is None  # other seeds: other report samples, no pairs
    # Two seeds whose gaps disagree (+20 and -20 samples): the spread between seeds sets the error bar.
    worse = [1.0 if i < 60 else 0.0 for i in range(n)]
    two = paired_margin({"0": student, "1": worse}, {"0": floor, "1": floor})
    assert two == pytest.approx(2 * (20 / n), rel=1e-6)  # sd of (+20, -20)/n over 2 seeds, over sqrt(2)


def _small(recipe: str, out: str = "x") -> AblateConfig:
    return AblateConfig(
        recipe=recipe,
        out=out,
        image_size=32,
        num_classes=4,
        num_samples=48,
        student="tiny-test",
        steps=3,
        batch_size=8,
        semantic_teacher="random-vit:32/8",
    )


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_variant_differs_from_its_base_in_exactly_what_it_declares(recipe):
    """No confound: each variant departs from its recipe's base configs in exactly the fields it declares
    (``Variant.varies``) — the target normalisation, probe, budget and everything else shared — and every
    row of one recipe varies along the same axis."""
    from pipelines.recipes import recipe_base, variant_diff

    cfg = _small(recipe)
    base = recipe_base(recipe)(cfg)
    variants = RECIPES[recipe](cfg)
    assert len({v.name for v in variants}) == len(variants) and len({v.tokenizer for v in variants}) >= 1
    for v in variants:
        assert variant_diff(v, base) == set(v.varies), (v.name, variant_diff(v, base), v.varies)
        assert v.train.target_norm == base[1].target_norm, v.name  # one target normalisation per recipe
    axes = {a for v in variants for a in v.varies}
    allowed = {
        "tokenizers": {"extract.teachers"},
        "demo": {"extract.teachers"},
        "learning": {"extract.teachers", "train.objective"},
        "decoders": {"train.objective", "train.student.decoder_depth"},
        "orders": {"train.order"},
        "storage": {"extract.teachers", "extract.storage.dtype"},
        "views": {"train.data.max_views", "train.online_teacher", "train.data.fresh_views"},
    }
    allowed["all"] = {"extract.storage.dtype"} | allowed["learning"] | allowed["decoders"] | allowed["orders"]
    assert axes <= allowed[recipe], axes


def test_all_trains_each_row_once_and_every_comparison_varies_one_thing():
    """``all``: every comparison's rows exist once; each row but the base varies exactly one config path."""
    from pipelines.recipes import COMPARISONS

    variants = RECIPES["all"](_small("all"))
    names = [v.name for v in variants]
    assert len(names) == len(set(names)) and names[0] == "digpt" and variants[0].varies == ()
    assert {n for rows, _ in COMPARISONS.values() for n in rows} == set(names)
    assert all(len(v.varies) == 1 for v in variants[1:])
    by = {v.name: v for v in variants}
    assert by["digpt/semaim"].train.order == "semaim" and by["masked"].train.objective == "masked"


def test_a_confound_is_caught():
    """The check above fails on a variant that changes more than it declares (the pixel rows' target
    normalisation, once)."""
    from dataclasses import replace

    from pipelines.recipes import recipe_base, variant_diff

    cfg = _small("demo")
    v = RECIPES["demo"](cfg)[0]
    hidden = replace(v, train=replace(v.train, target_norm="token"))
    assert (
        variant_diff(hidden, recipe_base("demo")(cfg))
        == {"extract.teachers", "train.target_norm"}
        != set(hidden.varies)
    )


def test_a_variant_trains_with_the_config_the_runner_always_built():
    """The runner's TrainConfig for a variant equals the one written out field by field before recipes were
    ``replace`` of a base (no behaviour change): decoders' depth-1 variant, seed 1."""
    from dataclasses import replace

    from student.data import DataConfig
    from student.objectives import StudentConfig
    from student.train import OptimConfig, TrainConfig

    cfg = _small("decoders")
    v = next(v for v in RECIPES["decoders"](cfg) if v.name == "digpt/depth1")
    got = replace(v.train, data=replace(v.train.data, tokenizer=v.tokenizer, seed=1), out="run", seed=1)
    want = TrainConfig(
        data=DataConfig("x/data", "x/cache", v.tokenizer, 32, 8, num_workers=1, seed=1),
        out="run",
        student=StudentConfig(size="tiny-test", decoder_depth=1),
        steps=3,
        seed=1,
        optim=OptimConfig(base_lr=8e-3, warmup=0.1),
        log_every=1,
    )
    assert got == want and v.tokenizer == "semantic-fp16"


@pytest.mark.slow
def test_generated_probe_set_is_held_out_from_pretraining(tmp_path):
    """Without ``shards``, the students pretrain on one generated set and are probed on another (seed 1):
    no image of the probe set is a pretraining image, and every probe reports on its quarter."""
    import pyarrow.parquet as pq

    cfg = replace(_small("demo", str(tmp_path)), num_samples=32, probe_samples=64, steps=2, executor="local", workers=0)
    results = run_ablation(cfg)
    pd = results["probe_data"]
    assert pd == {"shards": str(tmp_path / "probe"), "held_out": True, "samples": 64}
    assert results["n_report"] == 16
    assert all(len(v) == 16 for r in results["rows"] for v in r["report_correct"].values())
    hashes = [set(pq.read_table(tmp_path / d / "manifest.parquet")["hash"].to_pylist()) for d in ("data", "probe")]
    assert len(hashes[0]) == 32 and len(hashes[1]) == 64 and not hashes[0] & hashes[1]
    assert "64 labelled images held out from pretraining" in (tmp_path / "report.md").read_text()
    with pytest.raises(
        ValueError, match=r"probe_samples must be >= 0: 0 \(a holdout of the pretraining set\) or >= 4 \* num_classes"
    ):
        replace(cfg, probe_samples=8)


def test_jobs_plan():
    """``--jobs``: auto fills the cores but never past the runs, one at a time on a GPU; threads split."""
    from pipelines.ablate import plan_jobs

    assert plan_jobs(0, runs=4, cores=2, cuda=False) == (2, 1)
    assert plan_jobs(0, runs=3, cores=16, cuda=False) == (3, 5)
    assert plan_jobs(0, runs=4, cores=16, cuda=True) == (1, 16)
    assert plan_jobs(1, runs=4, cores=2, cuda=False) == (1, 2)
    assert plan_jobs(8, runs=2, cores=4, cuda=False) == (2, 2)
    with pytest.raises(ValueError, match="jobs must be >= 0"):
        AblateConfig(recipe="demo", out="x", jobs=-1)


@pytest.mark.slow
def test_runs_side_by_side_report_like_one_after_the_other(tiny_dataset, shared_cache, tmp_path):
    """``jobs=2``: the runs train and probe in two spawned processes, the report lists them in recipe order
    with the same kind of numbers, and records how they ran."""
    cfg = _on_tiny("demo", tmp_path, tiny_dataset, shared_cache, jobs=2)
    results = run_ablation(cfg)
    assert results["parallel"] == {"jobs": 2, "threads_per_run": 1}
    names = [v.name for v in RECIPES["demo"](cfg)]
    assert [r["variant"] for r in results["rows"]] == [*names, "random-init (floor)"]
    for run in results["runs"]:
        if run["run"]:
            assert os.path.exists(os.path.join(run["run"], "probe_linear.json")) and run["loss_steps"][-1] == 3


def _row(variant: str, teacher: str, correct: list[int]) -> dict:
    return {
        "variant": variant,
        "teacher": teacher,
        "linear_top1": sum(correct) / len(correct),
        "report_correct": {"0": correct},
    }


def test_report_flags_a_teacher_at_the_floor_and_a_student_below_it():
    """A teacher whose own features do not beat the random-init floor on the students' probe set is named as
    unable to teach this label (no "longer schedule" advice), and a student below the floor beyond noise is
    called out as worse than untrained."""
    rng = np.random.default_rng(0)
    n = 2000
    floor = (rng.random(n) < 0.5).astype(int).tolist()
    student = [x if rng.random() < 0.6 else 0 for x in floor]  # ~0.30: far below the floor
    teacher = [x if rng.random() < 0.97 else 1 - x for x in floor]  # ~0.50: the floor, within noise
    rows = [_row("digpt/semantic", "efficientnet_lite0:128", student), _row("random-init (floor)", "-", floor)]
    ceil = {"semantic-fp16": {"teacher": "efficientnet_lite0:128", "storage": "fp16", "same_probe_set": True}}
    ceil["semantic-fp16"] |= {"linear_top1": sum(teacher) / n, "report_correct": {"0": teacher}, "n_report": n}
    text = " ".join(findings({"rows": rows, "chance": 0.5, "ceilings": ceil, "n_report": n}))
    assert "TEACHER AT THE FLOOR: efficientnet_lite0:128" in text and "cannot" not in text.split("TEACHER")[0]
    assert "BELOW the random-init floor beyond noise: digpt/semantic" in text
    assert "whether more steps lift them is not measured here" in text  # no guess either way
    assert "longer schedule" not in text.replace("before a longer schedule", "")
    # A teacher clearly above the floor is reported with its gap, not flagged.
    good = [1 if rng.random() < 0.9 else x for x in floor]
    ceil["semantic-fp16"] |= {"linear_top1": sum(good) / n, "report_correct": {"0": good}}
    text = " ".join(findings({"rows": rows, "chance": 0.5, "ceilings": ceil, "n_report": n}))
    assert "TEACHER AT THE FLOOR" not in text and "over the floor); its best student" in text


@pytest.mark.slow
def test_an_ablation_run_again_reuses_finished_runs_and_resumes_unfinished_ones(
    tiny_dataset, shared_cache, tmp_path, monkeypatch
):
    """Run again in its directory, an ablation reads back every run and probe it finished with the same
    config and cache (nothing trained or probed; same numbers), resumes a run that has a checkpoint but no
    summary, and retrains one whose config changed."""
    import pipelines.ablate as ablate

    cfg = _on_tiny("demo", tmp_path, tiny_dataset, shared_cache)
    first = run_ablation(cfg)
    assert not any(r["reused"] for r in first["runs"])

    def refuse(*a, **k):
        raise AssertionError("trained or probed again")

    with monkeypatch.context() as m:
        m.setattr(ablate, "train", refuse)
        m.setattr(ablate, "run_probes", refuse)
        again = run_ablation(cfg)
    key = ("variant", "linear_top1", "knn_top1", "report_correct", "knn_correct", "loss_vs_blind")
    same = [json.dumps({k: r[k] for k in key}) for r in again["rows"]]  # as text: the floor's nan equals itself
    assert same == [json.dumps({k: r[k] for k in key}) for r in first["rows"]]
    assert [r["losses"] for r in again["runs"]] == [r["losses"] for r in first["runs"]]
    assert [r["reused"] for r in again["runs"]] == [True, True, False]  # the floor is no training run
    assert "2 of 2 training runs were finished by an earlier ablation" in (tmp_path / "report.md").read_text()

    # Killed after its last checkpoint, before its summary: resumed (not restarted), then probed anew.
    run = first["runs"][0]["run"]
    os.remove(os.path.join(run, "summary.json"))
    calls = []
    real_train = ablate.train
    monkeypatch.setattr(ablate, "train", lambda c: calls.append(c) or real_train(c))
    resumed = run_ablation(cfg)
    assert [(c.out, c.resume) for c in calls] == [(run, True)]
    assert resumed["runs"][0]["linear_top1"] == first["runs"][0]["linear_top1"]

    # Another config in the same directory: refused before any work, naming the run and what differs.
    calls.clear()
    with pytest.raises(ValueError, match=r"digpt_pixel_s0 holds a run of another config \(steps: run has 3, now 4\)"):
        run_ablation(replace(cfg, steps=4))
    assert calls == []


@pytest.mark.parametrize("objective", ["digpt", "masked", "fd"])
def test_a_run_recorded_with_resolved_knobs_is_one_of_its_own_configs(objective, tmp_path):
    """A run records its objective's knobs resolved (``open_run``); the ablation's config leaves them to
    defaults. Run again, that run is the ablation's own (was: every ``masked`` run refused as "another
    config", ``mask_ratio`` 0.5 vs None); a knob that really changed is still refused by name."""
    from dataclasses import asdict

    from pipelines.rerun import check_earlier_runs
    from student.config import DataConfig, TrainConfig
    from student.objectives import objective_config

    cfg = TrainConfig(
        data=DataConfig(shards="s", cache="c", img_size=32), out=str(tmp_path / "run"), objective=objective, steps=5
    )
    recorded = replace(cfg, objective_knobs=objective_config(objective, None))
    os.makedirs(cfg.out)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"train": asdict(recorded)}, default=str))
    check_earlier_runs([cfg])
    if recorded.objective_knobs is not None:
        changed = replace(cfg, objective_knobs=replace(recorded.objective_knobs, mask_ratio=0.3))
        with pytest.raises(ValueError, match=r"objective_knobs.mask_ratio: run has 0.5, now 0.3"):
            check_earlier_runs([changed])


def test_a_second_ablation_in_the_same_directory_is_refused(tmp_path):
    """Two ablations in one directory would train the same runs at once: the second is refused with the
    first one's pid, before any work; the lock goes with the first (here: its block ends)."""
    from pipelines.rerun import ablation_lock

    cfg = AblateConfig(recipe="demo", out=str(tmp_path / "a"), steps=1, num_samples=32, probe_samples=0)
    with ablation_lock(cfg.out):
        with pytest.raises(ValueError, match=rf"another ablation is running in this directory \(pid {os.getpid()}\)"):
            run_ablation(cfg)
        assert not os.path.exists(tmp_path / "a" / "data")
    with ablation_lock(cfg.out):  # released: taken again
        pass
