"""Storage: bytes per view for each storage form, the Blosc/zstd compression ratio, and Zarr read speed
in the student loader's access pattern.

One teacher runs once over generated images; its tokens are then written in every form through the
store's own code (``create_shard_group`` + the extractor's chunk writer ``write_rows``, the exact path
``digpt extract`` takes):

* ``fp32``, ``fp16``, ``bf16``, ``int8`` (per-token absmax scale) — the forms ``StorageConfig.dtype`` offers;
* ``pca-<d>`` — the ``pca:<teacher>`` tokenizer's form: tokens (and cls) projected on the top-``d``
  principal directions fit with its ``fit_pca`` (view 0 of every sample), stored fp16; the basis
  (``(d + 1) x D`` fp32) is a one-off per tokenizer, listed apart;
* ``codes-<k>`` — k-means codes (the ``kmeans:<teacher>`` tokenizer's int16 layout), codebook apart.

Compression ratio = raw bytes of the target arrays in their stored dtype (``tokens``, ``token_scale``,
``cls``, ``cls_scale``) / bytes on disk (``nbytes_stored``); "vs fp32" = fp32 raw bytes / bytes on disk.
Fidelity = mean cosine similarity of the decoded tokens to the fp32 teacher tokens.

Objects and bytes read: each of fp16, int8 and codes written in schema 1's layout (one object per
``--chunk-rows`` rows per array, every view in it) and schema 2's (one object per view per target array),
side by side: files per shard group (also for a shard of ``--objects-rows`` rows), and the target bytes a
loader epoch reads per sample, counted through a zarr store wrapper (:class:`CountingStore`).

Read speed replays what ``CachedViews`` does for one shard: rows in stream (index) order, one view per
sample chosen by the same hash, through ``student.prefetch.TargetBlocks`` (blocks of 64 rows, each row's view
by byte range), then ``decode_block`` per batch (codes: codebook lookup). For contrast, the same rows read
with one Zarr call per sample. The files were just written, so this measures decoding + read overhead
from the page cache, not the disk.

    python bench/storage.py                                   # EfficientNet-Lite0 tokens (49 x 1280), 64 images
    python bench/storage.py --teacher random-vit:32/8 --num-samples 32
    python bench/storage.py --num-samples 512 --chunk-rows 64 --pca-dims 64,128,256 --codebook-size 512
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import time

from zarr.storage import WrapperStore

from bench import _common as C
from teacher_cache.names import TARGETS


def _teacher_tokens(data: str, teacher, views: int, batch_size: int):
    """Tokens ``[n, K, T, D]`` and cls ``[n, K, D]`` (or None) of every view of the first shard."""
    import torch

    from teacher_cache.dataset import iter_dataset_samples, load_dataset
    from teacher_cache.images import decode_image, to_uint8_chw
    from teacher_cache.shards import pick_image
    from teacher_cache.views import AugConfig, plan_shard, replay_view

    ds = load_dataset(data)
    shard = ds.shards[0]
    rows = ds.rows(shard)
    plan = plan_shard(shard, rows["key"], rows["width"], rows["height"], AugConfig(views=views))
    vs = []
    for row, raw in iter_dataset_samples(ds, shard):
        i = row["index"]
        img = torch.from_numpy(to_uint8_chw(decode_image(pick_image(raw)[1])))
        vs.extend(replay_view(img, plan.boxes[i, v], plan.flips[i, v], teacher.spec.input_size) for v in range(views))
    x = torch.stack(vs)
    toks, clss = [], []
    for b in range(0, len(x), batch_size):
        out = teacher(x[b : b + batch_size])
        toks.append(out.tokens.float())
        if out.cls is not None:
            clss.append(out.cls.float())
    n = len(rows["key"])
    tokens = torch.cat(toks).reshape(n, views, *toks[0].shape[1:])
    cls = torch.cat(clss).reshape(n, views, -1) if clss else None
    return shard, list(rows["key"]), tokens, cls


def _write_form(
    root,
    name: str,
    shard: str,
    tokens,
    cls,
    dtype: str,
    chunk_rows: int,
    clevel: int,
    codes: bool = False,
    num_codes: int = 0,
    sharded: bool = True,
    codec: str = "auto",
):
    """Write one form through the extractor's own writer; returns the shard group. ``sharded=False``
    writes schema 1's layout (one object per ``chunk_rows`` rows per array, all views in it)."""
    import numpy as np
    import zarr

    from teacher_cache.store import ShardLayout, create_shard_group, open_writer, write_rows

    n, k, t = tokens.shape[:3]
    d = 1 if codes else tokens.shape[3]
    lay = ShardLayout(
        rows=n,
        views=k,
        tokens=t,
        dim=d,
        has_cls=cls is not None and not codes,
        codes=codes,
        dtype=dtype,
        chunk_rows=chunk_rows,
        clevel=clevel,
        num_codes=num_codes,
        codec=codec,
        sharded=sharded,
    )
    tok = root.create_group(name)
    g = create_shard_group(tok, "s0", shard, lay)
    w = open_writer(g)
    c = max(1, min(chunk_rows, n))
    for lo in range(0, n, c):
        hi = min(lo + c, n)
        idx = np.arange(hi - lo)
        flat = tokens[lo:hi].reshape((hi - lo) * k, *tokens.shape[2:])
        fcls = cls[lo:hi].reshape((hi - lo) * k, -1) if cls is not None and not codes else None
        write_rows(w, lo, hi, idx, flat, fcls, lay)
    w.close()
    with zarr.config.set({"array.write_empty_chunks": True}):  # the metadata arrays, as extract_shard writes them
        g["keys"][:] = np.array([f"{i:06d}" for i in range(n)])
        g["seeds"][:], g["boxes"][:] = np.zeros((n, k), np.uint64), np.zeros((n, k, 4), np.int32)
        g["flips"][:], g["valid"][:] = np.zeros((n, k), bool), np.ones(n, dtype=bool)
    return g


