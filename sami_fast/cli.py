"""Command line: ``sami-fast train`` runs SAMI end to end, ``sami-fast demo`` a small run of it,
``sami-fast bench`` the benchmarks."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

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


# `sami-fast demo`: a small `train` run (one iteration, a few queries) to see SAMI work in a minute or two.
DEMO_PRESET = {"iterations": 1, "max_queries": 4, "num_constitutions": 2, "principles_per_constitution": 1,
               "max_new_tokens": 16, "out": "sami-demo"}


def _field_kind(annotation: str):
    """argparse settings for a TrainConfig field from its annotation ("int | None", "bool", ...)."""
    base = annotation.replace(" | None", "")
    if base == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if base == "list":
        return {"nargs": "*"}
    convert = {"int": int, "float": float, "str": str}[base]
    if "None" not in annotation:
        return {"type": convert}

    def optional(text: str):
        return None if text.lower() == "none" else convert(text)

    return {"type": optional}


def _add_train_options(parser) -> None:
    from sami_fast.training import TrainConfig

    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML or JSON file of options (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        parser.add_argument(flag, dest=spec.name, default=argparse.SUPPRESS, metavar=None if "bool" in spec.type else
                            spec.name.upper(), help=f"(default: {default!r})", **_field_kind(spec.type))


def _train(args, preset=None) -> int:
    from sami_fast.training import TrainConfig, Trainer

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume")}
    from_file = TrainConfig.read_file(args.config) if args.config else {}
    config = TrainConfig.from_dict({**(preset or {}), **from_file, **flags}, where=args.config or "flags")
    if config.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # also the bars of libraries it calls (GGUF conversion)
    started = time.perf_counter()
    trainer = Trainer(config, resume=args.resume)
    policy = trainer.train()
    if trainer.parallel.is_main:  # under torchrun: one summary, not one per process
        print(f"sami-fast train: {config.iterations} iteration(s) in {time.perf_counter() - started:.0f} s; "
              f"policy in {policy}; metrics in {Path(config.out) / 'metrics.jsonl'}; "
              f"plot {Path(config.out) / 'training.png'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sami-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="time and measure sami_fast against the original SAMI composition")
    p.add_argument("--topics", default=None,
                   help=f"comma-separated subset of {','.join(bench.TOPICS)} (default: all)")
    p.add_argument("--size", choices=("small", "full"), default="small",
                   help="small: minutes on a 2-core CPU; full: real shapes (CPU: SmolLM2-135M's head D=576, "
                        "V=49152 and its SAMI step; GPU: bf16 D=4096, V=128256 and Llama-3-8B's architecture)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (median reported)")
    p.add_argument("--record", metavar="CSV", default=None,
                   help="append rows (kernel, provider, mode, metric, x, y, device, date) to this CSV")
    p = sub.add_parser("train", help="run SAMI: constitutions, self-generated responses, MI training, iterations")
    _add_train_options(p)
    p = sub.add_parser("demo", help="a small SAMI run (train with one iteration on 4 queries, C = 2)")
    _add_train_options(p)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    try:
        return _train(args, DEMO_PRESET if args.command == "demo" else None)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
