"""Per-sequence log-probs straight from final hidden states and the LM head.

``sequence_logprobs`` never materialises the (tokens, V) logits: only the
scored positions reach the LM head (in SAMI the prompt, ~80% of the tokens, is
never scored; the Triton kernels gather those rows themselves, the PyTorch path
compacts them), the fused kernel (Triton) or the chunked PyTorch path returns
per-row log p(target) in fp32, and a per-sequence ``index_add`` reduces them.
The reduction runs in autograd, so each sequence may receive its own upstream
gradient (the MI loss gives every sequence a different one).
"""

import math

import torch
import triton

from sami_fast import chunked
from sami_fast.ops import autograd_inside_op
from sami_fast.backend import Backend, interpreted, resolve
from sami_fast.kernels.linear_logprobs import linear_logprobs_backward_kernel, linear_logprobs_kernel, tf32_dots
from sami_fast.validation import (
    LABEL_DTYPES, check_every_sequence_scored, check_finite_result, check_float, check_positive, check_positive_int,
    check_tensor, scored_targets_mask,
)

REDUCTIONS = ("mean", "sum", "none")

# Under the interpreter (CPU tensors, TRITON_INTERPRET=1) the kernels run one large tile,
# since the interpreter's cost is per loop iteration rather than per element, two
# vocabulary splits and 256-column backward chunks (so the tests exercise the split merge
# and the chunk loop), and the bf16 dot workaround.
INTERPRETER_FORWARD = dict(
    n_splits=2, upcast_bf16_dots=True,
    config=triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=1, num_stages=1),
)
INTERPRETER_BACKWARD = dict(
    vocab_chunk=256, upcast_bf16_dots=True,
    config=triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=1, num_stages=1),
)


class _TritonLinearLogprobs(torch.autograd.Function):
    """log p(target) of the scored rows of ``hidden`` through the fused Triton kernels.

    ``forward(hidden (..., D), weight (V, D), bias (V,) or None, scored (M,), targets (M,),
    softcap, temperature, options)`` returns (M,) fp32: row ``scored[i]`` of ``hidden``
    flattened to (N, D) scores ``targets[i]``, which lies in [0, V); ``scored`` is sorted and
    unique. ``options``: launcher options, here {"forward": {...}, "backward": {...}} (see
    ``_launch_options``). Gradients flow to hidden, weight and bias.
    ``_TorchLinearLogprobs`` has the same contract.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, scored, targets, softcap, temperature, options):
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        rows, row_index = _kernel_rows(hidden, flat_hidden, scored)
        weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
        # Read once: the backward recomputes the logits with the same precision as the saved LSE.
        ctx.tf32 = tf32_dots(hidden.dtype)
        ctx.backward_options = options.get("backward", {})
        logp, lse = linear_logprobs_kernel(rows, weight, row_index, targets, bias, softcap, temperature, ctx.tf32,
                                           **options.get("forward", {}))
        ctx.save_for_backward(rows, weight, bias, row_index, scored, targets, lse)
        ctx.logit_transform = (softcap, temperature)
        ctx.hidden_shape = hidden.shape
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        rows, weight, bias, row_index, scored, targets, lse = ctx.saved_tensors
        softcap, temperature = ctx.logit_transform
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        d_rows, d_weight, d_bias = linear_logprobs_backward_kernel(
            rows, weight, row_index, targets, lse, grad_logp.float().contiguous(), bias, softcap, temperature,
            need_hidden, need_weight, need_bias, tf32=ctx.tf32, **ctx.backward_options,
        )
        # d_rows is per scored row, whether rows is hidden itself (gathered by row_index) or its scored rows.
        d_hidden = _scored_rows_to_hidden(d_rows, scored, ctx.hidden_shape, rows.dtype) if need_hidden else None
        return d_hidden, d_weight, d_bias.to(bias.dtype) if need_bias else None, None, None, None, None, None


class _TorchLinearLogprobs(torch.autograd.Function):
    """The chunked PyTorch path (``sami_fast.chunked``), with ``_TritonLinearLogprobs``'s
    signature and contract; only the scored rows are copied and kept for backward.
    ``options``: {} or any of {"chunk_rows": rows of logits per chunk, "logits_budget":
    bytes of logits the forward may keep for the backward, which then skips recomputing them}.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, scored, targets, softcap, temperature, options):
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored)
        ctx.chunk_rows = options.get("chunk_rows")
        held = chunked.held_logits(rows.shape[0], weight, options.get("logits_budget", 0))
        logp, lse = chunked.linear_logprobs_forward(rows, weight, targets, bias, softcap, temperature, ctx.chunk_rows,
                                                    held)
        # Saved like the rest, so activation checkpointing drops and recomputes it too.
        ctx.save_for_backward(rows, weight, bias, scored, targets, lse, held)
        ctx.logit_transform = (softcap, temperature)
        ctx.hidden_shape = hidden.shape
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    @chunked.autocast_off
    def backward(ctx, grad_logp):
        rows, weight, bias, scored, targets, lse, held = ctx.saved_tensors
        softcap, temperature = ctx.logit_transform
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        d_rows, d_weight, d_bias = chunked.linear_logprobs_backward(
            rows, weight, targets, lse, grad_logp, bias, softcap, temperature, need_hidden, need_weight, need_bias,
            ctx.chunk_rows, held,
        )
        d_hidden = _scored_rows_to_hidden(d_rows, scored, ctx.hidden_shape, rows.dtype) if need_hidden else None
        return d_hidden, d_weight, d_bias, None, None, None, None, None


