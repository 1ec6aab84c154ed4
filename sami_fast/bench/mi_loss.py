"""Benchmark: the SAMI MI loss of a batch of (C, C) log-prob matrices, forward+backward.

Providers:

* ``original``: the original SAMI composition (logsumexp over rows and columns,
  then two cross-entropies), one query at a time in a Python loop with a
  backward per query, as the original trainer does;
* ``original_batched``: the same composition vectorised over the B queries;
* ``sami_fast``: ``sami_fast.sami_loss`` (one Triton launch on CUDA, the
  PyTorch path on CPU), with ``check_finite=False`` like the other providers,
  which do not check either.

Shapes (both sizes): fp32 logprobs, B in {1, 64} queries, C in {2, 8, 64}
constitutions.
"""

import torch

from sami_fast.bench import Case
from sami_fast.loss import sami_loss
from sami_fast.reference import original_batched_sami_loss, original_sami_loss

KERNEL = "mi_loss"
SHAPES = [(B, C) for B in (1, 64) for C in (2, 8, 64)]


def _setup(provider, device, B, C):
    def setup():
        gen = torch.Generator(device=device).manual_seed(0)
        logprobs = (torch.randn(B, C, C, device=device, generator=gen) * 3).requires_grad_()

        def run():
            logprobs.grad = None
            if provider == "original":
                for b in range(B):
                    (original_sami_loss(logprobs[b]) / B).backward()
            elif provider == "original_batched":
                original_batched_sami_loss(logprobs).backward()
            else:
                sami_loss(logprobs, check_finite=False).backward()
            return logprobs.grad

        return run

    return setup


def cases(device: str, size: str) -> list[Case]:
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    return [
        Case(KERNEL, provider, f"B={B},C={C}", _setup(provider, device, B, C))
        for B, C in SHAPES
        for provider in ("original", "original_batched", "sami_fast")
    ]
