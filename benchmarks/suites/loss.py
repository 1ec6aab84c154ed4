"""Suite ``loss``: the SAMI MI loss of a batch of (C, C) log-prob matrices, forward+backward.

Candidates:

* ``original`` (original-style): the original SAMI trainer's loss (logsumexp over rows
  and columns, then two cross-entropies), one query at a time with a backward per query;
* ``original_batched`` (original-style): the same composition vectorised over B queries;
* ``sami_fast[torch]``, ``sami_fast[triton]``: ``sami_fast.sami_loss`` on each backend
  the device has, with ``check_finite=False`` like the others, which do not check either.

No other library implements this loss, so the suite has no peer. Inputs are fp32;
sizes: quick B in {1, 64} x C = 8 and B = 64, C = 64; full B in {1, 64} x C in {2, 8, 64}.
"""

import torch

from benchmarks.runner import Candidate, Case, sami_fast_backends, with_backend
from sami_fast import reference
from sami_fast.loss import sami_loss
from sami_fast.reference import original_batched_sami_loss, original_sami_loss

SHAPES = {"quick": [(1, 8), (64, 8), (64, 64)], "full": [(B, C) for B in (1, 64) for C in (2, 8, 64)]}


def _per_query_loop(logprobs):
    """The original trainer's loop: a loss and a backward per query; returns the mean loss."""
    total = 0.0
    for b in range(logprobs.shape[0]):
        loss = original_sami_loss(logprobs[b]) / logprobs.shape[0]
        loss.backward()
        total += loss.detach()
    return total


def _logprobs(device, B, C, dtype=torch.float32):
    generator = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(B, C, C, device=device, generator=generator) * 3).to(dtype)


def _candidate(name, role, device, B, C, loss_of, backend=None, unavailable=None):
    def setup():
        logprobs = _logprobs(device, B, C).requires_grad_()

        def run():
            def forward_backward():
                loss = loss_of(logprobs)
                if loss.requires_grad:  # the per-query loop has run its backwards already
                    loss.backward()
                return loss.detach()

            loss = with_backend(backend, forward_backward) if backend else forward_backward()
            results = loss, logprobs.grad
            logprobs.grad = None  # the caller holds it: a run's peak includes its gradient
            return results

        return run

    return Candidate(name, role, None if unavailable else setup, unavailable)


def _reference(device, B, C):
    def compute():
        out = []
        for dtype, loss_of in ((torch.float64, reference.sami_loss), (torch.float32, original_batched_sami_loss)):
            logprobs = _logprobs(device, B, C).to(dtype).requires_grad_()
            loss = loss_of(logprobs)
            loss.backward()
            out.append((loss.detach(), logprobs.grad))
        truth, plain = out
        return truth, plain, (None, None)

    return compute


def cases(device: str, size: str) -> list[Case]:
    if size not in SHAPES:
        raise ValueError(f"size must be one of {', '.join(SHAPES)}, got {size!r}")
    out = []
    for B, C in SHAPES[size]:
        candidates = [
            _candidate("original", "original", device, B, C, _per_query_loop),
            _candidate("original_batched", "original", device, B, C, original_batched_sami_loss),
        ]
        candidates += [
            _candidate(f"sami_fast[{backend}]", "sami_fast", device, B, C,
                       lambda x: sami_loss(x, check_finite=False), backend=backend, unavailable=reason)
            for backend, reason in sami_fast_backends(device).items()
        ]
        out.append(Case("loss", "sami_loss", f"B={B} C={C}", candidates, _reference(device, B, C),
                        params={"B": B, "C": C}, result_names=("loss", "d_logprobs")))
    return out