_LINEAR_LOGPROBS = {"triton": _TritonLinearLogprobs, "torch": _TorchLinearLogprobs}


def _launch_options(backend: str, hidden: torch.Tensor, logits_budget: int, differentiable: bool) -> dict:
    """The ``options`` argument of the backend's Function: the interpreter's under it, else the
    defaults; the torch path keeps logits only for a backward to come."""
    if backend == "triton":
        return {"forward": INTERPRETER_FORWARD, "backward": INTERPRETER_BACKWARD} if interpreted(hidden) else {}
    return {"logits_budget": logits_budget} if differentiable and logits_budget else {}


# Rows of fp32 gradient cast per step of the scatter: 16 MiB, no full low-precision copy.
_SCATTER_ELEMENTS = 2**22


def _scored_rows_to_hidden(d_rows, scored, hidden_shape, dtype):
    """The gradient of hidden (``hidden_shape``, ``dtype``) from that of its scored rows (M, D)."""
    n_rows = math.prod(hidden_shape[:-1])
    if scored.shape[0] == n_rows:  # sorted and unique: the identity
        return d_rows.to(dtype).reshape(hidden_shape)
    out = torch.zeros((n_rows, d_rows.shape[1]), dtype=dtype, device=d_rows.device)
    return _scatter_rows(d_rows, scored, out).reshape(hidden_shape)


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
        raise ValueError(
            f"labels must have shape {tuple(hidden.shape[:-1])} to match hidden, got {tuple(labels.shape)}")
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
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
    reduction: str = "mean", shift: bool = True, bias: torch.Tensor | None = None, softcap: float | None = None,
    temperature: float = 1.0, cu_seqlens: torch.Tensor | None = None, check_finite: bool = True,
    backend: Backend | None = None, logits_budget: int = 0,
) -> torch.Tensor:
    """Log-probs of ``labels`` under the LM head ``weight`` applied to ``hidden``, per sequence.

    Logits are ``softcap * tanh((hidden W^T + bias) / softcap) / temperature`` (without
    the tanh when ``softcap`` is None); the (tokens, V) logits never exist in memory.

    Args:
        hidden: (B, T, D) final hidden states, or (N, D) packed with ``cu_seqlens``; fp32,
            bf16, fp16 or fp64.
        weight: (V, D) LM head, hidden's dtype and device.
        labels: (B, T) (packed: (N,)) int64/int32 token ids, ``ignore_index`` where not scored.
        ignore_index: the label of unscored positions.
        reduction: "mean" (B,): mean over scored tokens (the SAMI score; every sequence
            needs a scored token); "sum" (B,); or "none": per-position log-probs, 0 where
            nothing is scored, of shape (B, T-1) for padded input with ``shift``, (B, T)
            without, (N,) packed.
        shift: True: position t predicts label t+1 of its own sequence; False: label t.
        bias: None or (V,), weight's dtype.
        softcap: None or a positive number.
        temperature: a positive number.
        cu_seqlens: None, or (B+1,) int32/int64 offsets of the packed sequences (0 .. N).
        check_finite: False skips the host sync that rejects a NaN/inf result (input checks
            still sync).
        backend: None (``SAMI_FAST_BACKEND``, default "auto"), "auto", "triton" or "torch";
            fp64 runs the torch path on every backend (the kernels' dots are fp32 at best).
        logits_budget: bytes of logits (scored rows x V x 4, x 8 for fp64) the torch backend
            may keep from the forward for the backward, which then does not recompute them (a
            quarter fewer flops); 0 keeps none. The Triton kernels always recompute.

    Returns:
        fp32 for fp32, bf16 and fp16 inputs (fp32 accumulation), fp64 for fp64; shape as
        ``reduction`` says. Differentiable w.r.t. hidden, weight and bias; gradients have
        their input's dtype. -inf logits (e.g. a -inf bias banning tokens) are fine except
        at a scored label.

    Raises:
        TypeError: a tensor of the wrong kind or dtype (each error names the argument).
        ValueError: shapes or devices that do not match, a label outside [0, V) other than
            ``ignore_index``, bad ``cu_seqlens``, ``reduction``, ``softcap``,
            ``temperature`` or ``backend``, a sequence with no scored token under "mean".
        FloatingPointError: with ``check_finite``, a NaN/inf result.
        RuntimeError: backend "triton" on CPU tensors without ``TRITON_INTERPRET=1``.

    Under ``torch.autocast`` the head runs like the ``nn.Linear`` it stands for: fp32/bf16/
    fp16 hidden, weight and bias are cast to the autocast dtype (their gradients come back
    in their own). Under ``torch.compile`` the call is one custom op
    (``torch.ops.sami_fast.sequence_logprobs``), opaque to the compiler, so
    ``fullgraph=True`` holds: its checks run inside it at run time, and its backward
    recomputes the forward (about a quarter more work than eager).
    """
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        hidden, weight, bias = (_in_autocast_dtype(t, hidden.device.type) for t in (hidden, weight, bias))
    if torch.compiler.is_compiling():
        return torch.ops.sami_fast.sequence_logprobs(
            hidden, weight, labels, bias, cu_seqlens, ignore_index, reduction, shift,
            None if softcap is None else float(softcap), float(temperature), check_finite, backend, logits_budget)
    return _sequence_logprobs(hidden, weight, labels, bias, cu_seqlens, ignore_index, reduction, shift, softcap,
                              temperature, check_finite, backend, logits_budget)


