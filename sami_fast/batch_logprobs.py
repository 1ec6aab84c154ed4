"""``get_batch_logprobs``: per-sequence mean log-probs from logits a model already produced.

Same semantics as the original SAMI trainer (``sami_fast.reference.get_batch_logprobs``):
the mean over non-ignored positions of log p(labels[:, 1:]) under logits[:, :-1], in the
logits' dtype. The per-token log-probs come from one streaming pass over the logits
(fp32 log-sum-exp, no fp32 copy of the logits); the backward writes the logits'
gradient directly in their dtype. The per-sequence mean is plain torch.
"""

import torch

from sami_fast import chunked
from sami_fast.backend import use_triton
from sami_fast.kernels.logits_logprobs import logits_logprobs_backward_kernel, logits_logprobs_forward_kernel
from sami_fast.validation import (
    LABEL_DTYPES, check_every_sequence_scored, check_finite_result, check_float, check_tensor, scored_targets_mask,
)


class _LogitsTokenLogprobs(torch.autograd.Function):
    """Per-row log p(target) (N,) fp32 (fp64 for fp64) of held logits (N, V); 0 where ignored."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        # The kernels compute in fp32: fp64 logits take the torch path, which keeps fp64.
        ctx.triton = logits.dtype != torch.float64 and use_triton(logits, targets)
        forward = logits_logprobs_forward_kernel if ctx.triton else chunked.logits_logprobs_forward
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        out = torch.empty_like(lse)
        forward(logits, targets, lse, out, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        backward = logits_logprobs_backward_kernel if ctx.triton else chunked.logits_logprobs_backward
        grad_logits = torch.empty_like(logits)
        backward(logits, targets, lse, grad_out.contiguous(), grad_logits, ctx.ignore_index)
        return grad_logits, None, None


def get_batch_logprobs(logits, labels, ignore_idx=-100, *, check_finite=True):
    """Mean log-prob of ``labels[:, 1:]`` under ``logits[:, :-1]`` over non-ignored positions.

    logits (B, T, V) float, labels (B, T) integer; returns (B,) in the logits' dtype,
    differentiable w.r.t. ``logits``. fp64 logits run the torch path on every backend
    (the kernels compute in fp32). Logits may be -inf (a vocabulary mask) except at
    a scored label. Raises ValueError for a sequence with no scored token (the
    original returns NaN there) or a label outside [0, V) other than ``ignore_idx``;
    with ``check_finite`` also when the result is NaN or inf.
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
    rows = logits.reshape(B * T, V)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    per_row = _LogitsTokenLogprobs.apply(rows, targets.reshape(-1), ignore_idx)
    result = (per_row.view(B, T).sum(dim=1) / count).to(logits.dtype)
    if check_finite:
        check_finite_result("get_batch_logprobs", result)
    return result
