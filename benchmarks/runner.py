"""The benchmark runner: candidates side by side, a correctness gate, interleaved timing, memory.

A suite module (``benchmarks.suites.loss`` ...) gives ``cases(device, size)``: a list of
:class:`Case`, one per shape. A case builds its inputs once per candidate, knows its
float64 truth and the plain same-dtype computation (for the gate), and lists its
:class:`Candidate` objects: the original-style composition(s), each sami_fast backend
the device has, and the peers (other libraries). A candidate that cannot run here
carries the reason (``"not installed"``, ``"CUDA only"``) and stays in every table and
in the CSV as a row saying so.

Per case: every runnable candidate is set up, run once and checked against the float64
truth by the oracle rule of ``tests/oracle.py`` (values and gradients); a candidate that
fails is reported as ``wrong`` and never timed or ranked. That run is the warm-up (a
short case gets a second one, which also sizes the loops that time a run under 20 ms
in samples of about 20 ms). Then ``repeats`` rounds A B C A B C ... (interleaved, so a
load change on a shared machine hits every candidate alike): the median and the
min-max spread. Then one run each for the peak memory: CUDA
``max_memory_allocated`` over what existed before the run, CPU the resident-set
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) over the RSS before
the run, after ``malloc_trim`` has handed the allocator's free memory back to the system,
so that what the run allocates shows up in RSS even where it reuses freed blocks (the
allocator keeps its default settings: every candidate is timed as its users run it).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import datetime
import gc
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("loss", "logprobs", "step")
ROLES = ("original", "sami_fast", "peer")
MIN_SAMPLE_MS = 20.0  # shorter runs are repeated within one timed sample, so timer noise stays small
WARM_RERUN_MS = 1000.0  # a gate run shorter than this is followed by a second warm-up run
CSV_FIELDS = ("suite", "case", "candidate", "role", "metric", "value", "spread", "device", "threads",
              "torch", "triton", "transformers", "commit", "date")


class CaseSkipped(Exception):
    """Raised by a case's setup when this machine cannot run it (e.g. not enough memory)."""


@dataclass
class Candidate:
    """One implementation of a case's computation.

    ``setup()`` builds the inputs and returns ``run``: one forward+backward returning the
    tensors the gate checks (the output first, then the gradients), in the order of the
    case's ``truth``, and keeping no gradient itself (so that the next run's peak memory
    includes the gradients it makes, as in a training step that starts from none).
    ``unavailable``: why it cannot run on this device (it is then a row saying so, never dropped).
    """

    name: str
    role: str
    setup: Callable[[], Callable[[], Sequence[torch.Tensor]]] | None = None
    unavailable: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")


@dataclass
class Case:
    """One shape of a suite: its candidates and what the gate compares them with.

    ``reference()`` returns ``(truth, plain, floors)``: the float64 results, the plain
    same-dtype results (the original composition) and the least noise credited to plain
    per result (``tests/oracle.py``'s ``tiny``), each a sequence in the candidates'
    output order. ``params`` are the numbers a plot can put on its x axis.
    """

    suite: str
    kernel: str
    name: str
    candidates: list[Candidate]
    reference: Callable[[], tuple]
    params: dict = field(default_factory=dict)
    result_names: tuple = ("value",)


@contextlib.contextmanager
def _backend_environment(backend: str):
    previous = os.environ.get("SAMI_FAST_BACKEND")
    os.environ["SAMI_FAST_BACKEND"] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SAMI_FAST_BACKEND", None)
        else:
            os.environ["SAMI_FAST_BACKEND"] = previous


def with_backend(backend: str, run: Callable[[], object]):
    """``run()`` (a forward and its backward) with sami_fast's ops on ``backend``; the one
    place the benchmarks choose a backend."""
    with _backend_environment(backend):
        return run()


