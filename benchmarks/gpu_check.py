"""One prepared GPU run: correctness at real shapes, then the timing/memory table.

Usage (on a CUDA machine, from the repository root; installs nothing). Write the CSV
to a folder that outlives the run ($OUT below) and copy it into benchmarks/results/
afterwards; the run ends itself before 8 minutes (see below):

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT/h200.csv

The peers (cut-cross-entropy, Liger) are timed when importable. For a machine with no
package index, run ``bash benchmarks/fetch_peers.sh`` where pip can download and carry
``benchmarks/peers`` along: this script puts that folder on sys.path.

1. Correctness (bf16, D=4096, V=128256, a few thousand rows, and V=262144):
   ``sequence_logprobs`` values and gradients (hidden, weight, bias) against the
   float64 reference, by the oracle rule |ours - fp64| <= |torch bf16 - fp64| + tol
   (tol = bf16 eps * max|fp64|), plus relative norms; an fp32 case within 1e-4.
   ``sami_loss`` likewise (fp32 and bf16, with a mask).
2. Timing: every suite's cases of the benchmark runner (``benchmarks.runner``, as
   ``python -m benchmarks --device cuda``: the float64 gate, interleaved repeats, peak
   memory, a row for every peer or API missing here); rows are appended to --out case by
   case, then the tables and the GPU targets (time and memory against the best peer).
   The step suite is the SAMI step on Llama-3-8B's architecture (random weights, bf16) at
   C = R in {2, 8}, prompts ~512 and responses ~128 tokens: ``logprob_matrix`` (and at 8
   ``sami_backward``) beside the original-style step (at C = R = 8 a row with the memory it
   would need); ``--suites step`` runs it alone.

Every check and case runs on its own: a failure is printed and the rest go on.
A wall-clock budget (--budget-s, 450 s) skips what would not start in time, and a
hard limit (--hard-limit-s, 470 s from the start) ends the process even inside a
case (status 1, "Timeout" and the stacks on stderr), so a run never exceeds 8
minutes; the rows measured by then are already in --out.
"""

import argparse
import faulthandler
import importlib.util
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"  # unpacked by benchmarks/fetch_peers.sh


def _import_sami_fast():
    """Import sami_fast from this checkout when it is not installed (``kernels/`` is ``sami_fast.kernels``)."""
    if importlib.util.find_spec("sami_fast") is None:
        sys.path.insert(0, str(ROOT))
        spec = importlib.util.spec_from_file_location(
            "sami_fast.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")],
        )
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["sami_fast.kernels"] = kernels
        spec.loader.exec_module(kernels)
    import sami_fast

    return sami_fast


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.csv"),
                        help="CSV to append the timing rows to (created with a header if missing)")
    parser.add_argument("--size", choices=("quick", "full"), default="full", help="benchmark shapes (default: full)")
    parser.add_argument("--suites", default=None,
                        help="comma-separated runner suites: loss,logprobs,step (default: all)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per benchmark case")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="wall-clock budget; later steps are skipped once it is spent (default 450 s)")
    parser.add_argument("--hard-limit-s", type=float, default=470.0,
                        help="the process exits (status 1) this many seconds after its start, whatever it is doing")
    parser.add_argument("--skip-checks", action="store_true", help="only the timing table")
    parser.add_argument("--skip-bench", action="store_true", help="only the correctness checks")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the correctness checks at tiny shapes on the CPU (tests this script, not the GPU)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- comparison helpers
def oracle_report(name, ours, same_dtype, exact):
    """PASS if |ours - exact| <= |same_dtype - exact| + eps * max|exact| elementwise (eps of same_dtype)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))  # the suite's oracle rule (it needs sami_fast imported first)
    from oracle import per_entry_excess

    tol = torch.finfo(same_dtype.dtype).eps * exact.double().abs().max().item()
    excess = per_entry_excess(ours, same_dtype, exact, slack=0.0)
    ours, same, exact = ours.double(), same_dtype.double(), exact.double()
    rel_ours = ((ours - exact).norm() / exact.norm().clamp_min(1e-30)).item()
    rel_torch = ((same - exact).norm() / exact.norm().clamp_min(1e-30)).item()
    ok = bool(torch.isfinite(ours).all()) and excess <= tol
    print(f"    {name:<10} {'PASS' if ok else 'FAIL'}  rel err ours {rel_ours:.2e}  torch {rel_torch:.2e}  "
          f"max excess {excess:.2e} (tol {tol:.2e})")
    return ok


def relative_report(name, ours, exact, limit):
    import torch

    rel = ((ours.double() - exact.double()).norm() / exact.double().norm().clamp_min(1e-30)).item()
    ok = bool(torch.isfinite(ours).all()) and rel <= limit
    print(f"    {name:<10} {'PASS' if ok else 'FAIL'}  rel err {rel:.2e} (limit {limit:.0e})")
    return ok


def _grads(fn, leaves, dtype, upstream, *args, **kwargs):
    """(output, *grads) of ``sum(upstream * fn(leaves in dtype, *args))``; grads in the leaves' order."""
    xs = [t.detach().to(dtype).requires_grad_() for t in leaves]
    out = fn(*xs, *args, **kwargs)
    (out.double() * upstream).sum().backward()
    return [out.detach()] + [x.grad for x in xs]


