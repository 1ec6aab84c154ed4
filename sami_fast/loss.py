"""``sami_loss``: the SAMI mutual-information loss, a drop-in for the original.

Public function -> autograd.Function (Triton or PyTorch) -> kernel. Both paths
produce the same per-query table (share of the batch loss, contributing count,
row hits, column hits) -- see ``kernels/mi_loss.py`` for the math -- from which
the batch loss and the stats are a few O(B) operations.
"""

import math
from typing import Literal, overload

import torch

from sami_fast.ops import autograd_inside_op
from sami_fast.backend import Backend, resolve
from sami_fast.kernels.mi_loss import COLUMN_HITS, COUNT, LOSS, ROW_HITS, mi_loss_kernel
from sami_fast.validation import check_finite_result, check_float, check_no_nan, check_tensor


def _contributing_queries(count: torch.Tensor) -> torch.Tensor:
    return (count > 0).sum()


class _TritonMiLoss(torch.autograd.Function):
    """One kernel launch for the loss and the gradient; backward only scales it by grad_output.

    ``forward(logprobs (B, C, C), mask (B, C, C) bool or None, compute_grad, with_hits)``
    returns ``(loss, per_query)``: the batch loss (0-dim, logprobs' dtype) and the
    (B, 4) per-query table (fp32, fp64 for fp64 input); ROW_HITS and COLUMN_HITS are
    filled at least when ``with_hits`` (the kernel always counts them).
    ``compute_grad``: whether a backward may follow (``ctx.needs_input_grad`` stays True
    under ``torch.no_grad()``, hence the explicit flag).
    """

    @staticmethod
    def forward(ctx, logprobs, mask, compute_grad, with_hits):
        per_query, grad = mi_loss_kernel(logprobs, mask, compute_grad=compute_grad)
        ctx.mark_non_differentiable(per_query)
        ctx.save_for_backward(grad)
        return per_query[:, LOSS].sum().to(logprobs.dtype), per_query

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_per_query):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None


class _TorchMiLossFunction(torch.autograd.Function):
    """The PyTorch path's Function (``_TorchMiLoss.apply`` chooses it), with ``_TritonMiLoss``'s
    signature and contract.

    Memory-lean: saves the input and the (B, C) log-sum-exps, not softmaxes; backward
    recomputes the softmaxes. Without a mask every row and column contributes: the
    unmasked case skips the masking work and keeps its per-entry scale a Python number
    (at SAMI's small shapes the per-op overhead is most of the time).
    """

    @staticmethod
    def forward(ctx, logprobs, mask, compute_grad, with_hits):
        x, valid = _masked_scores(logprobs, mask, with_valid=with_hits)
        row_lse = torch.logsumexp(x, dim=2)
        col_lse = torch.logsumexp(x, dim=1)
        diag = x.diagonal(dim1=1, dim2=2)
        B, C, _ = x.shape
        per_query = x.new_zeros((B, 4))
        if mask is None:
            scale = 0.5 / (C * B)  # 1 / (2 n Q) with n = C, Q = B
            per_query[:, LOSS] = (row_lse.sum(1) + col_lse.sum(1) - 2.0 * diag.sum(1)) * scale
            per_query[:, COUNT] = C
        else:
            count = valid.sum(dim=1).to(x.dtype)
            # Per-entry gradient scale 1 / (2 n_b Q), as in the kernel.
            scale = 0.5 / (count.clamp(min=1) * _contributing_queries(count))
            terms = torch.where(valid, row_lse - diag, 0.0).sum(1) + torch.where(valid, col_lse - diag, 0.0).sum(1)
            per_query[:, LOSS] = terms * scale
            per_query[:, COUNT] = count
        if with_hits:
            target = torch.arange(C, device=x.device)
            per_query[:, ROW_HITS] = ((x.argmax(dim=2) == target) & valid).sum(1).to(x.dtype)
            per_query[:, COLUMN_HITS] = ((x.argmax(dim=1) == target) & valid).sum(1).to(x.dtype)
        ctx.mark_non_differentiable(per_query)
        if compute_grad:
            if mask is None:
                ctx.scale = scale
                ctx.save_for_backward(logprobs, row_lse, col_lse)
            else:
                ctx.save_for_backward(logprobs, mask, row_lse, col_lse, scale)
        return per_query[:, LOSS].sum().to(logprobs.dtype), per_query

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_per_query):
        if len(ctx.saved_tensors) == 3:  # unmasked
            logprobs, row_lse, col_lse = ctx.saved_tensors
            x, _ = _masked_scores(logprobs, None, with_valid=False)
            grad = torch.exp(x - row_lse[:, :, None])
            grad += torch.exp(x - col_lse[:, None, :])
            grad.diagonal(dim1=1, dim2=2).sub_(2.0)
            grad *= grad_loss.to(x.dtype) * ctx.scale
            return grad.to(logprobs.dtype), None, None, None
        logprobs, mask, row_lse, col_lse, scale = ctx.saved_tensors
        x, valid = _masked_scores(logprobs, mask)
        grad = torch.exp(x - row_lse[:, :, None])
        col_softmax = torch.exp(x - col_lse[:, None, :])
        # Non-contributing lines may have lse = -inf (exp -> NaN): masked_fill_ drops them.
        grad.masked_fill_(~valid[:, :, None], 0.0)
        col_softmax.masked_fill_(~valid[:, None, :], 0.0)
        grad += col_softmax
        grad.diagonal(dim1=1, dim2=2).sub_(2.0 * valid.to(x.dtype))
        grad *= (scale * grad_loss.to(x.dtype))[:, None, None]
        return grad.to(logprobs.dtype), None, None, None


