"""Command line: sami-fast train runs SAMI end to end, sami-fast demo a small run of it, sami-fast bench the benchmarks."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path


def _bench(argv) -> int:
    """The benchmark runner lives in the source checkout (``benchmarks/``), not in the installed package."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "benchmarks" / "cli.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        from benchmarks.cli import main as bench_main
    except ImportError:
        print("error: sami-fast bench runs the benchmark suite of a source checkout of sami_fast, and this "
              "installation has none; in a checkout, run `python -m benchmarks --help` from its root "
              "(or install it editable: pip install -e .)", file=sys.stderr)
        return 2
    return bench_main(argv, prog="sami-fast bench")


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
              f"policy in {policy}; metrics in {Path(config.out) / 'metrics.jsonl'}; plot {Path(config.out) / 'training.png'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sami-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", add_help=False, help="time sami_fast against the original SAMI composition and its "
                   "peers (from a source checkout; sami-fast bench --help for its options)")
    p = sub.add_parser("train", help="run SAMI: constitutions, self-generated responses, MI training, iterations")
    _add_train_options(p)
    p = sub.add_parser("demo", help="a small SAMI run (train with one iteration on 4 queries, C = 2)")
    _add_train_options(p)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return _train(args, DEMO_PRESET if args.command == "demo" else None)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