# ---------------------------------------------------------------- correctness
TINY = dict(B=2, T=9, V=37, D=8, C=4)  # shapes of --cpu-dry-run


def _synchronize(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def check_sequence_logprobs(sf, device, B, T, V, D, dtype, scored=1.0, softcap=None, temperature=1.0,
                            use_bias=False):
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, D, device=device, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, device=device, generator=gen, dtype=torch.float64) * D**-0.5 * 2
    bias = torch.randn(V, device=device, generator=gen, dtype=torch.float64) if use_bias else None
    labels = torch.randint(0, V, (B, T), device=device, generator=gen)
    labels[:, : int(T * (1 - scored))] = -100
    upstream = torch.randn(B, device=device, generator=gen, dtype=torch.float64)
    leaves = [hidden, weight] + ([bias] if use_bias else [])

    def call(fn):
        def f(h, w, *b):
            return fn(h, w, labels, bias=b[0] if b else None, softcap=softcap, temperature=temperature)
        return f

    names = ["value", "d_hidden", "d_weight"] + (["d_bias"] if use_bias else [])
    _synchronize(device)
    t0 = time.perf_counter()
    ours = _grads(call(sf.sequence_logprobs), leaves, dtype, upstream)
    _synchronize(device)
    print(f"    (ours fwd+bwd incl. compile/autotune: {time.perf_counter() - t0:.1f} s)")
    exact = _grads(call(sf.reference.sequence_logprobs), leaves, torch.float64, upstream)
    if dtype == torch.float32:
        return all(relative_report(n, o, e, 1e-4) for n, o, e in zip(names, ours, exact))
    same = _grads(call(sf.reference.sequence_logprobs), leaves, dtype, upstream)
    return all([oracle_report(n, o, s, e) for n, o, s, e in zip(names, ours, same, exact)])


def check_sami_loss(sf, device, B, C, dtype):
    import torch

    gen = torch.Generator(device=device).manual_seed(1)
    logprobs = -torch.rand(B, C, C, device=device, generator=gen, dtype=torch.float64) * 40
    mask = torch.rand(B, C, C, device=device, generator=gen) > 0.1
    mask[0] = False  # a query with no contributing row is left out

    def loss_and_grad(fn, d):
        x = logprobs.detach().to(d).requires_grad_()
        loss = fn(x, mask)
        loss.backward()
        return loss.detach(), x.grad

    ours = loss_and_grad(sf.sami_loss, dtype)
    exact = loss_and_grad(sf.reference.sami_loss, torch.float64)
    if dtype == torch.float32:
        return all(relative_report(n, o, e, 1e-5) for n, o, e in zip(("loss", "d_logprobs"), ours, exact))
    same = loss_and_grad(sf.reference.sami_loss, dtype)
    return all([oracle_report(n, o, s, e) for n, o, s, e in zip(("loss", "d_logprobs"), ours, same, exact)])


def run_checks(sf, device, deadline):
    import torch

    checks = [
        ("sequence_logprobs bf16 B=2 T=1025 D=4096 V=128256", check_sequence_logprobs,
         dict(B=2, T=1025, V=128256, D=4096, dtype=torch.bfloat16)),
        ("sequence_logprobs bf16 20% scored, softcap=30, T=0.7, bias", check_sequence_logprobs,
         dict(B=4, T=1025, V=128256, D=4096, dtype=torch.bfloat16, scored=0.2, softcap=30.0, temperature=0.7,
              use_bias=True)),
        ("sequence_logprobs fp16 B=2 T=513 D=4096 V=128256", check_sequence_logprobs,
         dict(B=2, T=513, V=128256, D=4096, dtype=torch.float16)),
        ("sequence_logprobs fp32 B=1 T=257 D=1000 V=50001 softcap", check_sequence_logprobs,
         dict(B=1, T=257, V=50001, D=1000, dtype=torch.float32, softcap=20.0, use_bias=True)),
        ("sequence_logprobs bf16 V=262144 B=1 T=257", check_sequence_logprobs,
         dict(B=1, T=257, V=262144, D=4096, dtype=torch.bfloat16)),
        # V * D > 2^31: weight offsets need 64-bit arithmetic.
        ("sequence_logprobs bf16 V=262144 D=8192 B=1 T=65 (int64 offsets)", check_sequence_logprobs,
         dict(B=1, T=65, V=262144, D=8192, dtype=torch.bfloat16)),
        ("sami_loss fp32 B=512 C=16", check_sami_loss, dict(B=512, C=16, dtype=torch.float32)),
        ("sami_loss bf16 B=512 C=16", check_sami_loss, dict(B=512, C=16, dtype=torch.bfloat16)),
        ("sami_loss fp32 B=2 C=4096 (tiled path)", check_sami_loss, dict(B=2, C=4096, dtype=torch.float32)),
    ]
    results = []
    for title, check, kwargs in checks:
        if time.monotonic() > deadline:
            print(f"  SKIP {title} (budget spent)")
            results.append((title, "skipped"))
            continue
        print(f"  {title}")
        try:
            if device == "cpu":  # dry run: the same code path at tiny shapes
                kwargs = {**kwargs, **{k: v for k, v in TINY.items() if k in kwargs}}
            results.append((title, "PASS" if check(sf, device, **kwargs) else "FAIL"))
        except Exception:
            traceback.print_exc()
            results.append((title, "ERROR"))
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------- timing
def run_bench(args, deadline, info):
    """The runner's cases (``benchmarks.runner``) on the GPU, case by case until ``deadline``;
    rows are appended to --out as each case finishes. A peer or API missing here (an older
    torch without ``linear_cross_entropy``, no cut-cross-entropy) is a row saying so."""
    from benchmarks import runner

    suites = args.suites.split(",") if args.suites else list(runner.SUITES)
    rows = []
    for suite in suites:
        if time.monotonic() > deadline:
            print(f"  SKIP suite {suite} (budget spent)")
            continue
        try:
            cases = runner.load_cases(suite, "cuda", args.size)
        except Exception:
            traceback.print_exc()
            continue
        # A model-level step takes seconds: fewer timed rounds keep the run within --budget-s.
        repeats = min(args.repeats, 3) if suite == "step" else args.repeats
        for case in cases:
            if time.monotonic() > deadline:
                print(f"  SKIP {case.kernel} {case.name} (budget spent)")
                continue
            new = runner.run_cases([case], "cuda", repeats, progress=False)
            print(runner.format_tables(new))
            rows += new
            try:
                runner.append_csv(Path(args.out), new, info)
            except Exception:
                traceback.print_exc()
    return rows


