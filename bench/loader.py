"""Loader: samples/s of the cached loader (decode + replay + target join) vs a plain image loader doing
decode + the same crop. Target: the join costs <= 5% extra.

* **cached**: ``student.data.CachedViews`` through ``make_loader`` exactly as ``digpt train`` builds it:
  tar stream, cache join by key, one view per sample per epoch, the crop re-derived from its seed and
  checked, decode, replay at the student's size, the join (tar stream, content hash, each row's one view read by byte range) in a background thread ahead of
  decoding, targets decoded per batch.
* **plain**: the same shards in the same order with the same shuffle buffer and batch size: tar stream,
  decode, draw the crop (``sample_crop`` with the seed the view plan would use, so both loaders cut the
  very same boxes and the resize costs are identical), replay at the student's size, label from the
  sample's ``cls`` member. No cache.

Each round runs one epoch of every loader, advanced in lockstep one batch at a time (the starting loader
rotates), so all loaders share the same seconds of a noisy machine; overhead = median over rounds of
``t_cached / t_plain - 1``. Separate instrumented epochs show where the cached loader's time goes.

    python bench/loader.py                                    # 128 images, pixel + EfficientNet targets
    python bench/loader.py --num-samples 1024 --image-size 256 --shard-size 256 --teachers pixel:64/8
    python bench/loader.py --workers 2 --num-samples 512      # DataLoader worker processes on both sides
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import time

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bench import _common as C


class PlainViews(IterableDataset):
    """The baseline: a webdataset image loader with a RandomResizedCrop-style crop, no targets. It reads the
    tars with the same reader as the cached loader (the project's, ``iter_tar_samples``), so the difference
    between the two is the join alone; ``_tar_read_rows`` measures that reader against webdataset's."""

    def __init__(
        self, ds, img_size: int, batch_size: int, shuffle_buffer: int, views: int, seed: int = 0, epoch: int = 0
    ):
        from teacher_cache.views import AugConfig

        self.ds = ds
        self.aug = AugConfig(views=views)
        self.aug_fp = self.aug.fingerprint()
        self.img_size, self.batch_size, self.shuffle_buffer = img_size, batch_size, shuffle_buffer
        self.seed, self.epoch = seed, epoch

    def _shards(self, worker: int, workers: int) -> list[str]:
        shards = list(self.ds.shards)
        np.random.default_rng([self.seed, self.epoch]).shuffle(shards)  # as EpochPlan.shard_order (1 rank)
        return shards[worker::workers]

    def __iter__(self):
        from student.data import _hash64
        from student.epoch_plan import take_batch
        from teacher_cache.images import decode_image, to_uint8_chw
        from teacher_cache.shards import iter_tar_samples, pick_image
        from teacher_cache.views import replay_view, sample_crop, view_seed

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, 0, worker])
        bs, sb = self.batch_size, self.shuffle_buffer
        buf: list[dict] = []

        def take():  # the loader's own draw, so the bench times the same batches
            return take_batch(buf, bs, sb > 0, rng)

        def collate(batch):
            images = []
            for b in batch:
                img = torch.from_numpy(to_uint8_chw(decode_image(b["image"])))
                v = _hash64(self.seed, self.epoch, b["shard"], b["key"]) % self.aug.views
                seed = view_seed(self.aug_fp, self.aug.seed, b["shard"], b["key"], v)
                box, flip = sample_crop(seed, img.shape[2], img.shape[1], self.aug)
                images.append(replay_view(img, box, flip, self.img_size))
            return {
                "images": torch.stack(images),
                "labels": torch.tensor([b["label"] for b in batch], dtype=torch.long),
            }

        for shard in self._shards(worker, workers):
            for s in iter_tar_samples(self.ds.shard_url(shard)):
                picked = pick_image(s)
                image = picked[1] if picked else b""
                label = int(s.files.get("cls", b"-1"))
                buf.append({"shard": shard, "key": s.key, "image": image, "label": label})
                if len(buf) < bs * (1 + (sb > 0)) and len(buf) < max(sb, bs):
                    continue
                yield collate(take())
        while len(buf) >= bs:
            yield collate(take())


