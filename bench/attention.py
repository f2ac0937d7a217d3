"""Attention kernels at D-iGPT shapes: forward + backward time and peak memory.

Shapes (``batch x heads x L x head_dim``), masks exactly as ``DiGPT`` builds its encoder mask:

* **clusters**: L = 148 — 3 visible clusters of 7x7 = 49 patches in permutation order + the class token,
  block-causal (``AttnMask(49, n_prefix=1, prefix="last")``: the official D-iGPT encoder);
* **per-patch**: L = 196 — 195 visible patches in permutation order + the class token, causal per patch
  (``AttnMask(1, n_prefix=1, prefix="last")``: D-iGPT with ``cluster_size=1``).

Implementations (``student.attention.attend``):

* ``eager`` — dense boolean mask, ``softmax(QK^T/sqrt d) V`` by hand: the **reference**;
* ``sdpa_dense`` — ``scaled_dot_product_attention`` with the dense mask built on every call;
* ``sdpa`` — the training path: permutation order, one block/causal mask per shape, cached;
* ``flex`` — FlexAttention with a cached block mask (compiled), **CUDA only** here ("n/a (no GPU)" otherwise).

Time: forward + backward (``out.backward(grad)``), variants interleaved, medians. Peak memory: on CUDA
``max_memory_allocated`` above the inputs; on CPU the peak of live tensor bytes above the inputs from the
torch profiler's memory timeline (``profile_memory=True``), a separate untimed pass.
Targets: GPU — ``flex``/``sdpa`` <= 0.5x the eager reference in time and memory; CPU — ``sdpa`` no slower
than ``sdpa_dense``.

    python bench/attention.py                                  # CPU: batch 8, 12 heads x 64, fp32
    python bench/attention.py --batch 64 --heads 12 --device cuda --dtype bf16
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from bench import _common as C

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU profiler's C++ log lines are noise here

IMPLS = ("eager", "sdpa_dense", "sdpa", "flex")


def shapes(which: str):
    from student.attention import AttnMask

    out = {
        "clusters (148 = 3x49 + cls)": (148, AttnMask(49, n_prefix=1, prefix="last")),
        "per-patch (196 = 195 + cls)": (196, AttnMask(1, n_prefix=1, prefix="last")),
    }
    if which == "all":
        return out
    return {k: v for k, v in out.items() if k.startswith(which)}


def _cpu_peak(fn) -> int | None:
    """Peak live tensor bytes created inside ``fn`` (CPU), from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action

        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            fn()
        live = peak = 0
        for _, action, (key, _version), size in prof._memory_profile().timeline:
            if getattr(key, "device", None) is not None and key.device.type != "cpu":
                continue
            if action == Action.CREATE:
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        return peak
    except Exception as e:  # private API; report n/a rather than a wrong number
        print(f"CPU peak memory unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, repeats=30, warmup=3)
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.add_argument("--heads", type=int, default=12, help="attention heads (ViT-B: 12)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (ViT-B: 64)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--shape", default="all", choices=("all", "clusters", "per-patch"), help="which sequence layout(s)")
    a = p.parse_args(argv)
    threads = C.setup_threads(a.threads)

    import torch

    from student.attention import attend, flex_available
    from teacher_cache.runtime import resolve_device

    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        a.dtype or ("bf16" if cuda else "fp32")
    ]
    impls = [i for i in IMPLS if i != "flex" or (cuda and flex_available()[0])]
    rep = C.Report("attention", "Attention at D-iGPT shapes (bench/attention.py)", argv)
    result: dict = {}
    rows = []
    for label, (length, mask) in shapes(a.shape).items():
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (
            torch.randn(a.batch, a.heads, length, a.head_dim, generator=g).to(device, dtype).requires_grad_()
            for _ in range(3)
        )
        grad = torch.randn(a.batch, a.heads, length, a.head_dim, generator=g).to(device, dtype)

        def run(impl):
            for t in (q, k, v):
                t.grad = None
            attend(q, k, v, mask, impl).backward(grad)

        # correctness guard: every impl must agree with the reference before it is timed
        ref = attend(q, k, v, mask, "eager").float()
        for impl in impls:
            err = (attend(q, k, v, mask, impl).float() - ref).abs().max().item()
            if err > (1e-3 if dtype == torch.float32 else 5e-2):
                raise RuntimeError(f"{impl} disagrees with the eager reference by {err:.3g} at {label}")
        times = C.interleave(
            {i: (lambda i=i: run(i)) for i in impls}, warmup=a.warmup, repeats=a.repeats, device=device
        )
        peaks: dict[str, int | None] = {}
        for impl in impls:
            if cuda:
                run(impl)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run(impl)
                torch.cuda.synchronize()
                peaks[impl] = torch.cuda.max_memory_allocated() - base
            else:
                run(impl)
                peaks[impl] = _cpu_peak(lambda impl=impl: run(impl))
        for impl in IMPLS:
            if impl not in impls:
                why = "n/a (no GPU)" if not cuda else "n/a (FlexAttention unavailable)"
                rows.append([label, impl, why, why, why, why, why])
                continue
            t = C.median(times[impl])
            vs_ref = C.paired_ratio(times[impl], times["eager"])
            vs_dense = C.paired_ratio(times[impl], times["sdpa_dense"])
            pk = peaks.get(impl)
            pk_ref = peaks.get("eager")
            mem_ratio = f"{pk / pk_ref:.2f}x" if pk is not None and pk_ref else "n/a"
            rows.append(
                [
                    label,
                    impl + (" (reference)" if impl == "eager" else ""),
                    C.fmt_ms(t),
                    f"{vs_ref:.2f}x",
                    f"{vs_dense:.2f}x",
                    C.fmt_bytes(pk) if pk is not None else "n/a",
                    mem_ratio,
                ]
            )
            result.setdefault(label, {})[impl] = {
                "ms": 1e3 * t,
                "vs_eager": vs_ref,
                "vs_sdpa_dense": vs_dense,
                "peak_bytes": pk,
            }
    mem_how = (
        "CUDA max_memory_allocated above inputs"
        if cuda
        else "CPU: torch profiler memory timeline, live tensor bytes above inputs"
    )
    rep.table(
        f"Forward + backward, batch {a.batch} x {a.heads} heads x L x {a.head_dim}, {str(dtype).replace('torch.', '')}, "
        f"device {device}, {threads} thread(s); medians of {a.repeats} interleaved rounds; peak memory: {mem_how}",
        ["sequence", "impl", "ms fwd+bwd", "time vs eager", "time vs sdpa_dense", "peak memory", "memory vs eager"],
        rows,
        align="llrrrrr",
    )
    if not cuda:
        rep.note(f"GPU rows (sdpa / flex vs eager, target <= 0.5x time and memory): {C.NO_GPU}.")
    rep.append(a.results)
    return result


if __name__ == "__main__":
    main()
