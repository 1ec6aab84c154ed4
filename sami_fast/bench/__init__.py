"""Benchmark core shared by ``sami-fast bench`` and the pytest-benchmark suites.

A topic module (``sami_fast.bench.mi_loss`` ...) exposes ``cases(device, size)``
returning :class:`Case` objects; :func:`measure` times one case and records the
extra peak memory its run needs over what existed after its setup.

Peak memory on CUDA is ``max_memory_allocated``. On CPU it is the process's
resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``
before each run; glibc is told to serve large blocks with mmap and to return
freed memory at once, so what a run allocates and frees shows up in RSS rather
than hiding in the allocator's free lists.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

TOPICS = ("mi_loss", "batch_logprobs", "sequence_logprobs", "sami_step")
RESULT_FIELDS = ("kernel", "provider", "mode", "metric", "x", "y", "device", "date")


class CaseSkipped(Exception):
    """Raised by a case's setup when this machine cannot run it (e.g. not enough memory)."""


def available_memory_bytes(device: str) -> int:
    """Memory a case may still take on ``device``: free GPU memory, or Linux's MemAvailable."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


@dataclass
class Case:
    kernel: str
    provider: str
    x: str
    setup: Callable[[], Callable[[], object]]
    flops: float | None = None
    mode: str = "forward+backward"
    notes: dict = field(default_factory=dict)


def load_cases(topic: str, device: str, size: str) -> list[Case]:
    import importlib

    if topic not in TOPICS:
        raise ValueError(f"topic must be one of {', '.join(TOPICS)}, got {topic!r}")
    return importlib.import_module(f"sami_fast.bench.{topic}").cases(device, size)


# ---------------------------------------------------------------- CPU memory
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _configure_malloc() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 16)


def _release_free_memory() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_mb(run: Callable[[], object]) -> float:
    _release_free_memory()
    if not _reset_rss_peak():
        return float("nan")
    base = _status_kib("VmRSS")
    run()
    peak = _status_kib("VmHWM")
    return max(peak - base, 0) / 1024


def _cuda_peak_mb(run: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------- timing
def _time_ms(run: Callable[[], object], device: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(case: Case, device: str, repeats: int | None = None, warmup: int = 1) -> dict:
    """Median time (ms) of ``repeats`` runs after ``warmup`` and the run's extra peak memory (MB)."""
    if device == "cpu":
        _configure_malloc()
    run = case.setup()
    for _ in range(warmup):
        run()
    if repeats is None:
        repeats = 20 if device == "cuda" else 3
    times = _time_ms(run, device, repeats)
    peak = _cuda_peak_mb(run) if device == "cuda" else _cpu_peak_mb(run)
    result = {"time_ms": statistics.median(times), "peak_mb": peak}
    if case.flops:
        result["tflops"] = case.flops / (result["time_ms"] * 1e-3) / 1e12
    del run
    _release_free_memory()
    return result


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} (CPU)"


# ---------------------------------------------------------------- output
def _kernel_table(rows: list[dict]) -> list[list[str]]:
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    baseline = providers[0]  # each topic lists the original/naive composition first
    groups: dict[str, dict] = {}
    for r in rows:
        groups.setdefault(r["x"], {})[r["provider"]] = r
    header = ["x"] + [f"{p} {unit}" for p in providers for unit in ("ms", "MB")]
    ours = [p for p in providers[1:] if p.startswith("sami_fast")]
    header += [f"{p} speed-up" for p in ours]
    lines = [[rows[0]["kernel"]] + [""] * (len(header) - 1), header]
    for x, by_provider in groups.items():
        line = [x]
        for p in providers:
            r = by_provider.get(p, {})
            if "time_ms" in r:
                line += [f"{r['time_ms']:.2f}", f"{r['peak_mb']:.1f}"]
            else:
                line += ["error" if "error" in r else "skipped" if "skipped" in r else "-", "-"]
        base = by_provider.get(baseline, {})
        for p in ours:
            r = by_provider.get(p, {})
            ok = "time_ms" in r and "time_ms" in base
            line.append(f"x{base['time_ms'] / r['time_ms']:.2f}" if ok else "-")
        lines.append(line)
    return lines


def format_table(rows: list[dict]) -> str:
    """Side by side: one table per kernel, a column pair (ms, MB) per provider, and the
    speed-up of each sami_fast provider over the kernel's first (original) provider."""
    blocks = []
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        lines = _kernel_table([r for r in rows if r["kernel"] == kernel])
        widths = [max(len(line[i]) for line in lines[1:]) for i in range(len(lines[1]))]
        text = [lines[0][0]] + ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines[1:]]
        blocks.append("\n".join(text))
    return "\n\n".join(blocks)


def append_results(path: str, rows: list[dict], device: str) -> None:
    """Append Liger-style rows (kernel, provider, mode, metric, x, y, device, date) to a CSV."""
    date = datetime.date.today().isoformat()
    name = device_name(device)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(RESULT_FIELDS)
        for r in rows:
            if "error" in r or "skipped" in r:
                continue
            for metric in ("time_ms", "peak_mb", "tflops"):
                if metric in r:
                    writer.writerow([r["kernel"], r["provider"], r["mode"], metric, r["x"], f"{r[metric]:.4g}", name,
                                     date])


def run_cases(cases: list[Case], device: str, repeats: int | None = None, log=print) -> list[dict]:
    """Measure every case; a failing case is reported and the rest still run."""
    rows = []
    for case in cases:
        row = {"kernel": case.kernel, "provider": case.provider, "x": case.x, "mode": case.mode}
        try:
            row.update(measure(case, device, repeats))
            log(f"  {case.kernel:<18} {case.provider:<20} {case.x:<28} {row['time_ms']:10.2f} ms "
                f"{row['peak_mb']:10.1f} MB")
        except CaseSkipped as reason:
            row["skipped"] = str(reason)
            log(f"  {case.kernel:<18} {case.provider:<20} {case.x:<28} skipped: {reason}")
        except Exception as exc:  # keep going: one broken provider must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"
            log(f"  {case.kernel:<18} {case.provider:<20} {case.x:<28} ERROR {row['error']}")
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows
