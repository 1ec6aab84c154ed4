"""Per-row log-probs of targets under materialised logits, and their gradient.

For logits rows z_i (N, V) and targets t_i:

    lse_i = log Σ_v exp(z_iv)        out_i = z_i[t_i] - lse_i        (both 0 where t_i == ignore_index)

The forward streams V in blocks with an online log-sum-exp in fp32 (one read of the
logits, no fp32 copy); the backward writes, with upstream gradient g_i,

    dz_iv = g_i · ([v == t_i] - exp(z_iv - lse_i))                 (0 on ignored rows)

straight into a tensor of the logits' dtype. One program per row. Logits may be
-inf (a vocabulary mask) anywhere but at the target.
"""

import triton
import triton.language as tl

from .common import online_lse_update

# Blocks of V per loop iteration; the interpreter is charged per iteration, not per element.
MAX_BLOCK_V = 4096


@triton.heuristics({"EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0})
@triton.jit
def _logits_logprobs_forward_kernel(
    # Pointers: logits (N, V), targets (N,), outputs lse (N,) and out (N,) fp32.
    logits_ptr, targets_ptr, lse_ptr, out_ptr,
    # Sizes and strides; the target value that marks an ignored row.
    stride_row, V, ignore_index,
    # Meta-parameters: the vocabulary block, and whether it divides V.
    BLOCK_V: tl.constexpr, EVEN_V: tl.constexpr,
):
    """Grid (N,): program i streams row i's logits in blocks of BLOCK_V and writes lse_i
    and out_i = z_i[t_i] - lse_i (both 0 where t_i is ignore_index)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(lse_ptr + row, 0.0)
        tl.store(out_ptr + row, 0.0)
        return
    running_max = tl.full([], -float("inf"), tl.float32)
    running_sum = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offsets = start + tl.arange(0, BLOCK_V)
        if EVEN_V:
            z = tl.load(row_ptr + offsets).to(tl.float32)
        else:
            z = tl.load(row_ptr + offsets, mask=offsets < V, other=-float("inf")).to(tl.float32)
        running_max, running_sum = online_lse_update(running_max, running_sum, z, 0)
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + row, lse)
    tl.store(out_ptr + row, tl.load(row_ptr + target).to(tl.float32) - lse)


@triton.heuristics({"EVEN_V": lambda args: args["V"] % args["BLOCK_V"] == 0})
@triton.jit
def _logits_logprobs_backward_kernel(
    # Pointers: logits (N, V), targets (N,), the forward's lse (N,), upstream gradient
    # (N,), output gradient (N, V) in the logits' dtype.
    logits_ptr, targets_ptr, lse_ptr, grad_out_ptr, grad_logits_ptr,
    # Sizes and strides; the target value that marks an ignored row.
    stride_row, stride_grad_row, V, ignore_index,
    # Meta-parameters: the vocabulary block, and whether it divides V.
    BLOCK_V: tl.constexpr, EVEN_V: tl.constexpr,
):
    """Grid (N,): program i writes row i of the logits' gradient,
    g_i ([v == t_i] - exp(z_iv - lse_i)), in blocks of BLOCK_V (zeros where t_i is ignored)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_logits_ptr + row * stride_grad_row
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        for start in range(0, V, BLOCK_V):
            offsets = start + tl.arange(0, BLOCK_V)
            zeros = tl.zeros((BLOCK_V,), dtype=grad_logits_ptr.dtype.element_ty)
            if EVEN_V:
                tl.store(grad_row_ptr + offsets, zeros)
            else:
                tl.store(grad_row_ptr + offsets, zeros, mask=offsets < V)
        return
    lse = tl.load(lse_ptr + row)
    grad = tl.load(grad_out_ptr + row).to(tl.float32)
    for start in range(0, V, BLOCK_V):
        offsets = start + tl.arange(0, BLOCK_V)
        if EVEN_V:
            z = tl.load(row_ptr + offsets).to(tl.float32)
        else:
            z = tl.load(row_ptr + offsets, mask=offsets < V, other=0.0).to(tl.float32)
        dz = grad * (tl.where(offsets == target, 1.0, 0.0) - tl.exp(z - lse))
        if EVEN_V:
            tl.store(grad_row_ptr + offsets, dz.to(grad_logits_ptr.dtype.element_ty))
        else:
            tl.store(grad_row_ptr + offsets, dz.to(grad_logits_ptr.dtype.element_ty), mask=offsets < V)


def _launch_config(V, block_v, num_warps):
    block_v = block_v or min(MAX_BLOCK_V, triton.next_power_of_2(V))
    return block_v, num_warps or min(16, max(1, block_v // 512))


def logits_logprobs_forward_kernel(logits, targets, lse, out, ignore_index, block_v=None, num_warps=None):
    """Fill ``lse`` and ``out`` (N,) fp32 from ``logits`` (N, V, unit stride along V) and ``targets`` (N,).

    ``block_v``: vocabulary block (default: V's next power of two, at most MAX_BLOCK_V);
    ``num_warps``: per program (default: one per 512 columns of the block, at most 16).
    """
    N, V = logits.shape
    BLOCK_V, num_warps = _launch_config(V, block_v, num_warps)
    _logits_logprobs_forward_kernel[(N,)](
        logits, targets, lse, out, logits.stride(0), V, ignore_index, BLOCK_V=BLOCK_V, num_warps=num_warps,
    )


def logits_logprobs_backward_kernel(logits, targets, lse, grad_out, grad_logits, ignore_index, block_v=None,
                                    num_warps=None):
    """Write ``grad_logits`` (N, V), every entry, given the upstream gradient ``grad_out`` (N,).

    ``block_v``, ``num_warps``: as in ``logits_logprobs_forward_kernel``.
    """
    N, V = logits.shape
    BLOCK_V, num_warps = _launch_config(V, block_v, num_warps)
    _logits_logprobs_backward_kernel[(N,)](
        logits, targets, lse, grad_out, grad_logits, logits.stride(0), grad_logits.stride(0), V, ignore_index,
        BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
