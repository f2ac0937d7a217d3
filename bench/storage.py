"""Storage: bytes per view for each storage form, the Blosc/zstd compression ratio, and Zarr read speed
in the student loader's access pattern.

One teacher runs once over generated images; its tokens are then written in every form through the
store's own code (``create_shard_group`` + the extractor's chunk writer ``_write_rows``, the exact path
``digpt extract`` takes):

* ``fp32``, ``fp16``, ``bf16``, ``int8`` (per-token absmax scale) — the forms ``StorageConfig.dtype`` offers;
* ``pca-<d>`` — the ``pca:<teacher>`` tokenizer's form: tokens (and cls) projected on the top-``d``
  principal directions fit with its ``fit_pca`` (view 0 of every sample), stored fp16; the basis
  (``(d + 1) x D`` fp32) is a one-off per tokenizer, listed apart;
* ``codes-<k>`` — k-means codes (the ``kmeans:<teacher>`` tokenizer's int16 layout), codebook apart.

Compression ratio = raw bytes of the target arrays in their stored dtype (``tokens``, ``token_scale``,
``cls``, ``cls_scale``) / bytes on disk (``nbytes_stored``); "vs fp32" = fp32 raw bytes / bytes on disk.
Fidelity = mean cosine similarity of the decoded tokens to the fp32 teacher tokens.

Read speed replays what ``CachedViews`` does for one shard: rows in stream (index) order, one view per
sample chosen by the same hash, through ``student.data._ChunkReader`` (one Zarr read per chunk of rows),
then ``decode_block`` per batch (codes: codebook lookup). For contrast, the same rows read with one Zarr
call per sample. The files were just written, so this measures decompression + Zarr overhead from the
page cache, not the disk.

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

from bench import _common as C


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
):
    """Write one form through the extractor's own writer; returns the shard group."""
    import numpy as np

    from teacher_cache.store import ShardLayout, create_shard_group
    from teacher_cache.store import write_rows as _write_rows

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
    )
    tok = root.create_group(name)
    g = create_shard_group(tok, "s0", shard, lay)
    c = max(1, min(chunk_rows, n))
    for lo in range(0, n, c):
        hi = min(lo + c, n)
        idx = np.arange(hi - lo)
        flat = tokens[lo:hi].reshape((hi - lo) * k, *tokens.shape[2:])
        fcls = cls[lo:hi].reshape((hi - lo) * k, -1) if cls is not None and not codes else None
        _write_rows(g, lo, hi, idx, flat, fcls, lay)
    g["valid"][:] = np.ones(n, dtype=bool)
    return g


def _raw_bytes(g) -> int:
    return sum(int(g[n].nbytes) for n in ("tokens", "token_scale", "cls", "cls_scale") if n in g)


def _cos(a, b) -> float:
    import torch.nn.functional as F

    return float(
        F.cosine_similarity(a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float(), dim=-1).mean()
    )


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
    """One pass over the shard in CachedViews' order; returns the samples read."""
    import numpy as np
    import torch

    from student.data import _ChunkReader, _hash64
    from teacher_cache.store import decode_block

    reader = None if per_sample else _ChunkReader(g)
    names = [n for n in ("tokens", "token_scale", "cls", "cls_scale") if n in g]
    buf: list[dict] = []
    done = 0
    keys = keys[:limit] if limit else keys
    for i, key in enumerate(keys):
        v = _hash64(0, 0, shard, key) % views
        buf.append({n: g[n][i, v] for n in names} if per_sample else reader.row(i, v))
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
            f"{n} images x {k} views, chunk {a.chunk_rows} rows, Blosc zstd clevel {a.clevel} + bitshuffle "
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
                "samples/s (chunk reads, as CachedViews)",
                "stored MiB/s read (all views)",
                "fp32 targets delivered MiB/s",
                f"samples/s (one Zarr call per sample; first {min(n, a.per_sample_rows or n)} rows)",
                "chunk-read speedup",
            ],
            read_rows,
        )
        rep.note(
            "Chunk reads fetch every view of a chunk's rows while the loader uses one view per sample, so "
            "'stored MiB/s read' counts all views and 'delivered' only the targets handed to the batch. "
            "Stored bytes are what `stored_bytes()` (Zarr `nbytes_stored`) reports for the target arrays; "
            "keys/seeds/boxes/flips/valid add a few bytes per sample and are not counted. "
            "'cos to fp32' of a PCA form is that of its reconstruction from the stored coefficients."
        )
    rep.append(a.results)
    return result


if __name__ == "__main__":
    main()
