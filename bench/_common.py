"""Shared helpers of the benchmark scripts: machine info, timing (warmup + median of repeats, variants
interleaved round-robin so a noisy neighbour hits every variant alike), stage timers that wrap project
functions without editing them, table printing, and appending a markdown section to BENCHMARKS.md.

Every script does ``main(argv) -> dict`` (the numbers it measured) so tests can run it at a tiny size
with ``--results <temp file>``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RESULTS = os.path.join(REPO, "BENCHMARKS.md")
NO_GPU = "not measured (no GPU in this session)"

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


# ---------------------------------------------------------------------------------------------
# arguments and setup


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def parser(description: str, *, repeats: int = 5, warmup: int = 1, threads: int | None = 1) -> argparse.ArgumentParser:
    """An argparse parser with the flags every script shares; ``description`` is the script's docstring."""
    p = argparse.ArgumentParser(description=description, formatter_class=_Help)
    p.add_argument(
        "--results",
        default=DEFAULT_RESULTS,
        help="markdown file the results section is appended to ('-' or '' : do not append)",
    )
    p.add_argument("--repeats", type=int, default=repeats, help="timed repeats per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed warmup runs per variant")
    p.add_argument(
        "--threads",
        type=int,
        default=threads,
        help="torch intra-op threads in this process (0: torch's default, one per core; on a shared "
        "machine two threads per process oversubscribe the cores and run slower than one)",
    )
    p.add_argument("--workdir", default=None, help="scratch directory (default: a fresh temporary directory)")
    return p


def setup_threads(n: int | None) -> int:
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


@contextlib.contextmanager
def workdir(path: str | None):
    """``path`` (created) or a temporary directory removed afterwards."""
    if path:
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="digpt-bench-") as d:
        yield d


# ---------------------------------------------------------------------------------------------
# machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_count_proc() -> int | None:
    try:
        with open("/proc/cpuinfo") as f:
            return sum(1 for line in f if line.startswith("processor"))
    except OSError:
        return None


def _nproc() -> int:
    try:
        # GNU nproc reports OMP_NUM_THREADS when it is set (the benches set it to 1): ask without it
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
        return int(subprocess.run(["nproc"], capture_output=True, text=True, timeout=5, env=env).stdout.strip())
    except Exception:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def code_version() -> str:
    """``git`` commit of the tree the numbers come from, ``+ uncommitted changes`` when it is dirty."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha or "unknown") + (" + uncommitted changes" if dirty else "")
    except Exception:
        return "unknown"


def machine_info() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": _cpu_model(),
        "cpus_in_cpuinfo": _cpu_count_proc(),
        "nproc": _nproc(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    m = info or machine_info()
    load = " / ".join(f"{x:.2f}" for x in m["load_avg"]) if m.get("load_avg") else "n/a"
    return (
        f"CPU: {m['cpu']} ({m['cpus_in_cpuinfo']} in /proc/cpuinfo, nproc {m['nproc']}); "
        f"torch {m['torch']} ({m['torch_threads']} intra-op threads); GPU: {m['gpu']}; "
        f"Python {m['python']}; load average at start (1/5/15 min): {load}"
    )


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync(device: Any = None) -> None:
    """Wait for queued GPU work (no-op on CPU) so wall-clock timing is honest."""
    import torch

    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# timing


def time_once(fn: Callable[[], Any], device: Any = None) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def repeat(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5, device: Any = None) -> list[float]:
    """Seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [time_once(fn, device)[0] for _ in range(repeats)]


def interleave(
    variants: dict[str, Callable[[], Any]],
    warmup: int = 1,
    repeats: int = 5,
    device: Any = None,
    on_result: Callable[[str, Any], None] | None = None,
) -> dict[str, list[float]]:
    """Time several variants side by side: round ``r`` runs each once, starting at a rotating offset, so
    a neighbour's burst or a thermal drift lands on all of them alike. Returns seconds per variant.

    ``on_result(name, value)`` sees every timed call's return value (e.g. to collect stage timings)."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for j in range(len(names)):
            n = names[(r + j) % len(names)]
            dt, value = time_once(variants[n], device)
            out[n].append(dt)
            if on_result is not None:
                on_result(n, value)
    return out


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> str:
    """``min-max`` of a sample, for the tables (how noisy a median is)."""
    return f"{min(xs):.3g}–{max(xs):.3g}" if xs else "n/a"


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``: robust when the machine's speed drifts between rounds."""
    return median(a / b for a, b in zip(num, den) if b > 0)