# Up to this many scores, per-op overhead dominates: a plain autograd composition is
# faster than the Function (measured on CPU, interleaved with the Function: 1.3-1.9x at
# B*C*C <= 4096); beyond, the Function's leaner saved state wins.
_SMALL = 2**14


class _TorchMiLoss:
    """The PyTorch path: ``apply`` has ``_TritonMiLoss.apply``'s signature and contract, except
    that ``per_query`` is None for a small unmasked call without stats (``with_hits`` False),
    which runs ``_unmasked_loss``; every other call runs ``_TorchMiLossFunction``."""

    @staticmethod
    def apply(logprobs, mask, compute_grad, with_hits):
        if mask is None and not with_hits and logprobs.numel() <= _SMALL:
            return _unmasked_loss(logprobs), None
        return _TorchMiLossFunction.apply(logprobs, mask, compute_grad, with_hits)


def _unmasked_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """The loss of small unmasked inputs in a few autograd ops (fewer than the Function's bookkeeping).

    Every row and column contributes, so the loss is the mean over all of them of
    lse - diag; logsumexp's backward keeps only its input and result, no softmax.
    """
    x = logprobs.to(torch.float64 if logprobs.dtype == torch.float64 else torch.float32)
    B, C, _ = x.shape
    diagonal_sum = x.diagonal(dim1=1, dim2=2).sum()
    total = torch.logsumexp(x, dim=2).sum() + torch.logsumexp(x, dim=1).sum() - 2.0 * diagonal_sum
    return (total * (0.5 / (B * C))).to(logprobs.dtype)


_MI_LOSS = {"triton": _TritonMiLoss, "torch": _TorchMiLoss}


def _masked_scores(logprobs: torch.Tensor, mask, with_valid: bool = True):
    """Scores in fp32 (fp64 for fp64 input) with masked entries -inf, and valid = kept diagonal
    (None without a mask unless ``with_valid``)."""
    x = logprobs.to(torch.float64 if logprobs.dtype == torch.float64 else torch.float32)
    if mask is None:
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if with_valid else None
    return x.masked_fill(~mask, -math.inf), mask.diagonal(dim1=1, dim2=2)


