"""Fused SAMI mutual-information loss: both log-sum-exps, the loss, its gradient and stats.

For one query with scores x (C, C) (row k = constitution, column j = response,
targets on the diagonal), an optional keep-mask M (masked entries are -inf) and
valid_k = M_kk (row k and column k contribute iff their diagonal entry is kept):

    r_k = logsumexp_j x_kj            c_j = logsumexp_k x_kj
    n   = sum_k valid_k
    L   = (sum_k valid_k (r_k - x_kk) + sum_j valid_j (c_j - x_jj)) / (2 n)
    dL/dx_kj = (valid_k (exp(x_kj - r_k) - d_kj) + valid_j (exp(x_kj - c_j) - d_kj)) / (2 n)

The batch loss is the mean of L over the Q queries with n > 0 (Q = B without a
mask; with one the launcher counts Q on the device, so no host sync). The kernel
writes, per query, (L / Q, n, row hits, column hits) in fp32 (fp64 for fp64
input) -- the batch loss is the sum of the first column -- and, when asked, the
gradient of the batch loss, dL/dx / Q, in the input dtype, rounded once. A hit
is a contributing row (column) whose first argmax is its diagonal entry.

One program per query. When C <= BLOCK the whole (BLOCK, BLOCK) tile stays in
registers and x is read once. Otherwise the program walks (BLOCK, BLOCK) tiles
row block by row block: pass 1 keeps each row block's online log-sum-exp and
argmax in registers and folds each tile into the columns' running (max, sum,
argmax) kept in a (4, C) fp32 scratch per query, which also takes the row
log-sum-exps; pass 2 rereads the tiles and writes the gradient. Reads are
2 B C^2, extra memory O(B C). (One program per query suits the SAMI shapes,
B ~ 64 queries of C <= 64; a lone query with C in the thousands runs on one SM.)
"""

import torch
import triton
import triton.language as tl

from .common import online_lse_update

# Per-query outputs, in this order along the last axis of the (B, 4) result.
LOSS, COUNT, ROW_HITS, COLUMN_HITS = range(4)

SINGLE_TILE_MAX = 64  # largest C kept as one register tile (128 spills registers on Hopper)
_TILE = 64  # tile edge of the multi-tile path


@triton.jit
def _load_tile(x_ptr, mask_ptr, base_x, base_m, rows, cols, C,
               stride_xr, stride_xc, stride_mr, stride_mc,
               HAS_MASK: tl.constexpr, EVEN_C: tl.constexpr, ACC: tl.constexpr):
    """(rows, cols) tile of x in ACC precision; masked and out-of-range entries are -inf."""
    x_ptrs = x_ptr + base_x + rows[:, None].to(tl.int64) * stride_xr + cols[None, :] * stride_xc
    if EVEN_C:
        x = tl.load(x_ptrs).to(ACC)
    else:
        in_range = (rows[:, None] < C) & (cols[None, :] < C)
        x = tl.load(x_ptrs, mask=in_range, other=float("-inf")).to(ACC)
    if HAS_MASK:
        m_ptrs = mask_ptr + base_m + rows[:, None].to(tl.int64) * stride_mr + cols[None, :] * stride_mc
        if EVEN_C:
            keep = tl.load(m_ptrs)
        else:
            keep = tl.load(m_ptrs, mask=in_range, other=0)
        x = tl.where(keep != 0, x, float("-inf"))
    return x


@triton.jit
def _load_diagonal(x_ptr, mask_ptr, base_x, base_m, idx, C,
                   stride_xr, stride_xc, stride_mr, stride_mc,
                   HAS_MASK: tl.constexpr, ACC: tl.constexpr):
    """x_kk and valid_k for k in idx."""
    valid = idx < C
    diag = tl.load(x_ptr + base_x + idx.to(tl.int64) * (stride_xr + stride_xc), mask=valid, other=0).to(ACC)
    if HAS_MASK:
        keep = tl.load(mask_ptr + base_m + idx.to(tl.int64) * (stride_mr + stride_mc), mask=valid, other=0)
        valid = valid & (keep != 0)
    return diag, valid


@triton.jit
def _online_lse_argmax(m, s, arg, x, offset, AXIS: tl.constexpr):
    """Fold tile x into running (max, sum of exp(. - max), first argmax) along AXIS."""
    tile_max, tile_arg = tl.max(x, axis=AXIS, return_indices=True, return_indices_tie_break_left=True)
    # Strictly greater: an earlier tile keeps the argmax on ties, like torch.argmax.
    arg = tl.where(tile_max > m, tile_arg + offset, arg)
    m, s = online_lse_update(m, s, x, AXIS)
    return m, s, arg


