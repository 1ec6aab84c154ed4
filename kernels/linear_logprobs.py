"""Fused LM head -> per-row log-probabilities, streamed over the vocabulary.

For rows h_i (M, D), an LM head W (V, D), an optional bias b (V,) and targets y_i:
(the rows are gathered inside the kernels, h_i = hidden[row_index[i]], so the
scored rows of the hidden states are never copied)

    s_iv = h_i . w_v + b_v
    t_iv = tanh(s_iv / c)                       (only with a softcap c)
    z_iv = c * t_iv / T   (or s_iv / T)         (T = temperature)
    log p_i = z_iy - lse_i,   lse_i = logsumexp_v z_iv

Forward (``linear_logprobs_kernel``): a program takes a block of rows and a
contiguous range of vocabulary blocks. It builds one (BLOCK_M, BLOCK_N) logit
tile at a time with a loop of tl.dot over D, folds the tile into an online
log-sum-exp in fp32 and picks z_iy when y_i lies in the tile. The vocabulary is
split across programs so that few rows still fill the GPU; each split writes its
partial log-sum-exp and the launcher merges the (splits, M) partials. Logits
never exist beyond one tile; extra memory is O(M * splits).

Backward (``linear_logprobs_backward_kernel``): with the row's upstream gradient
g_i and p_iv = exp(z_iv - lse_i),

    d z_iv = g_i (onehot(y_i)_v - p_iv)
    d s_iv = d z_iv * (1 - t_iv^2) / T          (or d z_iv / T)
    d h_i = sum_v d s_iv w_v,   d w_v = sum_i d s_iv h_i,   d b_v = sum_i d s_iv

One program per (row block, vocabulary block) tile recomputes its logits from the
saved fp32 LSE, forms the d s tile in fp32 and adds its contributions to fp32
d_rows and d_weight with atomics, one D block at a time. fp16 tensor-core
operands do not carry g_i, which would flush g_i d s_iv to zero for the ~1e-5
per-token gradients of SAMI: d h_i = g_i (sum_v (d s_iv / g_i) w_v) scales the
fp32 product, and d w_v = max|g| sum_i (d s_iv / g_i) (g_i / max|g|) h_i scales
the rows operand by weights in [-1, 1] (bf16 has fp32's range: one operand
d s serves both products). Why this design rather
than one kernel per output: at D = 4096 neither a row block's d_rows nor a
vocabulary block's d_weight fits in registers, so a kernel that owned either
output would have to recompute every logit tile once per D block (D / BLOCK_K
times the forward's flops). Here each logit tile is recomputed exactly once and
the atomics add (BLOCK_M + BLOCK_N) * D fp32 values per tile against
6 * BLOCK_M * BLOCK_N * D flops. Accumulating in fp32 across vocabulary blocks
avoids the bf16-accumulation error of fused losses that add into bf16 buffers.

The launcher walks the vocabulary in chunks, one launch each, so that the fp32
d_weight accumulator covers one chunk (~32 MiB; up to 4x wider when rows are few,
so that a launch still fills the GPU) rather than all of W: a whole fp32 d_weight
next to its bf16 copy would triple the gradient's memory (3 GB extra for Llama 3's
head). Each finished chunk is cast into the d_weight output; d_rows stays one fp32
buffer (rows x D) that every chunk adds into.

bf16/fp16 inputs use the tensor cores with fp32 accumulation (bf16 dots on fp32
operands with ``upcast_bf16_dots``, the interpreter workaround of ``common``). fp32
inputs take the DOT_FP32 path: exact fp32 products, or TF32 tensor cores (TF32) when
torch lets fp32 matmuls use TF32 (``torch.set_float32_matmul_precision("high")``),
as torch's own matmuls do.

Launch choices are the caller's: ``config`` (one ``triton.Config`` instead of
autotuning over ``FORWARD_CONFIGS`` / ``BACKWARD_CONFIGS``), ``n_splits`` and
``vocab_chunk``; the defaults suit a GPU.
"""