def _validate(logprobs, mask) -> None:
    check_float("logprobs", logprobs, dims=(2, 3))
    C, R = logprobs.shape[-2:]
    if C != R:
        raise ValueError(
            f"logprobs must be square (C == R, targets on the diagonal), got shape {tuple(logprobs.shape)}"
        )
    if logprobs.numel() == 0:
        raise ValueError(f"logprobs must not be empty (B >= 1, C >= 1), got shape {tuple(logprobs.shape)}")
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,))
        if mask.shape != logprobs.shape:
            raise ValueError(f"mask must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(mask.shape)}")
        if mask.device != logprobs.device:
            raise ValueError(f"mask must be on the device of logprobs ({logprobs.device}), got {mask.device}")


def _check_some_query_contributes(per_query: torch.Tensor) -> None:
    if not bool(per_query[:, COUNT].any()):
        raise ValueError("mask leaves no contributing row in any query (every diagonal entry is masked)")


def _raise_non_finite(loss, x, mask, per_query) -> None:
    """Name the cause of a NaN/inf loss (only runs once a non-finite loss was seen)."""
    if mask is not None:
        _check_some_query_contributes(per_query)
    kept = x if mask is None else x[mask]
    check_no_nan("logprobs", kept)
    diag = x.diagonal(dim1=1, dim2=2)
    contributing = diag if mask is None else diag[mask.diagonal(dim1=1, dim2=2)]
    if bool((contributing == -math.inf).any()):
        raise ValueError("logprobs has -inf on a contributing diagonal entry: the loss is infinite")
    if bool((kept == math.inf).any()):
        raise ValueError("logprobs contains +inf")
    check_finite_result("sami_loss", loss)


def _sami_loss(logprobs, mask, return_stats, check_finite, backend):
    """``sami_loss`` in eager mode: validate, resolve the backend, apply its Function."""
    _validate(logprobs, mask)
    batched = logprobs.dim() == 3
    x = logprobs if batched else logprobs.unsqueeze(0)
    m = None if mask is None else (mask if batched else mask.unsqueeze(0))
    function = _MI_LOSS[resolve(backend, x)]
    loss, per_query = function.apply(x, m, torch.is_grad_enabled() and x.requires_grad, return_stats)
    if check_finite and not bool(torch.isfinite(loss)):
        _raise_non_finite(loss, x, m, per_query)
    if not return_stats:
        return loss
    return loss, _stats(per_query)


@overload
def sami_loss(logprobs: torch.Tensor, mask: torch.Tensor | None = None, *, return_stats: Literal[False] = False,
              check_finite: bool = True, backend: Backend | None = None) -> torch.Tensor: ...


@overload
def sami_loss(logprobs: torch.Tensor, mask: torch.Tensor | None = None, *, return_stats: Literal[True],
              check_finite: bool = True, backend: Backend | None = None) -> tuple[torch.Tensor, dict]: ...