def matmul_peak(device: Any, dtype: Any, n: int | None = None, repeats: int = 10) -> dict[str, float]:
    """The machine's measured matrix-multiply rate: ``n x n x n`` products in ``dtype`` on ``device`` at this
    process's torch thread count, the median of ``repeats`` timed after 3 warmups, in FLOP/s (2 n^3 per
    product). The ceiling the step-efficiency and extraction fractions divide by: measured here, not a
    datasheet's. On CUDA, fp32 is plain fp32 (TF32 off for the measurement)."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    tf32 = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        times = repeat(lambda: a @ b, warmup=3, repeats=repeats, device=device)
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    t = median(times)
    return {"flops": 2 * n**3 / t, "n": n, "seconds": t, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# stage timers: wrap project functions (module globals) without editing the project


class StageTimer:
    """Accumulates seconds per label. ``patch(module, name, label)`` replaces ``module.name`` by a timed
    wrapper until :meth:`restore`; generator functions are timed per ``next()`` (``iterator=True``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._saved: list[tuple[Any, str, Any]] = []

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def patch(self, module: Any, name: str, label: str, iterator: bool = False) -> None:
        orig = getattr(module, name)
        timer = self

        if iterator:

            def wrapped(*a, **k):
                it = iter(orig(*a, **k))
                while True:
                    t0 = time.perf_counter()
                    try:
                        item = next(it)
                    except StopIteration:
                        timer.seconds[label] += time.perf_counter() - t0
                        return
                    timer.seconds[label] += time.perf_counter() - t0
                    timer.calls[label] += 1
                    yield item
        else:

            def wrapped(*a, **k):
                t0 = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    timer.seconds[label] += time.perf_counter() - t0
                    timer.calls[label] += 1

        wrapped.__wrapped__ = orig  # type: ignore[attr-defined]
        setattr(module, name, wrapped)
        self._saved.append((module, name, orig))

    def restore(self) -> None:
        for module, name, orig in reversed(self._saved):
            setattr(module, name, orig)
        self._saved.clear()

    def __enter__(self) -> StageTimer:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


# ---------------------------------------------------------------------------------------------
# tables and the results file


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one char per column (``l`` or ``r``), default: first left, rest right."""
    align = align or ("l" + "r" * (len(headers) - 1))
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(vals, widths, align)) + " |"

    sep = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1)) for w, a in zip(widths, align))
        + "|"
    )
    return "\n".join([line([str(h) for h in headers]), sep, *(line(r) for r in cells)])


def command_line(script: str, argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"bench/{script}.py", *(shlex.quote(a) for a in args)])


HEADER = """# Benchmarks

Results of the scripts in `bench/` (issue #5). Run `python bench/<name>.py --help`.
"""


class Report:
    """Collects the tables and notes of one run, prints them as they come, appends them at the end."""

    def __init__(self, script: str, title: str, argv: Sequence[str] | None):
        self.script, self.title = script, title
        self.command = command_line(script, argv)
        self.machine = machine_info()
        self.started = _dt.datetime.now().astimezone()
        self.parts: list[str] = []
        print(f"# {title}\n{machine_line(self.machine)}\n$ {self.command}\n", flush=True)

    def table(
        self, caption: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None
    ) -> str:
        t = table(headers, rows, align)
        self.parts.append(f"**{caption}**\n\n{t}")
        print(f"{caption}\n{t}\n", flush=True)
        return t

    def note(self, text: str) -> None:
        self.parts.append(text)
        print(text + "\n", flush=True)

    def markdown(self) -> str:
        took = (_dt.datetime.now().astimezone() - self.started).total_seconds()
        head = [
            f"## {self.title} — {self.started.strftime('%Y-%m-%d %H:%M %Z')}",
            "",
            f"- command: `{self.command}`",
            f"- machine: {machine_line(self.machine)}",
            f"- code: {code_version()}",
            f"- date: {self.started.isoformat(timespec='seconds')}; took {took:.0f} s",
            "",
        ]
        return "\n".join(head) + "\n" + "\n\n".join(self.parts) + "\n"

    def append(self, path: str | None) -> str | None:
        if not path or path == "-":
            return None
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, "a", encoding="utf-8") as f:
            if new:
                f.write(HEADER + "\n")
            f.write("\n" + self.markdown())
        print(f"appended to {path}", flush=True)
        return path


# ---------------------------------------------------------------------------------------------
# small formatting helpers


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "no")