import torch
import triton
import triton.language as tl

from .common import dot, dot_fp32, online_lse_update, tanh

# sm_90 register reports (ptxas -v): BLOCK_K=64 spills at 8 warps; these do not (or barely).
FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
# A backward launch's fp32 d_weight accumulator holds about this many values (32 MiB).
D_WEIGHT_CHUNK_ELEMENTS = 2**23

_HEURISTICS = {
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
    "EVEN_D": lambda args: args["D"] % args["BLOCK_K"] == 0,
}


@triton.jit
def _pre_softcap_logits(
    rows_ptr, weight_ptr, bias_ptr, row_ids, offs_n, D, stride_row, stride_weight,
    HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """s = rows[row_ids] . weight[offs_n]^T + bias[offs_n] as an fp32 (BLOCK_M, BLOCK_N) tile.

    row_ids / offs_n are in range (gathered, or wrapped), so only the D tail needs a mask.
    """
    offs_k = tl.arange(0, BLOCK_K)
    row_ptrs = rows_ptr + row_ids[:, None].to(tl.int64) * stride_row + offs_k[None, :]
    weight_ptrs = weight_ptr + offs_n[:, None].to(tl.int64) * stride_weight + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        if EVEN_D:
            h = tl.load(row_ptrs)
            w = tl.load(weight_ptrs)
        else:
            in_d = offs_k[None, :] < D - k
            h = tl.load(row_ptrs, mask=in_d, other=0.0)
            w = tl.load(weight_ptrs, mask=in_d, other=0.0)
        acc = dot(h, tl.trans(w), acc, DOT_FP32, TF32)
        row_ptrs += BLOCK_K
        weight_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    return acc


@triton.heuristics(_HEURISTICS)
@triton.jit
def _linear_logprobs_kernel(
    # Pointers: hidden (N, D), row_index (M,), weight (V, D), bias (V,) or None, targets (M,);
    # outputs: partial LSEs (n_splits, M) and target logits (M,), fp32.
    rows_ptr, row_index_ptr, weight_ptr, bias_ptr, targets_ptr, partial_lse_ptr, target_logit_ptr,
    # Sizes and strides, the logit transform (softcap or None, 1 / temperature), the split count.
    M, V, D, stride_row, stride_weight, softcap, inv_temperature, n_splits,
    # Meta-parameters: what the heuristics derive, the dot precision, the tile.
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_FP32: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), n_splits): program (m, s) takes row block m and the s-th
    contiguous range of vocabulary blocks, and writes the block's partial log-sum-exp over
    that range and, for the rows whose target lies in it, the target logit."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < M
    targets = tl.load(targets_ptr + offs_m, mask=row_in, other=-1)
    row_ids = tl.load(row_index_ptr + offs_m % M)
    blocks_per_split = tl.cdiv(tl.cdiv(V, BLOCK_N), n_splits)
    v_start = split * blocks_per_split * BLOCK_N
    v_end = tl.minimum(v_start + blocks_per_split * BLOCK_N, V)

    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v in range(v_start, v_end, BLOCK_N):
        offs_n = v + tl.arange(0, BLOCK_N)
        col_in = offs_n < V
        z = _pre_softcap_logits(
            rows_ptr, weight_ptr, bias_ptr, row_ids, offs_n % V, D, stride_row, stride_weight,
            HAS_BIAS, EVEN_D, DOT_FP32, TF32, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        if HAS_SOFTCAP:
            z = softcap * tanh(z / softcap)
        z = z * inv_temperature
        target_logit += tl.sum(tl.where(offs_n[None, :] == targets[:, None], z, 0.0), axis=1)
        z = tl.where(col_in[None, :], z, float("-inf"))
        running_max, running_sum = online_lse_update(running_max, running_sum, z, 1)

    # A split whose logits are all -inf (past the last vocabulary block, or banned)
    # keeps running_max = -inf: its partial LSE is -inf, which the launcher's
    # logsumexp merge ignores. The clamp only keeps log(0) out of it: with a finite
    # max, running_sum >= 1.
    partial_lse = running_max + tl.log(tl.maximum(running_sum, 1.0))
    tl.store(partial_lse_ptr + split * M + offs_m, partial_lse, mask=row_in)
    # Exactly one split holds each target, so this store never races.
    owns_target = row_in & (targets >= v_start) & (targets < v_end)
    tl.store(target_logit_ptr + offs_m, target_logit, mask=owns_target)


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _vocab_splits(n_row_blocks: int, V: int, device: torch.device) -> int:
    """Vocabulary splits so that the grid has about two programs per SM."""
    return max(1, min(triton.cdiv(2 * _sm_count(device), n_row_blocks), triton.cdiv(V, 1024)))


def tf32_dots(dtype: torch.dtype) -> bool:
    """Whether fp32 dots may use TF32 tensor cores: when torch allows TF32 for fp32 CUDA
    matmuls, as cuBLAS would (``torch.set_float32_matmul_precision("high")``, or torch >= 2.9's
    ``fp32_precision = "tf32"``, whose getter also resolves the legacy setting; reading the
    legacy ``allow_tf32`` after the new API raises). Not on ROCm, whose Triton backend
    takes TF32 dots on few chips."""
    if dtype != torch.float32 or torch.version.hip is not None:
        return False
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    return torch.backends.cuda.matmul.allow_tf32 if precision is None else precision == "tf32"


def _check_row_vectors(*vectors):
    # The kernels index these with unit stride.
    if not all(v.is_contiguous() for v in vectors):
        raise ValueError("row_index, targets (and lse, grad) must be contiguous")


def _launch(kernel, tuned, grid, args, config, **meta):
    """``kernel`` launched with ``config`` (a ``triton.Config``), or ``tuned`` (its autotuned
    form) when ``config`` is None."""
    if config is None:
        tuned[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def linear_logprobs_kernel(
    hidden, weight, row_index, targets, bias=None, softcap=None, temperature=1.0, tf32=False, *,
    n_splits=None, config=None, upcast_bf16_dots=False,
):
    """(log p(target) (M,), lse (M,)) in fp32 of the rows ``hidden[row_index]`` (M = len(row_index)).

    hidden (N, D) with unit stride along D, weight (V, D) contiguous, row_index and
    targets (M,) int64. Every target must lie in [0, V): the caller drops ignored rows
    beforehand. Logits may be -inf (a -inf bias bans tokens) except at the targets.
    ``tf32``: fp32 inputs' dots on TF32 tensor cores (``tf32_dots`` says whether torch
    allows it); the backward must be given the same choice. ``n_splits``: vocabulary
    splits (default: about two programs per SM). ``config``: one ``triton.Config``
    (BLOCK_M, BLOCK_N, BLOCK_K) instead of autotuning over ``FORWARD_CONFIGS``.
    ``upcast_bf16_dots``: the interpreter workaround (``common``).
    """
    M, (V, D) = row_index.shape[0], weight.shape
    _check_row_vectors(row_index, targets)
    target_logit = torch.empty(M, dtype=torch.float32, device=hidden.device)
    if M == 0:
        return target_logit, torch.empty_like(target_logit)
    n_splits = n_splits or _vocab_splits(triton.cdiv(M, 128), V, hidden.device)
    partial_lse = torch.empty((n_splits, M), dtype=torch.float32, device=hidden.device)

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), n_splits

    args = (hidden, row_index, weight, bias, targets, partial_lse, target_logit,
            M, V, D, hidden.stride(0), weight.stride(0), softcap, 1.0 / temperature, n_splits)
    _launch(_linear_logprobs_kernel, _linear_logprobs_kernel_tuned, grid, args, config,
            DOT_FP32=dot_fp32(hidden.dtype, upcast_bf16_dots), TF32=tf32 and hidden.dtype == torch.float32)
    lse = torch.logsumexp(partial_lse, dim=0)
    return target_logit - lse, lse


_GRADIENT_ARGS = ("d_rows_ptr", "d_weight_ptr", "d_bias_ptr")


def _snapshot_gradients(kwargs, reset_only=False):
    """Autotuning runs the accumulating kernel once per trial on the live buffers, and d_rows
    already holds the earlier vocabulary chunks: each trial is bracketed by a snapshot (here)
    and a restore (``_restore_gradients``), so the final launch adds to what was there.

    Our own hooks rather than ``restore_value``, which older autotuners also apply to the
    gradients that are not computed (None). The snapshot rides in the argument dict both
    hooks receive, so concurrent autotuning (one thread per GPU) cannot mix them up.
    ``reset_only`` (before the final launch): nothing to do.
    """
    if not reset_only:
        kwargs["_snapshots"] = {name: kwargs[name].clone() for name in _GRADIENT_ARGS if kwargs[name] is not None}


def _restore_gradients(kwargs, exception=None):
    for name, saved in kwargs.pop("_snapshots", {}).items():
        kwargs[name].copy_(saved)


@triton.heuristics({
    **_HEURISTICS,
    "HAS_D_ROWS": lambda args: args["d_rows_ptr"] is not None,
    "HAS_D_WEIGHT": lambda args: args["d_weight_ptr"] is not None,
    "HAS_D_BIAS": lambda args: args["d_bias_ptr"] is not None,
})
@triton.jit
def _linear_logprobs_backward_kernel(
    # Pointers: hidden (N, D), row_index (M,), this launch's vocabulary chunk of weight
    # (V, D) and bias (or None), targets (M,), the forward's lse (M,), upstream gradient
    # (M,); fp32 outputs (each None when not needed): d_rows (M, D), d_weight (V, D), d_bias (V,).
    rows_ptr, row_index_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_ptr,
    d_rows_ptr, d_weight_ptr, d_bias_ptr,
    # Sizes and strides, the chunk's first vocabulary id, the logit transform.
    M, V, D, vocab_start, stride_row, stride_weight, softcap, inv_temperature,
    # Meta-parameters: what the heuristics derive, the dot precision, the tile and its grouping.
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_FP32: tl.constexpr, TF32: tl.constexpr,
    HAS_D_ROWS: tl.constexpr, HAS_D_WEIGHT: tl.constexpr, HAS_D_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(V, BLOCK_N),): one program per (row block, vocabulary
    block) tile recomputes the tile's logits, forms d s (module docstring) and adds the
    tile's contributions to d_rows, d_weight and d_bias with fp32 atomics."""
    # Grouped tile order (as in the Triton matmul tutorial): consecutive programs
    # share weight blocks and row blocks while they are still in L2.
    pid = tl.program_id(0)
    n_blocks_m = tl.cdiv(M, BLOCK_M)
    n_blocks_n = tl.cdiv(V, BLOCK_N)
    group = pid // (GROUP_M * n_blocks_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(n_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_blocks_n)) % group_size
    pid_n = (pid % (GROUP_M * n_blocks_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = offs_m < M
    col_in = offs_n < V
    rows_m = offs_m % M
    cols_n = offs_n % V
    row_ids = tl.load(row_index_ptr + rows_m)
    s = _pre_softcap_logits(
        rows_ptr, weight_ptr, bias_ptr, row_ids, cols_n, D, stride_row, stride_weight,
        HAS_BIAS, EVEN_D, DOT_FP32, TF32, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    if HAS_SOFTCAP:
        t = tanh(s / softcap)
        z = softcap * t * inv_temperature
    else:
        z = s * inv_temperature
    targets = tl.load(targets_ptr + rows_m)
    lse = tl.load(lse_ptr + rows_m)
    grad = tl.where(row_in, tl.load(grad_ptr + rows_m), 0.0)
    # The weight, bias and d_weight pointers start at this launch's vocabulary chunk.
    onehot = (offs_n[None, :] + vocab_start == targets[:, None]).to(tl.float32)
    ds_unit = (onehot - tl.exp(z - lse[:, None])) * inv_temperature  # d s_iv / g_i
    if HAS_SOFTCAP:
        ds_unit = ds_unit * (1.0 - t * t)
    # Wrapped (duplicate) rows and columns must add nothing.
    ds_unit = tl.where(row_in[:, None] & col_in[None, :], ds_unit, 0.0)

    if HAS_D_BIAS:
        tl.atomic_add(d_bias_ptr + offs_n, tl.sum(ds_unit * grad[:, None], axis=0), mask=col_in)
    # fp16 would flush g_i d s_iv to zero for SAMI's ~1e-5 per-token gradients: g goes onto
    # the fp32 products instead (module docstring). bf16 has fp32's range: one operand serves both dots.
    GRAD_AFTER_DOT: tl.constexpr = rows_ptr.dtype.element_ty == tl.float16
    if GRAD_AFTER_DOT:
        ds_operand = ds_unit.to(tl.float16)
        grad_max = tl.max(tl.abs(grad), axis=0)
        grad_max = tl.where(grad_max > 0.0, grad_max, 1.0)
        row_weights = grad / grad_max
    elif DOT_FP32:
        ds_operand = ds_unit * grad[:, None]
    else:  # tensor-core operand in the input dtype; the products still accumulate in fp32
        ds_operand = (ds_unit * grad[:, None]).to(rows_ptr.dtype.element_ty)
    offs_k = tl.arange(0, BLOCK_K)
    row_offsets = offs_m[:, None].to(tl.int64) * D + offs_k[None, :]
    weight_offsets = offs_n[:, None].to(tl.int64) * D + offs_k[None, :]
    row_ptrs = rows_ptr + row_ids[:, None].to(tl.int64) * stride_row + offs_k[None, :]
    weight_ptrs = weight_ptr + cols_n[:, None].to(tl.int64) * stride_weight + offs_k[None, :]
    for k in range(0, D, BLOCK_K):
        in_d = offs_k[None, :] < D - k
        if HAS_D_ROWS:
            if EVEN_D:
                w = tl.load(weight_ptrs)
            else:
                w = tl.load(weight_ptrs, mask=in_d, other=0.0)
            d_rows = dot(ds_operand, w, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), DOT_FP32, TF32)
            if GRAD_AFTER_DOT:
                d_rows = d_rows * grad[:, None]
            tl.atomic_add(d_rows_ptr + row_offsets, d_rows, mask=row_in[:, None] & in_d)
        if HAS_D_WEIGHT:
            if EVEN_D:
                h = tl.load(row_ptrs)
            else:
                h = tl.load(row_ptrs, mask=in_d, other=0.0)
            if GRAD_AFTER_DOT:
                h = (h.to(tl.float32) * row_weights[:, None]).to(tl.float16)
            d_weight = dot(tl.trans(ds_operand), h, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), DOT_FP32,
                            TF32)
            if GRAD_AFTER_DOT:
                d_weight = d_weight * grad_max
            tl.atomic_add(d_weight_ptr + weight_offsets, d_weight, mask=col_in[:, None] & in_d)
        row_offsets += BLOCK_K
        weight_offsets += BLOCK_K
        row_ptrs += BLOCK_K
        weight_ptrs += BLOCK_K


# Autotuned launches. The backward's key is not V: a launch's V is its vocabulary chunk,
# whose width follows the row count when rows are few; tuning again for every new width
# would stall training steps.
_linear_logprobs_kernel_tuned = triton.autotune(FORWARD_CONFIGS, key=["V", "D", "DOT_FP32", "TF32"])(
    _linear_logprobs_kernel)
_linear_logprobs_backward_kernel_tuned = triton.autotune(
    BACKWARD_CONFIGS, key=["D", "DOT_FP32", "TF32"], pre_hook=_snapshot_gradients, post_hook=_restore_gradients,
)(_linear_logprobs_backward_kernel)


def _vocab_chunk(M: int, V: int, D: int, sms: int) -> int:
    """Vocabulary columns per backward launch, a multiple of the 128-column tile: about
    32 MiB of fp32 d_weight; when rows are few, widened (at most 4x) towards four whole
    waves of 128 x 128 tiles over the SMs, so that each launch still fills the GPU."""
    lean = max(1, D_WEIGHT_CHUNK_ELEMENTS // (D * 128))
    filling = max(1, 4 * sms // triton.cdiv(M, 128))  # rounded down: no straggling partial wave
    return min(V, max(lean, min(filling, 4 * lean)) * 128)


def _tile_grid(M: int, V: int):
    """The backward's grid: one program per (row block, vocabulary block) tile."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(V, meta["BLOCK_N"]),)


def linear_logprobs_backward_kernel(
    hidden, weight, row_index, targets, lse, grad, bias=None, softcap=None, temperature=1.0,
    need_rows=True, need_weight=True, need_bias=False, vocab_chunk=None, tf32=False, *,
    config=None, upcast_bf16_dots=False,
):
    """(d_rows fp32 (M, D), d_weight in weight's dtype, d_bias fp32) of the rows ``hidden[row_index]``
    for per-row upstream gradients ``grad`` (M,) fp32; a gradient that is not needed is None
    and its work is skipped. d_rows is per gathered row: the caller scatters it into hidden's shape.

    ``vocab_chunk``: vocabulary columns per launch (default ``_vocab_chunk``; all of V for a
    frozen head). ``config``: one ``triton.Config`` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    instead of autotuning over ``BACKWARD_CONFIGS``. ``tf32``, ``upcast_bf16_dots``: as in
    ``linear_logprobs_kernel``.
    """
    M, (V, D) = row_index.shape[0], weight.shape
    _check_row_vectors(row_index, targets, lse, grad)
    if vocab_chunk is not None and vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be a positive number of columns, got {vocab_chunk}")
    fp32 = dict(dtype=torch.float32, device=hidden.device)
    d_rows = torch.zeros((M, D), **fp32) if need_rows else None
    # An fp32 weight accumulates straight into its gradient; other dtypes through an fp32 chunk.
    in_place = weight.dtype == torch.float32
    d_weight = (torch.zeros_like if in_place or M == 0 else torch.empty_like)(weight) if need_weight else None
    d_bias = torch.zeros(V, **fp32) if need_bias else None
    if M == 0 or not (need_rows or need_weight or need_bias):
        return d_rows, d_weight, d_bias
    if vocab_chunk is None:
        if not need_weight:
            vocab_chunk = V  # a frozen head: no d_weight to accumulate chunk by chunk
        else:
            vocab_chunk = _vocab_chunk(M, V, D, _sm_count(hidden.device))
    scratch = torch.empty((min(vocab_chunk, V), D), **fp32) if need_weight and not in_place else None
    for start in range(0, V, vocab_chunk):
        end = min(start + vocab_chunk, V)
        d_weight_chunk = None
        if need_weight:
            d_weight_chunk = d_weight[start:end] if scratch is None else scratch[: end - start].zero_()
        args = (hidden, row_index, weight[start:end], None if bias is None else bias[start:end], targets, lse, grad,
                d_rows, d_weight_chunk, None if d_bias is None else d_bias[start:end],
                M, end - start, D, start, hidden.stride(0), weight.stride(0), softcap, 1.0 / temperature)
        _launch(_linear_logprobs_backward_kernel, _linear_logprobs_backward_kernel_tuned, _tile_grid(M, end - start),
                args, config, DOT_FP32=dot_fp32(hidden.dtype, upcast_bf16_dots),
                TF32=tf32 and hidden.dtype == torch.float32)
        if scratch is not None:
            d_weight[start:end].copy_(d_weight_chunk)
    return d_rows, d_weight, d_bias
