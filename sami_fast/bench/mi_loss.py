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
import torch.nn.functional as F

from sami_fast.bench import Case
from sami_fast.loss import sami_loss

KERNEL = "mi_loss"
SHAPES = [(B, C) for B in (1, 64) for C in (2, 8, 64)]


def original_sami_loss(logprobs):
    """The original trainer's loss of one (C, C) matrix (janphilippfranken/sami)."""
    logsumexp_row = torch.logsumexp(logprobs, dim=1, keepdim=True)
    logsumexp_col = torch.logsumexp(logprobs, dim=0, keepdim=True)
    labels = torch.arange(logprobs.shape[0], dtype=torch.long, device=logprobs.device)
    loss_row = F.cross_entropy(logprobs - logsumexp_row, labels, reduction="mean")
    loss_col = F.cross_entropy((logprobs - logsumexp_col).t(), labels, reduction="mean")
    return (loss_col + loss_row) / 2


def original_batched_sami_loss(logprobs):
    """The original composition over (B, C, C) at once: the mean of the per-query losses."""
    B, C, _ = logprobs.shape
    labels = torch.arange(C, device=logprobs.device).expand(B, C)
    logits_row = logprobs - torch.logsumexp(logprobs, dim=2, keepdim=True)
    logits_col = logprobs - torch.logsumexp(logprobs, dim=1, keepdim=True)
    # cross_entropy takes classes on dim 1: rows score responses j, columns constitutions k.
    loss_row = F.cross_entropy(logits_row.transpose(1, 2), labels)
    loss_col = F.cross_entropy(logits_col, labels)
    return (loss_col + loss_row) / 2


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