@triton.jit
def _gradient_tile(x, rows, cols, row_lse, col_lse, row_valid, col_valid, scale):
    """dL/dx for one tile; exp of a non-contributing line (lse maybe -inf) is discarded by where."""
    g = tl.where(row_valid[:, None], tl.exp(x - row_lse[:, None]), 0.0)
    g += tl.where(col_valid[None, :], tl.exp(x - col_lse[None, :]), 0.0)
    g = tl.where(rows[:, None] == cols[None, :], g - 2.0 * row_valid[:, None].to(g.dtype), g)
    return g * scale


@triton.jit
def _store_tile(grad_ptr, base_g, rows, cols, C, g, EVEN_C: tl.constexpr):
    """Write the (rows, cols) tile ``g`` of one query's gradient in the gradient's dtype."""
    ptrs = grad_ptr + base_g + rows[:, None].to(tl.int64) * C + cols[None, :]
    if EVEN_C:
        tl.store(ptrs, g.to(grad_ptr.dtype.element_ty))
    else:
        tl.store(ptrs, g.to(grad_ptr.dtype.element_ty), mask=(rows[:, None] < C) & (cols[None, :] < C))


@triton.heuristics({
    "HAS_MASK": lambda args: args["mask_ptr"] is not None,
    "STORE_GRAD": lambda args: args["grad_ptr"] is not None,
    "SINGLE_TILE": lambda args: args["C"] <= args["BLOCK"],
    "EVEN_C": lambda args: args["C"] % args["BLOCK"] == 0,
})
@triton.jit
def _mi_loss_kernel(
    # Pointers: scores (B, C, C), keep-mask as bytes (or None), the number Q of contributing
    # queries (a device scalar; None without a mask), gradient (B, C, C) (or None), the
    # (B, 4) per-query table, the (B, 4, C) multi-tile scratch (or None).
    x_ptr, mask_ptr, num_queries_ptr, grad_ptr, out_ptr, scratch_ptr,
    # Sizes and strides.
    C,
    stride_xb, stride_xr, stride_xc,
    stride_mb, stride_mr, stride_mc,
    # Meta-parameters: the tile edge, and what the heuristics derive from the arguments.
    BLOCK: tl.constexpr,
    HAS_MASK: tl.constexpr, STORE_GRAD: tl.constexpr, SINGLE_TILE: tl.constexpr, EVEN_C: tl.constexpr,
):
    """Grid (B,): program b computes query b's row of the table, and its gradient.

    The row is (L_b / Q, n_b, row hits, column hits) in the table's dtype (module
    docstring); with ``STORE_GRAD`` the program also writes dL/dx_b / Q. One tile when
    ``SINGLE_TILE`` (C <= BLOCK), else two passes over (BLOCK, BLOCK) tiles.
    """
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    base_x = b * stride_xb
    base_m = b * stride_mb
    base_g = b * C * C
    offs = tl.arange(0, BLOCK)
    if HAS_MASK:
        num_queries = tl.load(num_queries_ptr).to(ACC)
    else:
        num_queries = tl.num_programs(0).to(ACC)

    if SINGLE_TILE:
        x = _load_tile(x_ptr, mask_ptr, base_x, base_m, offs, offs, C,
                       stride_xr, stride_xc, stride_mr, stride_mc, HAS_MASK, EVEN_C, ACC)
        diag, valid = _load_diagonal(x_ptr, mask_ptr, base_x, base_m, offs, C,
                                     stride_xr, stride_xc, stride_mr, stride_mc, HAS_MASK, ACC)
        lines = tl.full([BLOCK], float("-inf"), ACC)
        zeros = tl.zeros([BLOCK], ACC)
        first = tl.zeros([BLOCK], tl.int32)
        row_max, row_sum, row_arg = _online_lse_argmax(lines, zeros, first, x, 0, 1)
        col_max, col_sum, col_arg = _online_lse_argmax(lines, zeros, first, x, 0, 0)
        row_lse = row_max + tl.log(row_sum)
        col_lse = col_max + tl.log(col_sum)
        count = tl.sum(valid.to(tl.int32))
        row_ce = tl.sum(tl.where(valid, row_lse - diag, 0.0))
        col_ce = tl.sum(tl.where(valid, col_lse - diag, 0.0))
        row_hits = tl.sum((valid & (row_arg == offs)).to(tl.int32))
        col_hits = tl.sum((valid & (col_arg == offs)).to(tl.int32))
        scale = 0.5 / (tl.maximum(count, 1).to(ACC) * num_queries)
        if STORE_GRAD:
            g = _gradient_tile(x, offs, offs, row_lse, col_lse, valid, valid, scale)
            _store_tile(grad_ptr, base_g, offs, offs, C, g, EVEN_C)
    else:
        # Scratch rows: column running max, sum, argmax; then the row log-sum-exps.
        col_max_ptr = scratch_ptr + b * 4 * C
        col_sum_ptr = col_max_ptr + C
        col_arg_ptr = col_sum_ptr + C
        row_lse_ptr = col_arg_ptr + C
        for c0 in range(0, C, BLOCK):
            cols = c0 + offs
            tl.store(col_max_ptr + cols, tl.full([BLOCK], float("-inf"), ACC), mask=cols < C)
            tl.store(col_sum_ptr + cols, tl.zeros([BLOCK], ACC), mask=cols < C)
            tl.store(col_arg_ptr + cols, tl.zeros([BLOCK], ACC), mask=cols < C)
        tl.debug_barrier()

        # Pass 1: row log-sum-exps and argmaxes in registers, column state in scratch.
        count = tl.zeros([], tl.int32)
        row_ce = tl.zeros([], ACC)
        row_hits = tl.zeros([], tl.int32)
        for r0 in range(0, C, BLOCK):
            rows = r0 + offs
            row_max = tl.full([BLOCK], float("-inf"), ACC)
            row_sum = tl.zeros([BLOCK], ACC)
            row_arg = tl.zeros([BLOCK], tl.int32)
            for c0 in range(0, C, BLOCK):
                cols = c0 + offs
                x = _load_tile(x_ptr, mask_ptr, base_x, base_m, rows, cols, C,
                               stride_xr, stride_xc, stride_mr, stride_mc, HAS_MASK, EVEN_C, ACC)
                row_max, row_sum, row_arg = _online_lse_argmax(row_max, row_sum, row_arg, x, c0, 1)
                in_range = cols < C
                col_max = tl.load(col_max_ptr + cols, mask=in_range, other=float("-inf"))
                col_sum = tl.load(col_sum_ptr + cols, mask=in_range, other=0.0)
                col_arg = tl.load(col_arg_ptr + cols, mask=in_range, other=0.0).to(tl.int32)
                # Every thread holding a replica of these columns must have read them
                # before the owning thread overwrites them below.
                tl.debug_barrier()
                col_max, col_sum, col_arg = _online_lse_argmax(col_max, col_sum, col_arg, x, r0, 0)
                tl.store(col_max_ptr + cols, col_max, mask=in_range)
                tl.store(col_sum_ptr + cols, col_sum, mask=in_range)
                tl.store(col_arg_ptr + cols, col_arg.to(ACC), mask=in_range)
                # Other threads of this program read these columns at the next row block.
                tl.debug_barrier()
            row_lse = row_max + tl.log(row_sum)
            tl.store(row_lse_ptr + rows, row_lse, mask=rows < C)
            diag, valid = _load_diagonal(x_ptr, mask_ptr, base_x, base_m, rows, C,
                                         stride_xr, stride_xc, stride_mr, stride_mc, HAS_MASK, ACC)
            count += tl.sum(valid.to(tl.int32))
            row_ce += tl.sum(tl.where(valid, row_lse - diag, 0.0))
            row_hits += tl.sum((valid & (row_arg == rows)).to(tl.int32))
        tl.debug_barrier()

        col_ce = tl.zeros([], ACC)
        col_hits = tl.zeros([], tl.int32)
        for c0 in range(0, C, BLOCK):
            cols = c0 + offs
            diag, valid = _load_diagonal(x_ptr, mask_ptr, base_x, base_m, cols, C,
                                         stride_xr, stride_xc, stride_mr, stride_mc, HAS_MASK, ACC)
            col_lse = tl.load(col_max_ptr + cols, mask=cols < C, other=0.0) \
                + tl.log(tl.load(col_sum_ptr + cols, mask=cols < C, other=1.0))
            col_arg = tl.load(col_arg_ptr + cols, mask=cols < C, other=0.0).to(tl.int32)
            col_ce += tl.sum(tl.where(valid, col_lse - diag, 0.0))
            col_hits += tl.sum((valid & (col_arg == cols)).to(tl.int32))
        scale = 0.5 / (tl.maximum(count, 1).to(ACC) * num_queries)

        # Pass 2: the gradient, tile by tile.
        if STORE_GRAD:
            for r0 in range(0, C, BLOCK):
                rows = r0 + offs
                row_lse = tl.load(row_lse_ptr + rows, mask=rows < C, other=0.0)
                _, row_valid = _load_diagonal(x_ptr, mask_ptr, base_x, base_m, rows, C,
                                              stride_xr, stride_xc, stride_mr, stride_mc, HAS_MASK, ACC)
                for c0 in range(0, C, BLOCK):
                    cols = c0 + offs
                    x = _load_tile(x_ptr, mask_ptr, base_x, base_m, rows, cols, C,
                                   stride_xr, stride_xc, stride_mr, stride_mc, HAS_MASK, EVEN_C, ACC)
                    col_lse = tl.load(col_max_ptr + cols, mask=cols < C, other=0.0) \
                        + tl.log(tl.load(col_sum_ptr + cols, mask=cols < C, other=1.0))
                    _, col_valid = _load_diagonal(x_ptr, mask_ptr, base_x, base_m, cols, C,
                                                  stride_xr, stride_xc, stride_mr, stride_mc, HAS_MASK, ACC)
                    g = _gradient_tile(x, rows, cols, row_lse, col_lse, row_valid, col_valid, scale)
                    _store_tile(grad_ptr, base_g, rows, cols, C, g, EVEN_C)

    out = out_ptr + b * 4  # LOSS, COUNT, ROW_HITS, COLUMN_HITS
    tl.store(out + 0, (row_ce + col_ce) * scale)
    tl.store(out + 1, count.to(ACC))
    tl.store(out + 2, row_hits.to(ACC))
    tl.store(out + 3, col_hits.to(ACC))