def print_bars(rows):
    """Per shape: the fastest sami_fast candidate against the fastest and the leanest peer
    (time <= best peer, memory <= 1.1 x the leanest peer's)."""
    shapes = {}
    for r in rows:
        if r["status"] == "ok":
            shapes.setdefault((r["kernel"], r["case"]), []).append(r)
    for (kernel, case), measured in shapes.items():
        ours = [r for r in measured if r["role"] == "sami_fast"]
        peers = [r for r in measured if r["role"] == "peer"]
        if not ours or not peers:
            continue
        best = min(ours, key=lambda r: r["time_ms"])
        fastest = min(peers, key=lambda r: r["time_ms"])
        leanest = min(peers, key=lambda r: r["peak_mb"])
        print(f"  {kernel} {case}: {best['candidate']} {best['time_ms']:.2f} ms vs best peer {fastest['candidate']} "
              f"{fastest['time_ms']:.2f} ms ({'OK' if best['time_ms'] <= fastest['time_ms'] else 'SLOWER'}); "
              f"memory {best['peak_mb']:.0f} MB vs {leanest['candidate']} {leanest['peak_mb']:.0f} MB "
              f"({'OK' if best['peak_mb'] <= 1.1 * leanest['peak_mb'] else 'OVER'})")


def _stop_at_hard_limit(limit, elapsed):
    """End the process ``limit`` s after its start (``elapsed`` s ago), whatever it is doing.

    faulthandler's watchdog is a C thread: it fires even while the main thread holds
    the GIL in a compile or a synchronize, prints every thread's stack ("Timeout") to
    stderr and exits with status 1.
    """
    faulthandler.dump_traceback_later(max(limit - elapsed, 0.001), exit=True)


def main(argv=None):
    start = time.monotonic()
    args = parse_args(argv)
    _stop_at_hard_limit(args.hard_limit_s, time.monotonic() - start)
    if PEERS.is_dir():
        sys.path.append(str(PEERS))
    import torch

    deadline = start + args.budget_s
    sf = _import_sami_fast()
    sys.path.insert(0, str(ROOT))  # the `benchmarks` package of this checkout
    from benchmarks import runner

    if args.cpu_dry_run:
        results = run_checks(sf, "cpu", deadline)
        return 1 if any(status != "PASS" for _, status in results) else 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device available", file=sys.stderr)
        return 2

    info = runner.provenance("cuda")
    print(f"gpu_check: {info['device']} torch={info['torch']} triton={info['triton']} "
          f"transformers={info['transformers']} commit={info['commit']}")
    results = []
    if not args.skip_checks:
        print("== correctness")
        results = run_checks(sf, "cuda", start + 0.5 * args.budget_s)
    rows = []
    if not args.skip_bench:
        print("== timing")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        rows = run_bench(args, deadline, info)
        print()
        print(runner.format_tables(rows))
        print("\n== bars (vs the best peer measured in this run)")
        print_bars(rows)
        print(f"rows appended to {args.out}")
    print("\n== summary")
    for title, status in results:
        print(f"  {status:<7} {title}")
    ours_failed = [r for r in rows if r["role"] == "sami_fast" and r["status"] in ("error", "wrong")]
    print(f"  benchmark rows: {len(rows)}, sami_fast errors or wrong: {len(ours_failed)}, other rows not measured: "
          f"{sum(r['status'] != 'ok' for r in rows) - len(ours_failed)}; wall {time.monotonic() - start:.0f} s")
    failed = any(status in ("FAIL", "ERROR") for _, status in results) or bool(ours_failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