def sami_fast_backends(device: str) -> dict[str, str | None]:
    """sami_fast's backends on ``device``: name -> None (runs here) or why it does not."""
    if device == "cuda":
        return {"torch": None, "triton": None}
    return {"torch": None, "triton": "CUDA only (CPU: Triton's interpreter, for tests)"}


def module_missing(name: str) -> str | None:
    """None when ``name`` imports, else why not ("not installed", or the import error)."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        return "not installed"
    except Exception as error:  # a broken build (e.g. a GPU-only wheel) is a reason, not a crash
        return f"import fails: {type(error).__name__}"
    return None


# ---------------------------------------------------------------- memory
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


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


def peak_memory_mb(run: Callable[[], object], device: str) -> float:
    """Extra peak memory (MiB) of one ``run()`` over what existed before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _release_free_memory()
    if not _reset_rss_peak():
        return float("nan")
    base = _status_kib("VmRSS")
    run()
    return max(_status_kib("VmHWM") - base, 0) / 1024


def available_memory_bytes(device: str) -> int:
    """Memory a case may still take on ``device``: free GPU memory, or Linux's MemAvailable."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


# ---------------------------------------------------------------- gate and timing
def gate(outputs: Sequence[torch.Tensor], truth, plain, floors, names, k: float) -> str | None:
    """None when every output is finite and within the oracle rule, else what is wrong."""
    from tests.oracle import oracle_excess

    if len(outputs) != len(truth):
        return f"returned {len(outputs)} results, expected {len(truth)} ({', '.join(names)})"
    names = [names[i] if i < len(names) else f"result {i}" for i in range(len(truth))]
    for name, ours, true, same, tiny in zip(names, outputs, truth, plain, floors):
        if ours is None:
            return f"no {name}"
        ours = ours.detach()
        if ours.shape != true.shape:
            return f"{name} has shape {tuple(ours.shape)}, expected {tuple(true.shape)}"
        if not torch.isfinite(ours).all():
            return f"{name} not finite"
        error, allowed = oracle_excess(ours.to(same.dtype), same, true, k=k, tiny=tiny)
        if error > allowed:
            return f"{name} off by {error:.2e} > {allowed:.2e} allowed"
    return None


def _timed(run: Callable[[], object], device: str) -> float:
    """Milliseconds of one ``run()``."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) * 1e3


def _looped(run: Callable[[], object], count: int) -> Callable[[], None]:
    def looped():
        for _ in range(count):
            run()

    return looped


def _row(case: Case, candidate: Candidate, **result) -> dict:
    return {"suite": case.suite, "kernel": case.kernel, "case": case.name, "candidate": candidate.name,
            "role": candidate.role, "params": case.params, **result}