def tile_warps(block_size: int) -> int:
    """Warps for a (block_size, block_size) tile: ~512 elements a warp."""
    return min(8, max(1, block_size * block_size // 512))


def mi_loss_kernel(logprobs: torch.Tensor, mask: torch.Tensor | None = None, *,
                   compute_grad: bool = True, block_size: int | None = None, max_block: int = SINGLE_TILE_MAX):
    """Per-query table and gradient of the batch SAMI loss of (B, C, C) ``logprobs``.

    ``mask`` (B, C, C) bool keeps an entry where True (None: keep all). Returns
    ``(out, grad)``: ``out`` (B, 4) in fp32 (fp64 for fp64 input) with columns
    LOSS (the query's share L_b / Q of the batch loss), COUNT (n_b), ROW_HITS and
    COLUMN_HITS; ``grad`` (B, C, C) in the input dtype (None unless
    ``compute_grad``), the gradient of the batch loss ``out[:, LOSS].sum()``.
    ``block_size`` (a power of two, at most ``max_block``) forces the tile edge, e.g. to
    test the multi-tile path at small C. A register tile beyond 64 does not compile
    usefully on a GPU; the interpreter has no registers, so tests may raise ``max_block``
    to run C = 4096 as one tile quickly.
    """
    B, C, _ = logprobs.shape
    acc_dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    if block_size is None:
        block_size = max(16, triton.next_power_of_2(C)) if C <= SINGLE_TILE_MAX else _TILE
    elif block_size < 1 or block_size & (block_size - 1) or block_size > max_block:
        raise ValueError(f"block_size must be a power of two <= {max_block}, got {block_size}")
    out = torch.empty((B, 4), dtype=acc_dtype, device=logprobs.device)
    grad = torch.empty((B, C, C), dtype=logprobs.dtype, device=logprobs.device) if compute_grad else None
    scratch = torch.empty((B, 4, C), dtype=acc_dtype, device=logprobs.device) if C > block_size else None
    mask_strides, num_queries = (0, 0, 0), None
    if mask is not None:
        num_queries = mask.diagonal(dim1=1, dim2=2).any(dim=1).sum()
        mask = mask.view(torch.uint8)  # bool storage read as bytes
        mask_strides = mask.stride()
    _mi_loss_kernel[(B,)](
        logprobs, mask, num_queries, grad, out, scratch, C,
        *logprobs.stride(), *mask_strides,
        BLOCK=block_size, num_warps=tile_warps(block_size),
    )
    return out, grad