def _sequence_logprobs(hidden, weight, labels, bias, cu_seqlens, ignore_index, reduction, shift, softcap,
                       temperature, check_finite, backend, logits_budget):
    """``sequence_logprobs`` in eager mode, after autocast: validate, resolve the backend, apply its Function."""
    _check_inputs(hidden, weight, labels, bias, cu_seqlens, reduction, softcap, temperature, ignore_index)
    check_positive_int("logits_budget", logits_budget, allow_zero=True, meaning="bytes")
    softcap, temperature = (None if softcap is None else float(softcap)), float(temperature)  # numpy scalars too
    targets, segment, n_seq = _aligned_targets(labels, ignore_index, shift, cu_seqlens)
    scored = scored_targets_mask("labels", targets, weight.shape[0], ignore_index).nonzero().squeeze(1)
    scored_segment = segment.index_select(0, scored)
    counts = torch.bincount(scored_segment, minlength=n_seq)
    if reduction == "mean":
        check_every_sequence_scored("labels", counts)

    # Only scored rows reach the LM head, forward and backward. The kernels' dots are fp32
    # at best: fp64 takes the chunked torch path on every backend.
    backend = resolve(backend, hidden, weight)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    per_row = _LINEAR_LOGPROBS[backend].apply(hidden, weight, bias, scored, targets.index_select(0, scored), softcap,
                                              temperature, _launch_options(backend, hidden, logits_budget,
                                                                           differentiable))

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