def _tar_read_rows(ds, repeats: int) -> list[list[str]]:
    """µs per sample to stream every shard's samples (members grouped by key, bytes in memory): the
    project's reader, which both loaders use, against webdataset's ``tarfile_to_samples`` (Python's
    tarfile underneath), which the cached loader used before 2026-11-30; medians of interleaved rounds."""
    import webdataset as wds

    from teacher_cache.shards import iter_tar_samples

    def ours() -> int:
        return sum(1 for shard in ds.shards for _ in iter_tar_samples(ds.shard_url(shard)))

    def webdataset() -> int:
        return sum(1 for shard in ds.shards for _ in wds.tarfile_to_samples()(iter([{"url": ds.shard_url(shard)}])))

    times: dict[str, list[float]] = {"ours": [], "webdataset": []}
    n = ours()
    for r in range(max(3, repeats)):
        for name, fn in sorted((("ours", ours), ("webdataset", webdataset)), reverse=bool(r % 2)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    us = {k: 1e6 * C.median(v) / n for k, v in times.items()}
    return [
        ["project reader (`teacher_cache.shards.iter_tar_samples`; both loaders)", f"{us['ours']:.1f}", "1.00"],
        [
            "webdataset `tarfile_to_samples` (tarfile; the cached loader before 2026-11-30)",
            f"{us['webdataset']:.1f}",
            f"{us['webdataset'] / us['ours']:.2f}",
        ],
    ]


CROP = "crop params (re-derived + checked; plain draws them too)"
WAIT = "join: waiting for the join thread (main thread)"
READ = "join thread: target reads (overlapping the rest; not in the sum)"
HASH = "join thread: image content hash (overlapping; not in the sum)"
STACK = "join: target stacking (stored dtype)"
DEVICE = "decode to float32 in the run's stages, on the device (here this CPU; not loader time)"


def _device_decode_seconds(loader, codebook, repeats: int = 11) -> tuple[float, int]:
    """Median seconds per batch of ``DecodeTargets`` on one of ``loader``'s batches, on this CPU: what a
    CPU run pays for its targets in the step instead (a GPU run: a widening kernel)."""
    from student.stages import DecodeTargets

    batch = next(iter(loader))
    stage = DecodeTargets(codebook, "cpu")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stage(batch)
        times.append(time.perf_counter() - t0)
    return C.median(times), len(batch["images"])


def _epoch(loader) -> int:
    n = 0
    for batch in loader:
        n += len(batch["images"])
    return n


def _interleave_batches(factories: dict, warmup: int, rounds: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """One epoch of every loader per round, advanced in lockstep one batch at a time (the starting loader
    rotates per batch), so the loaders' epochs share the same seconds of wall clock and a neighbour's burst
    lands on all of them. Returns per-round epoch seconds (sum of that loader's batch times) and samples."""
    names = list(factories)
    out: dict[str, list[float]] = {n: [] for n in names}
    counts: dict[str, int] = {}
    for r in range(warmup + rounds):
        its = {n: iter(factories[n]()) for n in names}
        spent = {n: 0.0 for n in names}
        seen = {n: 0 for n in names}
        active, step = list(names), 0
        while active:
            for j in range(len(active)):
                n = active[(step + j) % len(active)]
                t0 = time.perf_counter()
                batch = next(its[n], None)
                spent[n] += time.perf_counter() - t0
                if batch is None:
                    active.remove(n)
                    break
                seen[n] += len(batch["images"])
            step += 1
        if r >= warmup:
            for n in names:
                out[n].append(spent[n])
                counts[n] = seen[n]
    return out, counts


def _shard_setup_seconds(join, first: bool = False) -> float:
    """Median seconds of the per-shard preamble of ``CachedViews._shard_samples``, replicated here because it
    runs inline there: every epoch, each row's view (one hash per row); the first epoch of a run also reads
    the manifest rows, key index, seeds/boxes/flips and the objects' indexes (``first=True``, a fresh join)."""
    from student.data import CacheJoin, _hash64

    times = []
    for shard in join.ds.shards:
        j = CacheJoin.__new__(CacheJoin)
        j.__dict__.update(join.__dict__)
        if first:
            j._rows, j._index, j._plan, j._readers = {}, {}, {}, {}
        t0 = time.perf_counter()
        rows, _, _ = j.rows(shard), j.index(shard), j.plan(shard)
        j.reader(shard)
        np.array([_hash64(0, 0, shard, key) % join.aug.views for key in rows["key"]])
        times.append(time.perf_counter() - t0)
    return C.median(times)


def _instrumented_epoch(make) -> tuple[dict[str, float], float, int]:
    from student import collate as K
    from student import prefetch as J
    from teacher_cache import dataset as DS

    timer = C.StageTimer()
    timer.patch(K, "decode_image", "decode")
    timer.patch(K, "to_uint8_chw", "decode")
    timer.patch(K, "replay_view", "replay/crop")
    timer.patch(K, "sample_crop", CROP)
    timer.patch(J.JoinThread, "wait", WAIT)
    timer.patch(J.TargetBlocks, "row", READ)
    timer.patch(DS, "content_hash", HASH)  # through checked_image, the loader's content-hash check
    timer.patch(K, "stored_targets", STACK)
    try:
        t0 = time.perf_counter()
        n = _epoch(make())
        total = time.perf_counter() - t0
    finally:
        timer.restore()
    return timer.snapshot(), total, n


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, repeats=11, warmup=1)
    p.add_argument(
        "--teachers",
        default="pixel:64/8,efficientnet_lite0:256",
        help="tokenizers extracted into the cache (comma-separated); one cached-loader row each",
    )
    p.add_argument("--num-samples", type=int, default=128, help="generated images")
    p.add_argument("--image-size", type=int, default=64, help="generated image side (px)")
    p.add_argument("--shard-size", type=int, default=64, help="images per shard")
    p.add_argument("--views", type=int, default=2, help="views per image in the cache")
    p.add_argument("--dtype", default="fp16", help="token storage dtype")
    p.add_argument("--img-size", type=int, default=64, help="student resolution the views are replayed at")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument("--shuffle-buffer", type=int, default=256, help="in-shard shuffle buffer (DataConfig default)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (both loaders)")
    p.add_argument("--instrumented-epochs", type=int, default=5, help="cached epochs timed per stage (medians)")
    a = p.parse_args(argv)
    threads = C.setup_threads(a.threads)

    from student.data import CachedViews, CacheJoin, DataConfig, make_loader
    from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
    from teacher_cache.dataset import load_dataset
    from teacher_cache.extract import run_extract
    from teacher_cache.prepare import SyntheticConfig, prepare_synthetic
    from teacher_cache.views import AugConfig

    names = [t.strip() for t in a.teachers.split(",") if t.strip()]
    rep = C.Report("loader", "Loader: cached join vs plain image loader (bench/loader.py)", argv)
    result: dict = {"tokenizers": {}}
    with C.workdir(a.workdir) as wd:
        data, cache = os.path.join(wd, "data"), os.path.join(wd, "cache")
        prepare_synthetic(
            SyntheticConfig(
                out=data,
                num_samples=a.num_samples,
                num_classes=4,
                image_size=a.image_size,
                shard_size=a.shard_size,
                seed=0,
            )
        )
        t0 = time.perf_counter()
        summary = run_extract(
            ExtractConfig(
                shards=data,
                out=cache,
                teachers=tuple(TeacherConfig(n) for n in names),
                aug=AugConfig(views=a.views),
                storage=StorageConfig(dtype=a.dtype),
                batch_size=32,
                executor="local",
                threads=threads,
            ),
            progress=False,
        )
        extract_s = time.perf_counter() - t0
        C.setup_threads(threads)
        groups = {n: t for n, t in zip(names, summary.tokenizers)}
        # Per-run setup (manifest, cache validation) happens once, as in train(); each round is one epoch.
        dataset = load_dataset(data)
        cfgs = {
            n: DataConfig(
                shards=data,
                cache=cache,
                tokenizer=t.group,
                img_size=a.img_size,
                batch_size=a.batch_size,
                num_workers=a.workers,
                seed=0,
                shuffle_buffer=a.shuffle_buffer,
            )
            for n, t in groups.items()
        }
        joins = {n: CacheJoin(c, dataset) for n, c in cfgs.items()}

        def plain():
            ds = PlainViews(dataset, a.img_size, a.batch_size, a.shuffle_buffer, a.views)
            return DataLoader(ds, batch_size=None, num_workers=a.workers)

        def cached(name):
            ds = CachedViews(cfgs[name], join=joins[name], decode_targets=False)  # as `digpt train`
            ds.set_epoch(0)
            return make_loader(ds)

        factories = {"plain": plain, **{n: (lambda n=n: cached(n)) for n in groups}}
        times, counts = _interleave_batches(factories, a.warmup, a.repeats)
        plain_t = times["plain"]

        # Within-run view of the same question: the join's own stages, timed inside cached epochs, against the
        # rest of those epochs (a noisy neighbour slows both parts of one epoch alike).
        join_stages = (WAIT, STACK)
        stage_names = ("decode", "replay/crop", CROP, *join_stages)
        brows, inner = [], {}
        for n in groups:
            per = [_instrumented_epoch(lambda n=n: cached(n)) for _ in range(max(1, a.instrumented_epochs))]
            cnt = per[0][2]
            med = {s: C.median(x[0].get(s, 0.0) for x in per) for s in stage_names}
            total = C.median(x[1] for x in per)
            inner[n] = C.median(
                sum(x[0].get(s, 0.0) for s in join_stages)
                / max(1e-12, x[1] - sum(x[0].get(s, 0.0) for s in join_stages))
                for x in per
            )
            for s in stage_names:
                brows.append([n, s, f"{1e6 * med[s] / cnt:.0f}", f"{100 * med[s] / total:.1f}%"])
            for side in (READ, HASH):
                t_side = C.median(x[0].get(side, 0.0) for x in per)
                brows.append([n, side, f"{1e6 * t_side / cnt:.0f}", f"({100 * t_side / total:.1f}%)"])
            dev_s, dev_n = _device_decode_seconds(cached(n), joins[n].codebook)
            brows.append([n, DEVICE, f"{1e6 * dev_s / dev_n:.0f}", f"({100 * dev_s / dev_n * cnt / total:.1f}%)"])
            rest = max(0.0, total - sum(med.values()))
            setup = C.median(_shard_setup_seconds(joins[n]) for _ in range(3)) * len(dataset.shards)
            setup = min(setup, rest)
            first = C.median(_shard_setup_seconds(joins[n], first=True) for _ in range(3))
            per_shard = a.num_samples / len(dataset.shards)
            brows.append(
                [
                    n,
                    f"per-shard setup per epoch: each row's view ({1e3 * setup / len(dataset.shards):.2f} ms per "
                    f"shard of {per_shard:.0f}); first epoch of a run: + rows, key index, seeds/boxes/flips, "
                    f"object indexes ({1e3 * first:.1f} ms per shard, once per run and process)",
                    f"{1e6 * setup / cnt:.0f}",
                    f"{100 * setup / total:.1f}%",
                ]
            )
            brows.append(
                [
                    n,
                    "rest (main thread: shuffle, collate + target stacking, labels/order seeds, thread handoff)",
                    f"{1e6 * (rest - setup) / cnt:.0f}",
                    f"{100 * (rest - setup) / total:.1f}%",
                ]
            )
            brows.append([n, "**epoch**", f"{1e6 * total / cnt:.0f}", "100%"])
            result["tokenizers"][n] = {
                "shard_setup_s": setup / len(dataset.shards),
                "stages_us_per_sample": {s: 1e6 * v / cnt for s, v in med.items()},
                "join_stages_over_rest": inner[n],
            }

        rows = [["plain (decode + crop)", "-", f"{counts['plain'] / C.median(plain_t):.0f}", "-", "-", "-", "-"]]
        for n, tok in groups.items():
            over = C.paired_ratio(times[n], plain_t) - 1
            rows.append(
                [
                    f"cached: {n} [{a.dtype}]",
                    f"{tok.bytes_per_view:,.0f}",
                    f"{counts[n] / C.median(times[n]):.0f}",
                    f"{100 * over:+.1f}%",
                    C.spread([100 * (t / p - 1) for t, p in zip(times[n], plain_t)]) + " %",
                    f"+{100 * inner[n]:.1f}%",
                    C.verdict(over <= 0.05 and inner[n] <= 0.05),
                ]
            )
            result["tokenizers"][n].update(
                overhead=over, samples_per_s=counts[n] / C.median(times[n]), bytes_per_view=tok.bytes_per_view
            )
        result["plain_samples_per_s"] = counts["plain"] / C.median(plain_t)
        rep.table(
            f"{a.num_samples} images ({a.image_size}px JPEG) in {-(-a.num_samples // a.shard_size)} shards, "
            f"{a.views} views cached, replayed at {a.img_size}px, batch {a.batch_size}, shuffle buffer "
            f"{a.shuffle_buffer}, {a.workers} loader workers, {threads} thread(s); one epoch per round, "
            f"medians of {a.repeats} rounds, loaders advanced in lockstep batch by batch (cache built in {extract_s:.0f}s, "
            "not timed)",
            [
                "loader",
                "stored B/view",
                "samples/s",
                "join overhead (side by side)",
                "range over rounds",
                "target wait + decode / rest of epoch (within run)",
                "<= 5%?",
            ],
            rows,
            align="lrrrrrr",
        )
        rep.table(
            f"Where the cached loader's time goes (in-process; medians of {max(1, a.instrumented_epochs)} "
            "instrumented epochs; µs per sample)",
            ["tokenizer", "stage", "µs / sample", "share"],
            brows,
            align="llrr",
        )
        rep.table(
            f"Reading the tar streams alone ({a.num_samples} samples of 2 members; µs per sample, medians of "
            f"{max(3, a.repeats)} interleaved rounds)",
            ["reader", "µs / sample", "÷ project reader"],
            _tar_read_rows(dataset, a.repeats),
            align="lrr",
        )
        rep.note(
            "Join overhead (side by side) = median over rounds of (cached epoch time / plain epoch time) - 1: "
            "both loaders decode the same JPEGs and cut the same boxes, so the difference is the cache join (key "
            "lookup, per-shard view choice, crop re-derivation check, waiting for target reads, target decoding and "
            "stacking). The loaders advance in lockstep, one batch each in turn, so both see the same load. "
            "The within-run column times the join's two main stages (waiting for targets, target decode) inside the "
            "same cached epochs against the rest of those epochs, so a neighbour's load cancels out; it leaves "
            "out the small join costs hidden in 'rest'. Crop parameters cost the same in both loaders (the plain "
            "one draws them, the cached one re-derives and checks them) and are not counted as join. The join "
            "(tar stream, key lookup, content hash, target reads) runs in a background thread ahead of decoding; it "
            "overlaps the main thread's work only where a core is free, and what the main thread still waits for is "
            "the 'waiting for the join thread' row. 'rest' is the main thread's remaining work (shuffle, collate, "
            "stacking). The cached loader hands the targets over in their stored dtype, as `digpt train`'s does; "
            "the run's stages make them float32 on the training device (`student.stages.DecodeTargets`), whose "
            "cost on this CPU is the 'decode to float32' row (before 2026-11-30 the loader did that itself)."
        )
    rep.append(a.results)
    return result


if __name__ == "__main__":
    main()
