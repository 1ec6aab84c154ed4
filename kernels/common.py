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


# Cephes' tanhf: tanh(x) = x + x^3 P(x^2) for |x| < TANH_SERIES_BELOW, to ~1e-7 relative.
TANH_SERIES_BELOW = tl.constexpr(0.625)
TANH_P4, TANH_P3, TANH_P2, TANH_P1, TANH_P0 = (tl.constexpr(c) for c in (
    -5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1,
))


@triton.jit
def tanh(x):
    """fp32 tanh to a few ulps relative (libdevice's tanh is unavailable under the interpreter).

    Near 0, 1 - 2 / (exp(2x) + 1) (or 2·sigmoid(2x) - 1) cancels to an error of an ulp of 1,
    not of tanh(x), which a softcap c turns into c·eps on every small logit; there an odd
    polynomial instead. From |x| = 0.625 on, tanh >= 0.55 and the exp form no longer cancels.
    """
    magnitude = tl.abs(x)
    x2 = x * x
    series = ((((TANH_P4 * x2 + TANH_P3) * x2 + TANH_P2) * x2 + TANH_P1) * x2 + TANH_P0) * x2 * x + x
    saturating = 1.0 - 2.0 / (tl.exp(2.0 * magnitude) + 1.0)  # exp overflows to inf for large |x|: exactly 1
    return tl.where(magnitude < TANH_SERIES_BELOW, series, tl.where(x < 0, -saturating, saturating))


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
