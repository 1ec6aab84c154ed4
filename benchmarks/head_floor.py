"""The LM head's matrix products alone, beside the head's candidates: how fast an exact head can be.

Forward+backward of per-sequence mean log-probs under an LM head (the ``logprobs``
suite's head: random hidden states, a 1/sqrt(D)-scaled weight, the first 1 - ``scored``
of each sequence prompt) needs, over the N scored rows, the logits X Wᵀ in the forward
and, in the backward, the softmax's products (P - onehot) W for dX and (P - onehot)ᵀ X for
dW: 2·N·D·V flops each. A method that keeps the N x V logits for the backward does
6·N·D·V; one that keeps only the per-row log-sum-exp recomputes them, 8·N·D·V. Rows:

* ``products 8NDV``, ``products 6NDV``: those matrix products alone, on sami_fast's CPU
  tiles (``sami_fast.chunked.tile_shape``), with no softmax, gather or mask: a floor for
  an exact method of that kind on these tiles and this BLAS, not a candidate (its numbers
  are not log-probs);
* ``sami_fast``: ``sequence_logprobs`` (keeps no logits); ``sami_fast held``: with a
  ``logits_budget`` that keeps them;
* ``cce[torch_compile]``: cut-cross-entropy's CPU implementation (keeps the logits),
  ``torch_lce_chunked``: torch's ``linear_cross_entropy`` with its chunked options (keeps none;
  ~20 s a run at the default shape, so only on request).

One process, rows interleaved round-robin after a warm-up run each, median (min-max) of
``--rounds``. Run from the repository root: ``python -m benchmarks.head_floor`` (``--help``).
"""

import argparse
import statistics
import sys
import time

import torch

from benchmarks.suites.logprobs import IGNORE, _shifted, cut_cross_entropy, head_inputs, torch_linear_cross_entropy
from sami_fast.chunked import tile_shape
from sami_fast.sequence_logprobs import sequence_logprobs


def matrix_products(rows: torch.Tensor, weight: torch.Tensor, recompute: bool):
    """A run of the head's products over ``rows`` (N, D) on sami_fast's tiles, outputs discarded."""
    n, vocab = rows.shape[0], weight.shape[0]
    block_rows, width = tile_shape(n, weight)
    tile = torch.empty(block_rows, width)
    d_rows, d_weight = torch.empty_like(rows), torch.empty_like(weight)

    def tiles():
        for first in range(0, vocab, width):
            for start in range(0, n, block_rows):
                yield slice(first, min(first + width, vocab)), slice(start, min(start + block_rows, n))

    def tile_of(columns, part):
        return tile[: part.stop - part.start, : columns.stop - columns.start]

    def logits(columns, part):
        return torch.mm(rows[part], weight[columns].t(), out=tile_of(columns, part))

    def run():
        for columns, part in tiles():
            logits(columns, part)
        for columns, part in tiles():
            z = logits(columns, part) if recompute else tile_of(columns, part)
            d_rows[part].addmm_(z, weight[columns], beta=float(columns.start > 0))
            d_weight[columns].addmm_(z.t(), rows[part], beta=float(part.start > 0))

    return run


def candidates(hidden, weight, labels, upstream, names):
    hidden.requires_grad_()
    weight.requires_grad_()

    def head(forward):
        def run():
            (forward(hidden, weight, labels) * upstream).sum().backward()
            hidden.grad = weight.grad = None

        return run

    rows, targets = _shifted(hidden.detach(), labels)
    rows = rows[targets != IGNORE].contiguous()
    budget = rows.shape[0] * weight.shape[0] * 4
    every = {
        "products 8NDV": lambda: matrix_products(rows, weight.detach(), recompute=True),
        "products 6NDV": lambda: matrix_products(rows, weight.detach(), recompute=False),
        "sami_fast": lambda: head(lambda h, w, y: sequence_logprobs(h, w, y, check_finite=False)),
        "sami_fast held": lambda: head(
            lambda h, w, y: sequence_logprobs(h, w, y, check_finite=False, logits_budget=budget)),
        "cce[torch_compile]": lambda: head(lambda h, w, y: cut_cross_entropy(h, w, y, impl="torch_compile")),
        "torch_lce_chunked": lambda: head(torch_linear_cross_entropy),
    }
    return {name: every[name]() for name in names}


ROWS = ("products 8NDV", "products 6NDV", "sami_fast", "sami_fast held", "cce[torch_compile]", "torch_lce_chunked")
DEFAULT_ROWS = ROWS[:-1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scored", type=float, nargs="+", default=[1.0, 0.2], help="scored shares (default 1.0 0.2)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(DEFAULT_ROWS),
                        help="rows to time (default: all but torch_lce_chunked)")
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 512, 576, 49152], metavar=("B", "T", "D", "V"),
                        help="sequences, positions, width, vocabulary (default: 8 512 576 49152, SmolLM2's head)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T, D, V = args.shape
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; head D={D} V={V}, {B}x{T} rows, fp32")
    print("| scored | row | median s | min s | max s | x products 8NDV |\n|---|---|---|---|---|---|")
    for share in args.scored:
        hidden, weight, labels, upstream = head_inputs("cpu", torch.float32, B, T, D, V, share)
        runs = candidates(hidden, weight, labels, upstream, args.rows)
        for run in runs.values():  # warm-up: compilation, first-touch of the buffers
            run()
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
                print(f"{share:.0%} {name} {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
        floor = statistics.median(times["products 8NDV"]) if "products 8NDV" in times else None
        for name, measured in times.items():
            median = statistics.median(measured)
            ratio = f"{median / floor:.2f}" if floor else ""
            print(f"| {share:.0%} | {name} | {median:.2f} | {min(measured):.2f} | {max(measured):.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