# torch.compile: the public function as one custom op whose backward recomputes it.
@torch.library.custom_op("sami_fast::sequence_logprobs", mutates_args=())
def _sequence_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, ignore_index: int, reduction: str, shift: bool, softcap: float | None,
    temperature: float, check_finite: bool, backend: str | None, logits_budget: int,
) -> torch.Tensor:
    return _sequence_logprobs(hidden, weight, labels, bias, cu_seqlens, ignore_index, reduction, shift, softcap,
                              temperature, check_finite, backend, logits_budget)


@_sequence_logprobs_op.register_fake
def _(hidden, weight, labels, bias, cu_seqlens, ignore_index, reduction, shift, softcap, temperature, check_finite,
      backend, logits_budget):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    if reduction != "none":
        shape = (labels.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1,)
    elif cu_seqlens is None and shift:
        shape = (labels.shape[0], labels.shape[1] - 1)
    else:
        shape = tuple(labels.shape)
    return hidden.new_empty(shape, dtype=dtype)


@torch.library.custom_op("sami_fast::sequence_logprobs_backward", mutates_args=())
def _sequence_logprobs_backward_op(
    grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, ignore_index: int, reduction: str, shift: bool, softcap: float | None,
    temperature: float, backend: str | None, logits_budget: int, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias); an empty tensor for each gradient ``needs`` does not ask for."""
    with autograd_inside_op():
        leaves = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip((hidden, weight, bias), needs)]
        out = _sequence_logprobs(leaves[0], leaves[1], labels, leaves[2], cu_seqlens, ignore_index, reduction, shift,
                                 softcap, temperature, False, backend, logits_budget)
        wanted = [t for t, need in zip(leaves, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad))
    return tuple(next(grads) if need else hidden.new_empty(0) for need in needs)


@_sequence_logprobs_backward_op.register_fake
def _(grad, hidden, weight, labels, bias, cu_seqlens, ignore_index, reduction, shift, softcap, temperature, backend,
      logits_budget, needs):
    return tuple(torch.empty_like(t) if need else hidden.new_empty(0) for t, need in zip((hidden, weight, bias), needs))


def _sequence_logprobs_setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, cu_seqlens, *options = inputs
    ctx.save_for_backward(hidden, weight, labels, bias, cu_seqlens)
    ctx.options = options[:5] + options[6:]  # ignore_index .. temperature, backend, logits_budget (no check_finite)


def _sequence_logprobs_op_backward(ctx, grad):
    hidden, weight, labels, bias, cu_seqlens = ctx.saved_tensors
    needs = [bool(n) and t is not None for n, t in zip(ctx.needs_input_grad[:2] + ctx.needs_input_grad[3:4],
                                                       (hidden, weight, bias))]
    grads = _sequence_logprobs_backward_op(grad, hidden, weight, labels, bias, cu_seqlens, *ctx.options, needs)
    d_hidden, d_weight, d_bias = (g if need else None for g, need in zip(grads, needs))
    return d_hidden, d_weight, None, d_bias, *([None] * 9)


_sequence_logprobs_op.register_autograd(_sequence_logprobs_op_backward, setup_context=_sequence_logprobs_setup_context)