class _Progress:
    """A progress bar over (case, candidate) steps: tqdm when installed, else a counter line."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.done, self.total, self.enabled = None, 0, total, enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_description_str(label[:60])
            self.bar.update()
        elif self.enabled:
            print(f"\r[{self.done}/{self.total}] {label[:60]:<60}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def run_case(case: Case, device: str, repeats: int, k: float = 8.0, progress: _Progress | None = None) -> list[dict]:
    """Rows for every candidate of ``case``: measured, or why not (unavailable, wrong, error, skipped)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    progress = progress or _Progress(0, enabled=False)
    rows, runs, first_ms = {}, {}, {}
    try:
        truth, plain, floors = case.reference()
    except Exception as error:  # without the truth nothing can be checked, so nothing is timed
        status = "skipped" if isinstance(error, CaseSkipped) else "error"
        reason = str(error) if isinstance(error, CaseSkipped) else f"reference failed: {type(error).__name__}: {error}"
        for _ in case.candidates:
            progress.step(case.name)
        return [_row(case, c, status=status, reason=reason) if not c.unavailable else
                _row(case, c, status="n/a", reason=c.unavailable) for c in case.candidates]
    for candidate in case.candidates:
        progress.step(f"{case.kernel} {candidate.name}")
        if candidate.unavailable:
            rows[candidate.name] = _row(case, candidate, status="n/a", reason=candidate.unavailable)
            continue
        try:
            run = candidate.setup()
            started = time.perf_counter()
            wrong = gate(run(), truth, plain, floors, case.result_names, k)
            first_ms[candidate.name] = (time.perf_counter() - started) * 1e3
        except CaseSkipped as reason:
            rows[candidate.name] = _row(case, candidate, status="skipped", reason=str(reason))
            continue
        except Exception as error:  # one broken candidate must not hide the others
            rows[candidate.name] = _row(case, candidate, status="error", reason=f"{type(error).__name__}: {error}")
            continue
        if wrong:
            rows[candidate.name] = _row(case, candidate, status="wrong", reason=wrong)
            continue
        runs[candidate.name] = run
    del truth, plain
    times, loops = {name: [] for name in runs}, {}
    for name, run in runs.items():
        # The gate's run was the warm-up (compilation, first-call costs); a short case gets a
        # second one that also sizes its loops: a run under 20 ms is timed in loops of ~20 ms.
        warm_ms = _timed(run, device) if first_ms[name] < WARM_RERUN_MS else first_ms[name]
        loops[name] = max(1, min(1000, int(MIN_SAMPLE_MS / max(warm_ms, 1e-3))))
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_timed(_looped(run, loops[name]), device) / loops[name])
    for candidate in case.candidates:
        if candidate.name in runs:
            peak = peak_memory_mb(runs[candidate.name], device)
            ms = times[candidate.name]
            rows[candidate.name] = _row(case, candidate, status="ok", time_ms=statistics.median(ms),
                                        time_min=min(ms), time_max=max(ms), peak_mb=peak)
    del runs
    _release_free_memory()
    if device == "cuda":
        torch.cuda.empty_cache()
    _add_ratios(list(rows.values()))
    return [rows[c.name] for c in case.candidates]


def _add_ratios(rows: list[dict]) -> None:
    """Each measured row's time over the best original-style one's and over the best peer's."""
    measured = [r for r in rows if r["status"] == "ok"]
    for role, key in (("original", "vs_original"), ("peer", "vs_peer")):
        best = min((r["time_ms"] for r in measured if r["role"] == role), default=None)
        for r in measured:
            r[key] = r["time_ms"] / best if best else None


def run_cases(cases: list[Case], device: str, repeats: int, progress: bool = True) -> list[dict]:
    """Every case in turn (:func:`run_case`), with one progress bar over all their candidates."""
    bar = _Progress(sum(len(c.candidates) for c in cases), enabled=progress)
    rows = []
    try:
        for case in cases:
            rows += run_case(case, device, repeats, progress=bar)
    finally:
        bar.close()
    return rows


def load_cases(suite: str, device: str, size: str) -> list[Case]:
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {suite!r}")
    return importlib.import_module(f"benchmarks.suites.{suite}").cases(device, size)


