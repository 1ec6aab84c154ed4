"""Command line: ``sami-fast bench`` runs the benchmark suites side by side; ``sami-fast demo`` trains SmolLM2 with SAMI."""

from __future__ import annotations

import argparse
import math
import sys
import time

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


DEMO_QUERIES = ["What causes rain?", "How do I boil an egg?"]
DEMO_CONSTITUTIONS = [
    "Be concise: answer in one short sentence.",
    "Be verbose and detailed: explain at length, step by step.",
    "Answer in a formal, academic tone.",
    "Answer playfully, with jokes and exclamation marks!",
]


def _print_matrix(title: str, matrix: torch.Tensor) -> None:
    """One block per query: rows = constitutions k, columns = responses j (generated under constitution j)."""
    print(title)
    C = matrix.shape[-1]
    for b, query_matrix in enumerate(matrix.tolist()):
        print(f"  query {b}" + "".join(f"{f'resp {j}':>10}" for j in range(C)))
        for k, row in enumerate(query_matrix):
            print(f"    const {k}" + "".join(f"{value:10.4f}" for value in row))


def _demo(args) -> int:
    from sami_fast.hf import load_smollm2
    from sami_fast.prefix import logprob_matrix
    from sami_fast.trainer import SAMITrainer, encode_prompts, encode_sami_batch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    C = args.constitutions
    constitutions = [DEMO_CONSTITUTIONS[:C] for _ in DEMO_QUERIES]
    torch.manual_seed(args.seed)
    model, tokenizer = load_smollm2(torch.float32)
    model = model.to(device).eval()
    print(f"sami-fast demo: SmolLM2-135M-Instruct on {device}, B={len(DEMO_QUERIES)} queries x C={C} "
          f"constitutions, {args.steps} steps")

    # One sampled response per (query, constitution), from exactly the prompt SAMI will score it under.
    prompts = encode_prompts(tokenizer, constitutions, DEMO_QUERIES)
    responses = []
    for b, group in enumerate(prompts):
        responses.append([])
        for k, prompt in enumerate(group):
            generated = model.generate(
                prompt[None].to(device), attention_mask=torch.ones_like(prompt[None]).to(device),
                max_new_tokens=args.max_new_tokens, min_new_tokens=1, do_sample=True, temperature=0.7, top_p=0.9,
                pad_token_id=tokenizer.eos_token_id,
            )
            text = tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True)
            responses[-1].append(text)
            print(f"  q{b} c{k} [{constitutions[b][k]}] {DEMO_QUERIES[b]!r} -> {text!r}")

    prompts, response_ids = encode_sami_batch(tokenizer, constitutions, DEMO_QUERIES, responses)
    with torch.no_grad():
        initial = logprob_matrix(model, prompts, response_ids)
    _print_matrix("initial log-prob matrix (mean log-prob of response j under constitution k):", initial)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    trainer = SAMITrainer(model, optimizer, micro_batch_size=args.micro_batch_size)
    print(f"training (AdamW lr {args.lr:g}, micro-batch {args.micro_batch_size} pairs, log C = {math.log(C):.4f}):")
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        result = trainer.step(prompts, response_ids)
        seconds = time.perf_counter() - start
        print(f"  step {step}  loss {result['loss']:.4f}  mi_lower_bound {result['mi_lower_bound']:.4f}  "
              f"row_acc {result['row_accuracy']:.3f}  col_acc {result['column_accuracy']:.3f}  time {seconds:.2f}s")
    model.eval()
    with torch.no_grad():
        final = logprob_matrix(model, prompts, response_ids)
    _print_matrix("final log-prob matrix:", final)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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
    p = sub.add_parser("demo", help="generate with SmolLM2-135M-Instruct under a few constitutions, then train with SAMI")
    p.add_argument("--steps", type=_positive_int, default=3, help="SAMI training steps (default 3)")
    p.add_argument("--constitutions", type=int, choices=range(2, len(DEMO_CONSTITUTIONS) + 1), default=2,
                   metavar="C", help=f"constitutions per query, 2..{len(DEMO_CONSTITUTIONS)} (default 2)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=24, help="tokens per response (default 24)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling the responses (default 0)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--micro-batch-size", type=_positive_int, default=4,
                   help="(prompt, response) pairs per gradient-caching chunk (default 4)")
    args = parser.parse_args(argv)
    return _bench(args) if args.command == "bench" else _demo(args)


if __name__ == "__main__":
    sys.exit(main())
