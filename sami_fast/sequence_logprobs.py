"""Per-sequence log-probs straight from final hidden states and the LM head.

``sequence_logprobs`` never materialises the (tokens, V) logits: only the
scored positions reach the LM head (in SAMI the prompt, ~80% of the tokens, is
never scored; the Triton kernels gather those rows themselves, the PyTorch path
compacts them), the fused kernel (Triton) or the chunked PyTorch path returns
per-row log p(target) in fp32, and a per-sequence ``index_add`` reduces them.
The reduction runs in autograd, so each sequence may receive its own upstream
gradient (the MI loss gives every sequence a different one).
"""

import torch

from sami_fast.backend import use_triton
from sami_fast.chunked import scored_token_logprobs
from sami_fast.validation import (
    LABEL_DTYPES, check_every_sequence_scored, check_finite_result, check_float, check_positive, check_tensor,
    scored_targets_mask,
)

REDUCTIONS = ("mean", "sum", "none")


class _LinearLogprobs(torch.autograd.Function):
    """log p(target) (M,) fp32 of the rows ``hidden[row_index]`` (hidden (N, D); row_index
    sorted and unique), whose targets all lie in [0, V). The kernels gather the rows
    themselves; ``hidden`` is saved for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_index, targets, softcap, temperature):
        from sami_fast.kernels.linear_logprobs import linear_logprobs_kernel, tf32_dots

        # Read once: the backward recomputes the logits with the same precision as the saved LSE.
        ctx.tf32 = tf32_dots(hidden.dtype)
        logp, lse = linear_logprobs_kernel(hidden, weight, row_index, targets, bias, softcap, temperature, ctx.tf32)
        ctx.save_for_backward(hidden, weight, bias, row_index, targets, lse)
        ctx.logit_transform = (softcap, temperature)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        from sami_fast.kernels.linear_logprobs import linear_logprobs_backward_kernel

        hidden, weight, bias, row_index, targets, lse = ctx.saved_tensors
        softcap, temperature = ctx.logit_transform
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        d_rows, d_weight, d_bias = linear_logprobs_backward_kernel(
            hidden, weight, row_index, targets, lse, grad_logp.float().contiguous(), bias, softcap, temperature,
            need_hidden, need_weight, need_bias, tf32=ctx.tf32,
        )
        if need_hidden:
            # row_index is sorted and unique: as long as hidden, it is the identity.
            identity = row_index.shape[0] == hidden.shape[0]
            d_hidden = d_rows.to(hidden.dtype) if identity else _scatter_rows(d_rows, row_index, torch.zeros_like(hidden))
        return (
            d_hidden if need_hidden else None,
            d_weight,
            d_bias.to(bias.dtype) if need_bias else None,
            None, None, None, None,
        )


# Rows of fp32 gradient cast per step of the scatter: 16 MiB, no full low-precision copy.
_SCATTER_ELEMENTS = 2**22


def _scatter_rows(rows, row_index, out):
    """``out[row_index] = rows`` in out's dtype, a chunk of rows at a time (indices are unique)."""
    step = max(1, _SCATTER_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        out.index_copy_(0, row_index[start:start + step], rows[start:start + step].to(out.dtype))
    return out


def _in_autocast_dtype(tensor, device_type):
    """What torch.autocast does to a linear layer's inputs: fp32/bf16/fp16 to its dtype, fp64 untouched."""
    if isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return tensor.to(torch.get_autocast_dtype(device_type))
    return tensor


def _kernel_rows(hidden, flat_hidden, scored):
    """(rows, row_index) for the kernels, which keep ``rows`` for backward.

    When most rows are scored and ``flat_hidden`` is a view of ``hidden`` with unit stride
    along D, the kernels gather from it: keeping hidden costs at most twice the copy it
    replaces. Otherwise (SAMI's 80% prompt, a reshape that copied) only the scored rows
    are copied and kept, so that hidden itself can be freed.
    """
    is_view = flat_hidden.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr()
    if is_view and flat_hidden.stride(1) == 1 and 2 * scored.numel() >= flat_hidden.shape[0]:
        return flat_hidden, scored
    return flat_hidden.index_select(0, scored), torch.arange(scored.numel(), device=scored.device)


def _check_cu_seqlens(cu_seqlens, n_rows, device):
    check_tensor("cu_seqlens", cu_seqlens, dims=(1,), dtypes=LABEL_DTYPES)
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on {device}, got {cu_seqlens.device}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold B+1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != n_rows:
        raise ValueError(f"cu_seqlens must start at 0 and end at N={n_rows}, got {offsets[0]} .. {offsets[-1]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")


def _check_inputs(hidden, weight, labels, bias, cu_seqlens, reduction, softcap, temperature, ignore_index):
    packed = cu_seqlens is not None
    check_float("hidden", hidden, dims=(2,) if packed else (3,))
    check_float("weight", weight, dims=(2,))
    check_tensor("labels", labels, dims=(1,) if packed else (2,), dtypes=LABEL_DTYPES)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) to match hidden, got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} to match hidden, got {tuple(labels.shape)}")
    for name, tensor in (("weight", weight), ("labels", labels), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} must be on {hidden.device} like hidden, got {tensor.device}")
    if bias is not None:
        check_float("bias", bias, dims=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")
    if packed:
        _check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    check_positive("temperature", temperature)
    check_positive("softcap", softcap, allow_none=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _aligned_targets(labels, ignore_index, shift, cu_seqlens):
    """(targets (N,), segment (N,), n_sequences): flat position i of ``hidden`` predicts targets[i]."""
    device = labels.device
    if cu_seqlens is None:
        B, T = labels.shape
        targets = labels.long()
        if shift:
            # Position t predicts label t+1; the last position predicts nothing.
            targets = torch.full_like(targets, ignore_index)
            targets[:, :-1] = labels[:, 1:]
        segment = torch.arange(B, device=device).repeat_interleave(T)
        return targets.reshape(-1), segment, B
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    targets = labels.long()
    if shift:
        targets = torch.full_like(targets, ignore_index)
        same_segment = segment[1:] == segment[:-1]
        targets[:-1] = torch.where(same_segment, labels[1:].long(), targets[:-1])
    return targets, segment, lengths.numel()


def sequence_logprobs(
    hidden, weight, labels, *, ignore_index=-100, reduction="mean", shift=True,
    bias=None, softcap=None, temperature=1.0, cu_seqlens=None, check_finite=True,
):
    """Log-probs of ``labels`` under the LM head ``weight`` applied to ``hidden``, per sequence.

    hidden (B, T, D) final hidden states, weight (V, D), labels (B, T) token ids or
    ``ignore_index`` where not scored. Packed input: hidden (N, D), labels (N,)
    and ``cu_seqlens`` (B+1,) int32/int64 offsets.

    Logits are ``softcap * tanh((hidden W^T + bias) / softcap) / temperature``
    (without the tanh when ``softcap`` is None). ``shift=True``: position t
    predicts label t+1 of its own sequence; ``shift=False``: position t predicts
    label t.

    reduction: "mean" (B,) mean over scored tokens (the SAMI score; every
    sequence needs a scored token), "sum" (B,), or "none": per-position fp32
    log-probs, 0 where nothing is scored, of shape (B, T-1) for padded input with
    ``shift=True``, (B, T) without, (N,) packed. The result is fp32 for fp32,
    bf16 and fp16 inputs (fp32 accumulation); fp64 inputs run the chunked torch
    path on every backend (the kernels' dots are fp32 at best) and give fp64.
    -inf logits (e.g. a -inf bias banning tokens) are fine except at a scored
    label. Differentiable w.r.t. hidden, weight and bias; gradients have their
    input's dtype. ``check_finite=False`` skips the host sync that rejects a
    NaN/inf result (input checks still sync). Under ``torch.autocast`` the head
    runs like the ``nn.Linear`` it stands for: fp32/bf16/fp16 hidden, weight and
    bias are cast to the autocast dtype (their gradients come back in their own).
    """
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        hidden, weight, bias = (_in_autocast_dtype(t, hidden.device.type) for t in (hidden, weight, bias))
    _check_inputs(hidden, weight, labels, bias, cu_seqlens, reduction, softcap, temperature, ignore_index)
    softcap, temperature = (None if softcap is None else float(softcap)), float(temperature)  # numpy scalars too
    targets, segment, n_seq = _aligned_targets(labels, ignore_index, shift, cu_seqlens)
    scored = scored_targets_mask("labels", targets, weight.shape[0], ignore_index).nonzero().squeeze(1)
    scored_segment = segment.index_select(0, scored)
    counts = torch.bincount(scored_segment, minlength=n_seq)
    if reduction == "mean":
        check_every_sequence_scored("labels", counts)

    # Only scored rows reach the LM head, forward and backward.
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    scored_targets = targets.index_select(0, scored)
    # The kernels' dots are fp32 at best: fp64 takes the chunked torch path on every backend.
    if hidden.dtype != torch.float64 and use_triton(hidden, weight):
        rows, row_index = _kernel_rows(hidden, flat_hidden, scored)
        per_row = _LinearLogprobs.apply(
            rows, weight.contiguous(), None if bias is None else bias.contiguous(), row_index, scored_targets,
            softcap, temperature,
        )
    else:  # index_select's backward scatters the rows' gradient back into hidden's shape
        per_row = scored_token_logprobs(flat_hidden.index_select(0, scored), weight, scored_targets, bias, softcap,
                                        temperature)

    if reduction == "none":
        out = per_row.new_zeros(targets.shape[0]).index_add(0, scored, per_row)
        if cu_seqlens is None:
            out = out.reshape(labels.shape)
            out = out[:, :-1] if shift else out
    else:
        out = per_row.new_zeros(n_seq).index_add(0, scored_segment, per_row)
        if reduction == "mean":
            out = out / counts.to(out.dtype)
    if check_finite:
        check_finite_result("sequence_logprobs", out)
    return out
