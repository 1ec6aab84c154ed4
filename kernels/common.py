"""Triton helpers shared by the kernels: the online log-sum-exp update, tanh, the dot precision.

The interpreter's bf16 ``tl.dot`` (``TRITON_INTERPRET=1``, how the CPU tests run the
kernels) gives wrong products; its fp16 and fp32 dots are right. The one workaround:
launchers take ``upcast_bf16_dots`` and, when it is set, run bf16 dots on fp32 operands
(``dot_fp32``); callers set it only under the interpreter, so a GPU always keeps bf16
tensor cores.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def online_lse_update(running_max, running_sum, z, AXIS: tl.constexpr):
    """Fold tile ``z`` into a running (max, sum of exp(. - max)) along ``AXIS``.

    While every value so far is -inf (a banned-token mask, a masked line) the max is
    -inf and exp(-inf - -inf) would be NaN: the shift is 0 there instead, exp(-inf) = 0.
    Returns the new (max, sum); the log-sum-exp is ``max + log(sum)``.
    """
    new_max = tl.maximum(running_max, tl.max(z, axis=AXIS))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    new_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return new_max, new_sum


@triton.jit
def tanh(x):
    """tanh from the sigmoid: libdevice's tanh is unavailable under the interpreter."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def dot(a, b, acc, DOT_FP32: tl.constexpr, TF32: tl.constexpr):
    """``acc + a @ b`` in fp32: TF32 tensor cores (``TF32``), exact fp32 products
    (``DOT_FP32``) or the operands' own dtype on tensor cores."""
    if TF32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    elif DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def dot_fp32(dtype: torch.dtype, upcast_bf16_dots: bool = False) -> bool:
    """Whether dots on ``dtype`` operands run on fp32 operands (``dot``'s ``DOT_FP32``):
    fp32 and fp64 inputs always, bf16 only with the interpreter workaround (module docstring)."""
    return dtype in (torch.float32, torch.float64) or (upcast_bf16_dots and dtype == torch.bfloat16)
