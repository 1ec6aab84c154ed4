"""Command line: ``sami-fast bench`` runs the benchmark suites side by side."""

from __future__ import annotations

import argparse
import sys

import torch

from sami_fast import bench


def _bench(args) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    topics = args.topics.split(",") if args.topics else list(bench.TOPICS)
    print(f"sami-fast bench: device={bench.device_name(device)} size={args.size} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    rows = []
    for topic in topics:
        print(f"[{topic}]")
        rows += bench.run_cases(bench.load_cases(topic, device, args.size), device, args.repeats)
    print()
    print(bench.format_table(rows))
    if args.record:
        bench.append_results(args.record, rows, device)
        print(f"\nappended results to {args.record}")
    return 1 if any("error" in r for r in rows) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sami-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="time and measure sami_fast against the original SAMI composition")
    p.add_argument("--topics", default=None,
                   help=f"comma-separated subset of {','.join(bench.TOPICS)} (default: all)")
    p.add_argument("--size", choices=("small", "full"), default="small",
                   help="small: minutes on a 2-core CPU; full: the shapes the issues state")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (median reported)")
    p.add_argument("--record", metavar="CSV", default=None,
                   help="append rows (kernel, provider, mode, metric, x, y, device, date) to this CSV")
    args = parser.parse_args(argv)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