# ---------------------------------------------------------------- provenance
def device_name(device: str) -> str:
    """The GPU's name, or the CPU model as ``lscpu`` names it."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return "not installed"


def git_commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it; "unknown" outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def provenance(device: str) -> dict:
    return {"device": device_name(device), "threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "triton": _version("triton"), "transformers": _version("transformers"), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ---------------------------------------------------------------- output
def _cell(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [r["status"], r["reason"][:70], "", "", ""]
    ratio = [f"x{r[key]:.2f}" if r.get(key) else "-" for key in ("vs_original", "vs_peer")]
    return ["ok", f"{r['time_ms']:.2f} ({r['time_min']:.2f}-{r['time_max']:.2f})", f"{r['peak_mb']:.1f}", *ratio]


def format_tables(rows: list[dict]) -> str:
    """One table per kernel: a line per (shape, candidate) with time, memory and the two ratios
    (time over the best original-style candidate's and over the best peer's: below 1 is faster)."""
    header = ["case", "candidate", "role", "status", "ms median (min-max)", "peak MB", "/best original",
              "/best peer"]
    blocks = []
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        lines = [header] + [[r["case"], r["candidate"], r["role"], *_cell(r)] for r in rows if r["kernel"] == kernel]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        blocks.append(f"[{kernel}]\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                                                  for line in lines))
    return "\n\n".join(blocks)


def append_csv(path: Path, rows: list[dict], info: dict) -> None:
    """Append rows (:data:`CSV_FIELDS`): time_ms (spread min-max), peak_mb and the two ratios
    per measured candidate; a ``status`` row with the reason for every other one."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for r in rows:
            base = {"suite": r["suite"], "case": f"{r['kernel']} {r['case']}", "candidate": r["candidate"],
                    "role": r["role"], **info}
            if r["status"] != "ok":
                writer.writerow({**base, "metric": "status", "value": r["status"], "spread": r["reason"]})
                continue
            writer.writerow({**base, "metric": "time_ms", "value": f"{r['time_ms']:.4g}",
                             "spread": f"{r['time_min']:.4g}-{r['time_max']:.4g}"})
            writer.writerow({**base, "metric": "peak_mb", "value": f"{r['peak_mb']:.4g}", "spread": ""})
            for key in ("vs_original", "vs_peer"):
                if r.get(key):
                    writer.writerow({**base, "metric": f"time_{key}", "value": f"{r[key]:.4g}", "spread": ""})


def _series(rows: list[dict], param: str):
    """x values of ``param`` and, per candidate, the (x, row) points of the cases that differ
    only in ``param`` (the largest such group)."""
    groups: dict = {}
    for r in rows:
        rest = tuple(sorted((k, v) for k, v in r["params"].items() if k != param))
        groups.setdefault(rest, []).append(r)
    group = max(groups.values(), key=lambda g: len({r["params"][param] for r in g}))
    return group


def plot_suite(rows: list[dict], path: Path, title: str) -> bool:
    """A PNG of time and peak memory against each varying parameter of each kernel of a suite,
    every measured candidate a line, with the best original-style and best-peer lines drawn
    heavier. False when nothing was measured or matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = [r for r in rows if r["status"] == "ok"]
    panels = []
    for kernel in dict.fromkeys(r["kernel"] for r in measured):
        kernel_rows = [r for r in measured if r["kernel"] == kernel]
        params = [p for p in kernel_rows[0]["params"] if len({r["params"].get(p) for r in kernel_rows}) > 1]
        panels += [(kernel, p, _series(kernel_rows, p)) for p in params] or [(kernel, None, kernel_rows)]
    if not panels:
        return False
    figure, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for (kernel, param, group), pair in zip(panels, axes):
        xs = sorted({r["params"][param] for r in group}) if param else [0]
        for metric, ax, unit in (("time_ms", pair[0], "ms"), ("peak_mb", pair[1], "MB")):
            for candidate in dict.fromkeys(r["candidate"] for r in group):
                points = sorted((r["params"][param] if param else 0, r[metric]) for r in group
                                if r["candidate"] == candidate)
                role = next(r["role"] for r in group if r["candidate"] == candidate)
                style = {"original": ":", "peer": "--", "sami_fast": "-"}[role]
                ax.plot(*zip(*points), style, marker="o", alpha=0.6, label=candidate)
            for role, colour, label in (("original", "black", "best original-style"), ("peer", "red", "best peer")):
                best = [(x, min((r[metric] for r in group if r["role"] == role
                                 and (r["params"][param] if param else 0) == x), default=None)) for x in xs]
                best = [(x, y) for x, y in best if y is not None]
                if best:
                    ax.plot(*zip(*best), color=colour, linewidth=3, alpha=0.35, label=label)
            ax.set_title(f"{kernel}: {metric.split('_')[0]} vs {param or 'candidate'}", fontsize=9)
            ax.set_xlabel(param or "")
            ax.set_ylabel(unit)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        pair[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True
