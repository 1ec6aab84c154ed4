"""Command line: sami-fast train runs SAMI end to end, sami-fast demo a small run of it, sami-fast eval
evaluates its policies against the base, sami-fast bench the benchmarks."""

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

    _add_config_options(parser, TrainConfig)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")


def _add_config_options(parser, config_class) -> None:
    """--config FILE and one flag per field of ``config_class`` (TrainConfig, EvalConfig)."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML or JSON file of options (flags override it)")
    for spec in dataclasses.fields(config_class):
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        parser.add_argument(flag, dest=spec.name, default=argparse.SUPPRESS, metavar=None if "bool" in spec.type else
                            spec.name.upper(), help=f"(default: {default!r})", **_field_kind(spec.type))


def _config(args, config_class, preset=None):
    """The options of ``preset``, then the --config file, then the flags (each overriding the one before)."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume")}
    from_file = config_class.read_file(args.config) if args.config else {}
    return config_class.from_dict({**(preset or {}), **from_file, **flags}, where=args.config or "flags")


def _train(args, preset=None) -> int:
    from sami_fast.training import TrainConfig, Trainer

    config = _config(args, TrainConfig, preset)
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


def _eval(args) -> int:
    from sami_fast.evaluation import EvalConfig, Evaluator

    config = _config(args, EvalConfig)
    if config.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    started = time.perf_counter()
    result = Evaluator(config).run()
    print(result.table())
    print(f"sami-fast eval: {len(result.rows)} model(s) in {time.perf_counter() - started:.0f} s; "
          f"comparisons in {result.out / 'comparisons.jsonl'}; summary {result.out / 'summary.csv'}; "
          f"plot {result.out / 'evaluation.png'}")
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
    p = sub.add_parser("eval", help="held-out MI and judged win rates of trained policies against the base")
    from sami_fast.evaluation import EvalConfig

    _add_config_options(p, EvalConfig)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "eval":
            return _eval(args)
        return _train(args, DEMO_PRESET if args.command == "demo" else None)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