def sami_loss(logprobs, mask=None, *, return_stats=False, check_finite=True, backend=None):
    """SAMI loss of a (C, C) or batched (B, C, C) log-prob matrix; a drop-in for the original.

    ``logprobs[b, k, j]`` scores response j under constitution k (targets on the diagonal).
    Per query the loss is the mean of the row cross-entropy (softmax over each row) and the
    column cross-entropy (softmax over each column); a batch gives the mean over queries.
    Arithmetic is fp32 (fp64 for fp64 input).

    Args:
        logprobs: (C, C) or (B, C, C) float tensor (fp32, bf16, fp16 or fp64). Entries may be
            -inf ("impossible") off the contributing diagonal.
        mask: None, or a bool tensor of logprobs' shape and device; True keeps an entry.
            Masked entries take no part in either softmax and are never read into the
            result (they may hold anything); a row or column whose diagonal entry is masked
            does not contribute; queries with no contributing row are left out of the mean.
        return_stats: also return the stats dict.
        check_finite: one host sync: a NaN/inf loss raises a ValueError naming the cause.
            False makes the call free of host syncs and leaves those cases to the caller
            (the loss is then NaN/inf).
        backend: None (``SAMI_FAST_BACKEND``, default "auto"), "auto", "triton" or "torch"
            (see ``sami_fast.backend``).

    Returns:
        The loss, a 0-dim tensor in logprobs' dtype, differentiable w.r.t. ``logprobs``
        (its gradient has logprobs' dtype). With ``return_stats``, ``(loss, stats)``:
        ``stats`` holds 0-dim fp32 (fp64 for fp64 input) tensors ``row_accuracy``,
        ``column_accuracy`` (over all contributing rows/columns: the share whose first
        argmax is the diagonal entry) and ``mi_lower_bound`` (mean over queries of
        log n - loss, n the contributing rows).

    Raises:
        TypeError: logprobs is not a float tensor, or mask not a bool tensor.
        ValueError: logprobs is not square or empty, mask has another shape or device, a
            bad ``backend``; with ``check_finite``: NaN or +inf in ``logprobs``, -inf on a
            contributing diagonal entry, or a ``mask`` that leaves nothing.
        RuntimeError: backend "triton" on CPU tensors without ``TRITON_INTERPRET=1``.

    Under ``torch.compile`` the call is one custom op (``torch.ops.sami_fast.sami_loss``),
    opaque to the compiler, so ``fullgraph=True`` holds: its checks (``check_finite``
    included) run inside it at run time, and its backward recomputes the forward.
    """
    if torch.compiler.is_compiling():
        loss, row_accuracy, column_accuracy, mi_lower_bound = torch.ops.sami_fast.sami_loss(
            logprobs, mask, check_finite, backend)
        stats = {"row_accuracy": row_accuracy, "column_accuracy": column_accuracy, "mi_lower_bound": mi_lower_bound}
        return (loss, stats) if return_stats else loss
    return _sami_loss(logprobs, mask, return_stats, check_finite, backend)


def _stats(per_query: torch.Tensor) -> dict:
    count = per_query[:, COUNT]
    total = count.sum().clamp(min=1)
    mean_log_count = torch.log(count.clamp(min=1)).sum() / _contributing_queries(count)
    return {
        "row_accuracy": per_query[:, ROW_HITS].sum() / total,
        "column_accuracy": per_query[:, COLUMN_HITS].sum() / total,
        "mi_lower_bound": mean_log_count - per_query[:, LOSS].sum(),
    }


# torch.compile: the public function as one custom op whose backward recomputes it.
@torch.library.custom_op("sami_fast::sami_loss", mutates_args=())
def _sami_loss_op(logprobs: torch.Tensor, mask: torch.Tensor | None, check_finite: bool,
                  backend: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, stats = _sami_loss(logprobs, mask, True, check_finite, backend)
    return loss, stats["row_accuracy"], stats["column_accuracy"], stats["mi_lower_bound"]


@_sami_loss_op.register_fake
def _(logprobs, mask, check_finite, backend):
    stat = logprobs.new_empty((), dtype=torch.promote_types(logprobs.dtype, torch.float32))
    return logprobs.new_empty(()), stat, stat.clone(), stat.clone()


@torch.library.custom_op("sami_fast::sami_loss_backward", mutates_args=())
def _sami_loss_backward_op(grad_loss: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor | None,
                           backend: str | None) -> torch.Tensor:
    with autograd_inside_op():
        leaf = logprobs.detach().requires_grad_()
        loss = _sami_loss(leaf, mask, False, False, backend)
        return torch.autograd.grad(loss, leaf, grad_loss)[0]


@_sami_loss_backward_op.register_fake
def _(grad_loss, logprobs, mask, backend):
    return torch.empty_like(logprobs)


def _sami_loss_setup_context(ctx, inputs, output):
    logprobs, mask, _, backend = inputs
    ctx.save_for_backward(logprobs, mask)
    ctx.backend = backend


def _sami_loss_op_backward(ctx, grad_loss, *_grad_stats):
    logprobs, mask = ctx.saved_tensors
    return _sami_loss_backward_op(grad_loss, logprobs, mask, ctx.backend), None, None, None


_sami_loss_op.register_autograd(_sami_loss_op_backward, setup_context=_sami_loss_setup_context)
