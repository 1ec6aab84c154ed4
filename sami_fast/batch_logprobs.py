"""``get_batch_logprobs``: per-sequence mean log-probs from logits a model already produced.

Same semantics as the original SAMI trainer (``sami_fast.reference.get_batch_logprobs``):
the mean over non-ignored positions of log p(labels[:, 1:]) under logits[:, :-1], in the
logits' dtype. The per-token log-probs come from one streaming pass over the logits
(fp32 log-sum-exp, no fp32 copy of the logits); the backward writes the logits'
gradient directly in their dtype. The per-sequence mean is plain torch.
"""

import torch

from sami_fast import chunked
from sami_fast.backend import Backend, interpreted, resolve
from sami_fast.kernels.logits_logprobs import logits_logprobs_backward_kernel, logits_logprobs_forward_kernel
from sami_fast.validation import (
    LABEL_DTYPES, check_every_sequence_scored, check_finite_result, check_float, check_tensor, scored_targets_mask,
)

# The interpreter runs no warps: one per program, whatever the block.
INTERPRETER_OPTIONS = dict(num_warps=1)


class _TritonLogitsLogprobs(torch.autograd.Function):
    """Per-row log p(target) (N,) fp32 of held logits (N, V); 0 where ``targets == ignore_index``.

    ``forward(logits (N, V) with unit stride along V, targets (N,) int64, ignore_index,
    options)``; ``options``: launcher options (``INTERPRETER_OPTIONS`` under the
    interpreter). The gradient flows to ``logits`` in their dtype. ``_TorchLogitsLogprobs``
    has the same contract (fp64 for fp64 logits).
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, options):
        ctx.options = options
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        out = torch.empty_like(lse)
        logits_logprobs_forward_kernel(logits, targets, lse, out, ignore_index, **ctx.options)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        logits_logprobs_backward_kernel(logits, targets, lse, grad_out.contiguous(), grad_logits, ctx.ignore_index,
                                        **ctx.options)
        return grad_logits, None, None, None


class _TorchLogitsLogprobs(torch.autograd.Function):
    """The PyTorch path (``sami_fast.chunked``), with ``_TritonLogitsLogprobs``'s contract;
    ``options``: {} or {"chunk_rows": rows of logits per chunk}."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, options):
        ctx.chunk_rows = options.get("chunk_rows")
        lse = torch.empty(logits.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32),
                          device=logits.device)
        out = torch.empty_like(lse)
        chunked.logits_logprobs_forward(logits, targets, lse, out, ignore_index, ctx.chunk_rows)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        chunked.logits_logprobs_backward(logits, targets, lse, grad_out.contiguous(), grad_logits, ctx.ignore_index,
                                         ctx.chunk_rows)
        return grad_logits, None, None, None


_LOGITS_LOGPROBS = {"triton": _TritonLogitsLogprobs, "torch": _TorchLogitsLogprobs}


def get_batch_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_idx: int = -100, *,
                       check_finite: bool = True, backend: Backend | None = None) -> torch.Tensor:
    """Mean log-prob of ``labels[:, 1:]`` under ``logits[:, :-1]`` over non-ignored positions.

    The original SAMI trainer's ``get_batch_logprobs``, fused: one streaming pass over the
    logits in fp32, no fp32 copy of them.

    Args:
        logits: (B, T, V) float (fp32, bf16, fp16 or fp64). May be -inf (a vocabulary
            mask) except at a scored label.
        labels: (B, T) int64/int32 on logits' device; ``ignore_idx`` where not scored.
        ignore_idx: the label of unscored positions.
        check_finite: one host sync: a NaN/inf result raises.
        backend: None (``SAMI_FAST_BACKEND``, default "auto"), "auto", "triton" or "torch";
            fp64 logits run the torch path on every backend (the kernels compute in fp32).

    Returns:
        (B,) in the logits' dtype, differentiable w.r.t. ``logits`` (the gradient has their
        dtype).

    Raises:
        TypeError: logits not a float tensor, labels not an integer tensor.
        ValueError: shapes or devices that do not match, a label outside [0, V) other than
            ``ignore_idx``, a sequence with no scored token (the original returns NaN
            there), a bad ``backend``.
        FloatingPointError: with ``check_finite``, a NaN/inf result.
        RuntimeError: backend "triton" on CPU tensors without ``TRITON_INTERPRET=1``.
    """
    check_float("logits", logits, dims=(3,))
    check_tensor("labels", labels, dims=(2,), dtypes=LABEL_DTYPES)
    B, T, V = logits.shape
    if tuple(labels.shape) != (B, T):
        raise ValueError(
            f"labels must have shape {(B, T)} to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels must be on the logits' device {logits.device}, got {labels.device}")
    scored_labels = labels[:, 1:].long()
    count = scored_targets_mask("labels", scored_labels, V, ignore_idx, "ignore_idx").sum(dim=1)
    check_every_sequence_scored("labels", count)
    # Row (b, t) of the flattened logits predicts labels[b, t + 1]; the last position predicts nothing.
    targets = torch.full((B, T), ignore_idx, dtype=torch.int64, device=labels.device)
    targets[:, :-1] = scored_labels
    # The kernels compute in fp32: fp64 logits take the torch path, which keeps fp64.
    backend = resolve(backend, logits, labels)
    options = INTERPRETER_OPTIONS if backend == "triton" and interpreted(logits) else {}
    rows = logits.reshape(B * T, V)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    per_row = _LOGITS_LOGPROBS[backend].apply(rows, targets.reshape(-1), ignore_idx, options)
    result = (per_row.view(B, T).sum(dim=1) / count).to(logits.dtype)
    if check_finite:
        check_finite_result("get_batch_logprobs", result)
    return result
