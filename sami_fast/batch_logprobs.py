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
from sami_fast.validation import check_finite_result, check_float, check_tensor


class _LogitsTokenLogprobs(torch.autograd.Function):
    """Per-row log p(target) (N,) fp32 of held logits (N, V); 0 where ignored."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        ctx.triton = use_triton(logits, targets)
        forward = logits_logprobs_forward_kernel if ctx.triton else chunked.logits_logprobs_forward
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
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
    differentiable w.r.t. ``logits``. Raises ValueError for a sequence with no scored
    token (the original returns NaN there) or a label outside [0, V) other than
    ``ignore_idx``; with ``check_finite`` also when the result is NaN or inf.
    """
    check_float("logits", logits, dims=(3,))
    check_tensor("labels", labels, dims=(2,), dtypes=(torch.int64, torch.int32))
    B, T, V = logits.shape
    if tuple(labels.shape) != (B, T):
        raise ValueError(
            f"labels must have shape {(B, T)} to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels must be on the logits' device {logits.device}, got {labels.device}")
    scored_labels = labels[:, 1:].long()
    scored = scored_labels != ignore_idx
    if bool((scored & ((scored_labels < 0) | (scored_labels >= V))).any()):
        raise ValueError(f"labels must lie in [0, {V}) or equal ignore_idx={ignore_idx}")
    count = scored.sum(dim=1)
    if bool((count == 0).any()):
        empty = (count == 0).nonzero().flatten().tolist()
        raise ValueError(f"labels has no scored token (all {ignore_idx} after the first) in sequences {empty}")
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