def _raw_bytes(g) -> int:
    return sum(int(g[n].nbytes) for n in TARGETS if n in g)


def _cos(a, b) -> float:
    import torch.nn.functional as F

    return float(
        F.cosine_similarity(a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float(), dim=-1).mean()
    )


class CountingStore(WrapperStore):
    """A zarr store wrapper that counts what reads return: ``counter["bytes"]`` and ``counter["gets"]``
    (one per object or byte range) of data (chunks, shards, shard indexes), of those the reads of byte
    ranges (``range_bytes``, ``range_gets``), and apart, metadata (``zarr.json``: ``meta_bytes``)."""

    def __init__(self, store, counter: dict | None = None):
        super().__init__(store)
        self.counter = counter if counter is not None else dict.fromkeys(self.KEYS, 0)

    KEYS = ("bytes", "gets", "range_bytes", "range_gets", "meta_bytes")

    def reset(self) -> None:
        self.counter.update(dict.fromkeys(self.KEYS, 0))

    def _with_store(self, store):
        return type(self)(store, self.counter)

    def _count(self, bufs, keys: list[str], ranged: list[bool]) -> None:
        for b, key, r in zip(bufs, keys, ranged):
            n = len(b) if b is not None else 0
            if key.endswith("zarr.json"):
                self.counter["meta_bytes"] += n
                continue
            self.counter["gets"] += 1
            self.counter["bytes"] += n
            if r:
                self.counter["range_gets"] += 1
                self.counter["range_bytes"] += n

    async def get(self, key, prototype=None, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        self._count([buf], [key], [byte_range is not None])
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        self._count(bufs, [k for k, _ in key_ranges], [r is not None for _, r in key_ranges])
        return bufs


def objects_and_bytes(path: str, tok: str, sid: str, keys: list[str], shard: str, views: int) -> dict:
    """Objects a shard group occupies on disk, and target bytes a loader epoch reads per sample (counted
    through :class:`CountingStore`, in CachedViews' pattern: each row's one view, blocks of 64 rows)."""
    import numpy as np
    import zarr
    from zarr.storage import LocalStore

    from student.data import _hash64
    from student.prefetch import TargetBlocks
    from teacher_cache.store import open_view_reader

    files = sum(len(f) for _, _, f in os.walk(os.path.join(path, tok, sid)))
    store = CountingStore(LocalStore(path, read_only=True))
    g = zarr.open_group(store=store, mode="r")[tok][sid]
    store.reset()  # the group's metadata reads are not the loader's
    vs = np.array([_hash64(0, 0, shard, key) % views for key in keys], dtype=np.int64)
    blocks = TargetBlocks(open_view_reader(g), vs, np.ones(len(keys), bool))
    for i in range(len(keys)):
        blocks.row(i)
    n = len(keys)
    return {
        "objects": files,
        "bytes_per_sample": store.counter["bytes"] / n,
        "gets_per_sample": store.counter["gets"] / n,
    }


def _loader_read(
    g,
    keys: list[str],
    shard: str,
    views: int,
    batch: int,
    dtype: str,
    codebook=None,
    per_sample: bool = False,
    limit: int | None = None,
) -> int:
    """One pass over the shard in CachedViews' order (its ``TargetBlocks`` reads, in one thread); returns
    the samples read."""
    import numpy as np
    import torch

    from student.data import _hash64
    from student.prefetch import TargetBlocks
    from teacher_cache.store import decode_block, open_view_reader

    keys = keys[:limit] if limit else keys
    vs = np.array([_hash64(0, 0, shard, key) % views for key in keys], dtype=np.int64)
    reader = None if per_sample else TargetBlocks(open_view_reader(g), vs, np.ones(len(keys), bool))
    names = [n for n in TARGETS if n in g]
    buf: list[dict] = []
    done = 0
    for i in range(len(keys)):
        v = int(vs[i])
        buf.append({n: g[n][i, v] for n in names} if per_sample else reader.row(i))
        if len(buf) == batch or i == len(keys) - 1:
            t = {n: np.stack([b[n] for b in buf]) for n in buf[0]}
            if codebook is not None:
                codebook[torch.from_numpy(t["tokens"].astype(np.int64))]
            else:
                decode_block(t["tokens"], dtype, t.get("token_scale"))
                if "cls" in t:
                    decode_block(t["cls"], dtype, t.get("cls_scale"))
            done += len(buf)
            buf = []
    return done


def _objects_table(rep, wd: str, shard: str, keys: list[str], tokens, cls, codebook, a) -> dict:
    """Schema 1 (one object per ``chunk_rows`` rows per array, every view in it) vs schema 2 (one object per
    view per target array): objects per shard and per 1,000 samples, and target bytes per training sample."""
    import torch
    import zarr

    n, k, t, d = tokens.shape
    path = os.path.join(wd, "objects.zarr")
    root = zarr.open_group(path, mode="w")
    R = a.objects_rows
    small = torch.randn(R, k, 4, 8)  # the object count does not depend on T or D
    out, rows = {}, []
    forms = [("fp16", "fp16", False), ("int8", "int8", False)]
    if codebook is not None:
        forms.append((f"codes-{len(codebook)}", "fp16", True))
    for form, dtype, is_codes in forms:
        x = tokens
        if is_codes:
            x = (torch.nn.functional.normalize(tokens.reshape(-1, d), dim=-1) @ codebook.T).argmax(-1).reshape(n, k, t)
        xs = torch.randint(0, 8, (R, k, 4)) if is_codes else small
        for sharded in (False, True):
            tag = f"{form}-{'s2' if sharded else 's1'}"
            nc = len(codebook) if is_codes else 0
            c = None if is_codes else cls
            _write_form(root, tag, shard, x, c, dtype, a.chunk_rows, 3, codes=is_codes, num_codes=nc, sharded=sharded)
            big = f"{tag}-{R}"
            _write_form(
                root,
                big,
                f"{shard}-big",
                xs,
                None if is_codes else small[:, :, 0],
                dtype,
                a.chunk_rows,
                3,
                codes=is_codes,
                num_codes=nc,
                sharded=sharded,
            )
            m = objects_and_bytes(path, tag, "s0", keys, shard, k)
            m_big = objects_and_bytes(path, big, "s0", [f"{i:06d}" for i in range(R)], f"{shard}-big", k)
            per_1000 = m_big["objects"] * 1000 / R
            layout = "schema 2: one object per view" if sharded else f"schema 1: chunks of {a.chunk_rows} rows"
            rows.append(
                [
                    form,
                    layout,
                    str(m["objects"]),
                    f"{m_big['objects']} ({per_1000:.0f})",
                    f"{m['bytes_per_sample']:,.0f}",
                    f"{m['gets_per_sample']:.2f}",
                ]
            )
            out[tag] = {"objects_per_shard": m["objects"], "objects_per_1000": per_1000, **m}
    rep.table(
        f"Objects and target bytes read per training sample ({k} views; shard of {n} rows with the teacher's "
        f"{t} x {d} tokens{' + cls' if cls is not None else ''}; object counts also for a shard of {R} rows)",
        [
            "form",
            "layout",
            f"objects per shard ({n} rows)",
            f"objects per shard of {R} rows (per 1,000 samples)",
            "target bytes read per training sample",
            "reads per sample",
        ],
        rows,
        align="llrrrr",
    )
    rep.note(
        "Objects = files under the shard group on disk (its group and array metadata included). Bytes read = "
        "what the loader's reads return through a counting zarr store wrapper (`CountingStore`) over one epoch "
        "in CachedViews' pattern (each row's one view, blocks of 64 rows), divided by the rows; schema 2 counts "
        "the objects' indexes too (16 B per row per object, read once per shard). Schema 1 reads every view of "
        "a chunk of rows; schema 2 one byte range per run of adjacent rows that use the same view."
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, repeats=5, warmup=1)
    p.add_argument("--teacher", default="efficientnet_lite0", help="teacher whose tokens are stored")
    p.add_argument("--num-samples", type=int, default=64, help="images (one shard)")
    p.add_argument("--image-size", type=int, default=64, help="generated image side (px)")
    p.add_argument("--views", type=int, default=2, help="views per image")
    p.add_argument("--chunk-rows", type=int, default=64, help="samples per Zarr chunk (StorageConfig default)")
    p.add_argument(
        "--clevel",
        default="3",
        help="Blosc/zstd level (StorageConfig default 3); a comma list (e.g. 3,0) writes and reads every "
        "form at each level side by side",
    )
    p.add_argument("--pca-dims", default="64,256", help="PCA widths to try ('' skips)")
    p.add_argument("--codebook-size", type=int, default=256, help="k-means codes: codebook size (0 skips)")
    p.add_argument("--batch-size", type=int, default=64, help="loader batch for the read benchmark")
    p.add_argument(
        "--per-sample-rows",
        type=int,
        default=8,
        help="rows read by the one-Zarr-call-per-sample contrast (each call decompresses a whole chunk)",
    )
    p.add_argument(
        "--objects-rows", type=int, default=1000, help="rows of the shard whose objects are counted (tiny tokens)"
    )
    a = p.parse_args(argv)
    threads = C.setup_threads(a.threads)

    import numpy as np
    import torch
    import zarr

    from teacher_cache.config import TeacherConfig
    from teacher_cache.prepare import SyntheticConfig, prepare_synthetic
    from teacher_cache.store import decode_block, stored_bytes
    from teacher_cache.teachers import build_teacher
    from teacher_cache.teachers.kmeans import fit_kmeans

    rep = C.Report("storage", "Storage: bytes per view, compression, read speed (bench/storage.py)", argv)
    result: dict = {"forms": {}}
    with C.workdir(a.workdir) as wd:
        data = os.path.join(wd, "data")
        prepare_synthetic(
            SyntheticConfig(
                out=data,
                num_samples=a.num_samples,
                num_classes=4,
                image_size=a.image_size,
                shard_size=a.num_samples,
                seed=0,
            )
        )
        teacher = build_teacher(TeacherConfig(a.teacher))
        t0 = time.perf_counter()
        shard, keys, tokens, cls = _teacher_tokens(data, teacher, a.views, 32)
        teacher_s = time.perf_counter() - t0
        n, k, t, d = tokens.shape
        root = zarr.open_group(os.path.join(wd, "forms.zarr"), mode="w")
        forms: dict[str, dict] = {}
        clevels = [int(c) for c in str(a.clevel).split(",") if c.strip()]
        lvl = clevels[0]

        for dtype in ("fp32", "fp16", "bf16", "int8"):
            g = _write_form(root, dtype, shard, tokens, cls, dtype, a.chunk_rows, lvl)
            dec = decode_block(
                np.asarray(g["tokens"][:]), dtype, np.asarray(g["token_scale"][:]) if "token_scale" in g else None
            )
            forms[dtype] = {
                "g": g,
                "dtype": dtype,
                "cos": _cos(dec, tokens),
                "extra": 0,
                "note": "store form",
                "args": (tokens, cls, dtype, False, 0),
            }

        flat = tokens.reshape(-1, d)
        try:  # the pca:<teacher> tokenizer's own fit (versions of the project that have it)
            from teacher_cache.teachers.pca import fit_pca
        except ImportError:
            fit_pca = None
        for pd in [int(x) for x in a.pca_dims.split(",") if x.strip()]:
            if pd >= d:
                continue
            fit_on = tokens[:, 0].reshape(-1, d)  # as extract fits it: first view of each sample
            if fit_pca is not None:
                basis = fit_pca(fit_on, pd)
                how = "pca:<teacher> tokenizer (fit_pca on view 0 of every sample)"
            else:  # same maths: top principal directions of the token covariance
                xc = fit_on.double() - fit_on.double().mean(0)
                comps = torch.linalg.eigh(xc.T @ xc)[1].flip(-1)[:, :pd].T
                basis = torch.cat([fit_on.double().mean(0)[None], comps]).float()
                how = "projection computed here (no pca tokenizer in this version)"
            mean, comps = basis[0], basis[1:]
            red = ((tokens - mean) @ comps.T).reshape(n, k, t, pd)
            red_cls = ((cls - mean) @ comps.T) if cls is not None else None  # the tokenizer projects cls too
            g = _write_form(root, f"pca-{pd}", shard, red, red_cls, "fp16", a.chunk_rows, lvl)
            back = torch.from_numpy(np.asarray(g["tokens"][:]).astype(np.float32)).reshape(-1, pd) @ comps + mean
            xc = flat - mean
            explained = float(((xc @ comps.T).var(0).sum()) / xc.var(0).sum())
            forms[f"pca-{pd}"] = {
                "g": g,
                "dtype": "fp16",
                "cos": _cos(back.reshape(tokens.shape), tokens),
                "extra": int(basis.numel()) * 4,
                "note": f"{how}; {100 * explained:.1f}% of token variance kept; fp16",
                "args": (red, red_cls, "fp16", False, 0),
            }
        codebook = None
        if a.codebook_size:
            kk = min(a.codebook_size, flat.shape[0])
            t1 = time.perf_counter()
            centers = fit_kmeans(flat, kk, seed=0)
            fit_s = time.perf_counter() - t1
            codes = (torch.nn.functional.normalize(flat, dim=-1) @ centers.T).argmax(-1).reshape(n, k, t)
            g = _write_form(
                root, f"codes-{kk}", shard, codes, None, "fp16", a.chunk_rows, lvl, codes=True, num_codes=kk
            )
            codebook = centers
            forms[f"codes-{kk}"] = {
                "g": g,
                "dtype": "codes",
                "cos": _cos(centers[codes], tokens),
                "extra": kk * d * 4,
                "note": f"kmeans codes (int16), no cls; fit {fit_s:.1f}s on {flat.shape[0]} tokens",
                "args": (codes, None, "fp16", True, kk),
            }

        if len(clevels) > 1:  # the same forms at the other levels, named "<form> @clevel <c>"
            base_forms = dict(forms)
            forms = {}
            for name, f in base_forms.items():
                for c in clevels:
                    key = f"{name} @clevel {c}"
                    if c == lvl:
                        g = f["g"]
                    else:
                        x, xc, dt, is_codes, nc = f["args"]
                        g = _write_form(
                            root, f"{name}-c{c}", shard, x, xc, dt, a.chunk_rows, c, codes=is_codes, num_codes=nc
                        )
                    forms[key] = {**f, "g": g, "group": g.path.split("/")[0]}

        views = n * k
        fp32_raw = _raw_bytes(next(iter(forms.values()))["g"]) / views  # fp32 comes first
        rows = []
        for name, f in forms.items():
            g = f["g"]
            raw, stored = _raw_bytes(g), stored_bytes(g)
            f.update(raw=raw, stored=stored)
            rows.append(
                [
                    name,
                    f"{stored / views:,.0f}",
                    f"{raw / views:,.0f}",
                    f"{raw / stored:.2f}",
                    f"{fp32_raw / (stored / views):.1f}",
                    f"{f['cos']:.4f}",
                    C.fmt_bytes(f["extra"]) if f["extra"] else "-",
                    f["note"],
                ]
            )
            result["forms"][name] = {
                "bytes_per_view": stored / views,
                "raw_bytes_per_view": raw / views,
                "compression": raw / stored,
                "vs_fp32_raw": fp32_raw / (stored / views),
                "cos": f["cos"],
            }
        rep.table(
            f"Bytes per view: {a.teacher} ({t} tokens x {d} dims{' + cls' if cls is not None else ''}), "
            f"{n} images x {k} views, write blocks of {a.chunk_rows} rows, codec auto (float features raw; "
            f"codes Blosc zstd clevel {a.clevel} + bitshuffle) "
            f"(teacher ran {teacher_s:.1f}s)",
            [
                "form",
                "stored B/view",
                "raw B/view",
                "compression (raw/stored)",
                "vs fp32 raw",
                "cos to fp32",
                "one-off per tokenizer",
                "note",
            ],
            rows,
            align="lrrrrrrl",
        )

        # --- objects per shard and target bytes a training read fetches: schema 1 vs schema 2
        result["objects"] = _objects_table(rep, wd, shard, keys, tokens, cls, codebook, a)

        # --- read throughput in CachedViews' access pattern, all forms interleaved
        variants = {}
        for name, f in forms.items():
            cb = codebook if f["dtype"] == "codes" else None
            dt = "fp16" if f["dtype"] == "codes" else f["dtype"]

            def loader(name=f.get("group", name), cb=cb, dt=dt):
                g = zarr.open_group(os.path.join(wd, "forms.zarr"), mode="r")[name]["s0"]
                return _loader_read(g, keys, shard, k, a.batch_size, dt, cb)

            def per_sample(name=f.get("group", name), cb=cb, dt=dt):
                g = zarr.open_group(os.path.join(wd, "forms.zarr"), mode="r")[name]["s0"]
                return _loader_read(g, keys, shard, k, a.batch_size, dt, cb, per_sample=True, limit=a.per_sample_rows)

            variants[f"{name}|chunk"] = loader
            variants[f"{name}|sample"] = per_sample
        times = C.interleave(variants, warmup=a.warmup, repeats=a.repeats)
        read_rows = []
        for name, f in forms.items():
            tc = C.median(times[f"{name}|chunk"])
            ts = C.median(times[f"{name}|sample"]) * n / min(n, a.per_sample_rows or n)  # per-pass equivalent
            g = f["g"]
            per_view_floats = int(np.prod(g["tokens"].shape[2:])) * (d if f["dtype"] == "codes" else 1)
            per_view_floats += int(np.prod(g["cls"].shape[2:])) if "cls" in g else 0
            read_rows.append(
                [
                    name,
                    f"{n / tc:,.0f}",
                    f"{f['stored'] / tc / 2**20:.1f}",
                    f"{n * per_view_floats * 4 / tc / 2**20:.1f}",
                    f"{n / ts:,.0f}",
                    f"{ts / tc:.1f}x",
                ]
            )
            result["forms"][name].update(read_samples_per_s=n / tc, per_sample_samples_per_s=n / ts)
        rep.table(
            f"Zarr read in the loader's pattern ({n} samples of one shard in stream order, one view each, "
            f"batches of {a.batch_size}; medians of {a.repeats} interleaved passes, {threads} thread(s))",
            [
                "form",
                "samples/s (block reads, as CachedViews)",
                "stored MiB (all views) / read time",
                "fp32 targets delivered MiB/s",
                f"samples/s (one Zarr call per sample; first {min(n, a.per_sample_rows or n)} rows)",
                "block-read speedup",
            ],
            read_rows,
        )
        rep.note(
            "The loader reads each row's one view (a byte range per run of adjacent rows sharing a view), so "
            "'stored MiB / read time' counts every view stored and 'delivered' only the targets handed to the batch. "
            "Stored bytes are what `stored_bytes()` (Zarr `nbytes_stored`) reports for the target arrays; "
            "keys/seeds/boxes/flips/valid add a few bytes per sample and are not counted. "
            "'cos to fp32' of a PCA form is that of its reconstruction from the stored coefficients."
        )
    rep.append(a.results)
    return result


if __name__ == "__main__":
    main()
