"""Command line of the benchmark runner: ``python -m benchmarks`` and ``sami-fast bench``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SIZES = {
    "quick": "small shapes, the default: the whole run in about 3 minutes on a 2-core CPU "
             "(CPU: an LM head D=576, V=8192 over 512 rows at 20%% and 100%% scored, logits "
             "2x257x8192; the SAMI loss at B in {1, 64}, C in {8, 64}; a 2-layer SmolLM2-width model's "
             "SAMI step at C=R in {2, 4}, prompts 128, responses 24 tokens)",
    "full": "the real shapes (CPU, an hour or more on 2 cores: SmolLM2's head D=576, V=49152 over 1024 and "
            "4096 rows = 8x512 at 20%% and 100%% scored, logits 4x1025x49152, the loss up to B=64, C=64, "
            "the real SmolLM2-135M's SAMI step at "
            "C=R in {2, 4, 8}; CUDA: bf16 D=4096, V=128256 over 4096 and 16384 rows, Llama-3-8B's architecture "
            "with random weights for the SAMI step at C=R in {2, 8}, prompts 512, responses 128 tokens)",
}


def _repeats(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    from benchmarks.runner import SUITES

    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time sami_fast against the original SAMI composition and its peers (torch's "
                    "linear_cross_entropy, cut-cross-entropy, Liger), side by side after a float64 "
                    "correctness check; print tables, append rows to OUT/results.csv, plot OUT/<suite>.png.")
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="all",
                        help="loss: the SAMI MI loss; logprobs: the LM head's per-sequence log-probs and "
                             "get_batch_logprobs; step: one SAMI training step; all (default)")
    parser.add_argument("--size", choices=tuple(SIZES), default="quick",
                        help="; ".join(f"{name}: {text}" for name, text in SIZES.items()))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cpu: the torch paths and CPU peers; cuda: the Triton kernels and CUDA peers; "
                             "auto (default): cuda when a GPU is available, else cpu")
    parser.add_argument("--out", metavar="DIR", default="bench-out",
                        help="folder for results.csv (rows appended) and the plots (default: bench-out)")
    parser.add_argument("--repeats", type=_repeats, default=None, metavar="N",
                        help="timed rounds per case, interleaved across candidates (default: 3 on CPU, 10 on CUDA)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    args = build_parser(prog).parse_args(argv)
    import torch

    from benchmarks import runner

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    repeats = args.repeats or (10 if device == "cuda" else 3)
    suites = runner.SUITES if args.suite == "all" else (args.suite,)
    info = runner.provenance(device)
    print(f"{prog}: {info['device']} ({device}), {info['threads']} threads, size={args.size}, repeats={repeats}, "
          f"torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, "
          f"commit {info['commit']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, rows = time.perf_counter(), []
    for suite in suites:
        suite_rows = runner.run_cases(runner.load_cases(suite, device, args.size), device, repeats,
                                      progress=not args.no_progress)
        runner.append_csv(out / "results.csv", suite_rows, info)
        plotted = runner.plot_suite(suite_rows, out / f"{suite}.png", f"{suite} ({args.size}) on {info['device']}")
        print(f"\n{runner.format_tables(suite_rows)}\n" + (f"plot: {out / f'{suite}.png'}" if plotted else ""))
        rows += suite_rows
    print(f"\nrows appended to {out / 'results.csv'}; {time.perf_counter() - started:.0f} s")
    return 1 if any(r["status"] in ("error", "wrong") and r["role"] == "sami_fast" for r in rows) else 0
