"""Memory-lean per-row log-probs in plain PyTorch: the torch backend of the LM-head losses.

For aligned rows x_i (N, D), an LM head W (V, D), optional bias b (V,) and targets t_i:

    u_i = x_i Wᵀ + b
    z_i = softcap · tanh(u_i / softcap) / temperature        (without softcap: u_i / temperature)
    out_i = z_i[t_i] - logsumexp(z_i)                         (0 where t_i == ignore_index)

exactly ``sami_fast.reference.token_logprobs``, without ever holding the (N, V) logits.
Only rows with a scored target are processed (in SAMI most rows are prompt), in tiles of
rows x a block of the vocabulary: the forward keeps only the per-row log-sum-exp (fp32),
merged across vocabulary blocks online, and the backward recomputes each tile's logits, or,
given a ``held`` buffer of the (N, V) logits, reads them from it (a quarter fewer flops:
6·N·D·V instead of 8·N·D·V, for N·V·4 bytes).
With upstream gradient g_i and p_i = softmax(z_i):

    dz_i = g_i · (onehot(t_i) - p_i)
    du_i = dz_i · (1 - tanh²(u_i / softcap)) / temperature  (without softcap: dz_i / temperature)
    dx_i = du_i W,   dW = Σ_i du_iᵀ x_i,   db = Σ_i du_i

The backward forms p - onehot in the tile (two in-place passes) and puts g_i / temperature
on the small side of each matmul: on x_i (rows x D) for dW, on the summed dx_i at the end,
so no pass over the tile scales it.

Extra memory is one tile, plus in backward an fp32 dx for the rows and, for a bf16/fp16
head, an fp32 dW accumulator for one vocabulary block at a time (~32 MiB at most), cast
into the gradient as each block finishes: never an fp32 copy of all of W. An fp32 head
accumulates straight into its gradient.

The functions here are the torch twins of the kernel launchers (``linear_logprobs_*``
of ``kernels/linear_logprobs.py``, ``logits_logprobs_*`` of ``kernels/logits_logprobs.py``);
the autograd Functions that call them live with their public functions.
"""

import functools

import torch

# The backward's fp32 dW accumulator for a bf16/fp16 head: one vocabulary block of ~32 MiB,
# as in the kernels' backward.
from sami_fast.kernels.linear_logprobs import D_WEIGHT_CHUNK_ELEMENTS
from sami_fast.validation import check_positive_int

# Logits per tile (rows x vocabulary block): 16 MiB of fp32. Measured on a 2-core AMD EPYC (MKL
# sgemm, 2 threads), SmolLM2's head over 4096 rows (benchmarks/results/head_bar_cpu_amd_epyc.md):
# tiles of 2048 rows x 2048 columns ran the fp32 head's forward+backward in 9.56 s against 11.13 s
# for 341 rows x the whole vocabulary (64 MiB), whose (rows x D) @ (D x V) forward product ran at
# ~75 GFLOP/s against 100-130 for square-ish blocks; they also keep 53 MB less.
TILE_ELEMENTS = 2**22
# Columns of a tile's vocabulary block, None: the whole vocabulary (the tests vary it).
VOCAB_BLOCK = 2048
# Held logits need no matmul: chunks of 4 MiB (fp32) stay in cache across their passes.
LOGITS_CHUNK_ELEMENTS = 2**20


def default_chunk_rows(vocab_size: int, chunk_elements: int = LOGITS_CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // vocab_size)


def tile_shape(n_rows: int, weight: torch.Tensor, chunk_rows: int | None = None) -> tuple[int, int]:
    """(rows, vocabulary columns) of a logits tile for ``n_rows`` rows and the head ``weight``;
    ``chunk_rows`` caps the rows."""
    vocab, dim = weight.shape
    width = min(VOCAB_BLOCK or vocab, vocab)
    if weight.dtype not in (torch.float32, torch.float64):  # the fp32 dW accumulator covers one block
        width = min(width, max(1, D_WEIGHT_CHUNK_ELEMENTS // max(dim, 1)))
    rows = max(1, min(n_rows, TILE_ELEMENTS // width, chunk_rows or n_rows))
    return rows, width


def logsumexp_and_pick_(z: torch.Tensor, targets: torch.Tensor):
    """(logsumexp(z, 1), z[i, targets[i]]) of an fp32 chunk; overwrites ``z`` (no temporaries)."""
    picked = z.gather(1, targets.unsqueeze(1)).squeeze(1)
    top = z.amax(dim=1, keepdim=True)
    lse = z.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
    return lse, picked


def softmax_minus_onehot_(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, first_column: int = 0):
    """In place, ``z <- softmax(z) - onehot(targets)`` given its row ``lse``, for the columns
    ``first_column ..`` of the vocabulary that ``z`` holds (targets outside them add nothing)."""
    z.sub_(lse.unsqueeze(1)).exp_()
    column = targets - first_column
    inside = (column >= 0) & (column < z.shape[1])
    # scatter_add_ of 0/-1 rather than indexing the hits: no host sync on a GPU.
    return z.scatter_add_(1, column.clamp(0, z.shape[1] - 1).unsqueeze(1), inside.to(z.dtype).neg_().unsqueeze(1))


def autocast_off(backward):
    """A ``.backward()`` called inside an autocast region would recast the backward's
    matmuls (an fp32 head's dx in bf16): they run in the dtypes the forward chose.
    Decorates an autograd Function's ``backward(ctx, grad_out)``."""

    @functools.wraps(backward)
    def run(ctx, grad_out):
        if not torch.is_autocast_enabled(grad_out.device.type):
            return backward(ctx, grad_out)
        with torch.autocast(grad_out.device.type, enabled=False):
            return backward(ctx, grad_out)

    return run


def linear_logprobs_forward(rows, weight, targets, bias=None, softcap=None, temperature=1.0, chunk_rows=None,
                            held=None):
    """(log p(target) (N,), lse (N,)) in fp32 (fp64 for fp64 inputs) of ``rows`` (N, D) under
    the head ``weight`` (V, D), ``bias`` (V,); every target lies in [0, V).

    ``chunk_rows``: caps the rows of a logits tile (default: ``tile_shape``'s choice).
    ``held``: None, or an (N, V) buffer of the logits' dtype (``held_logits``) that receives
    the logits z, for ``linear_logprobs_backward`` to read instead of recomputing them.
    """
    if chunk_rows is not None:
        check_positive_int("chunk_rows", chunk_rows)
    picked, lse = _picked_and_lse(rows, weight, targets, bias, softcap, temperature, chunk_rows, held)
    return picked - lse, lse


def held_logits(n_rows: int, weight: torch.Tensor, budget: int):
    """An empty (``n_rows``, V) buffer for the logits of ``n_rows`` rows under ``weight``
    (fp32, fp64 for fp64) when it takes at most ``budget`` bytes, else None."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    if budget <= 0 or n_rows * weight.shape[0] * dtype.itemsize > budget:
        return None
    return torch.empty((n_rows, weight.shape[0]), dtype=dtype, device=weight.device)


def linear_logprobs_backward(rows, weight, targets, lse, grad_out, bias=None, softcap=None, temperature=1.0,
                             need_rows=True, need_weight=True, need_bias=False, chunk_rows=None, held=None):
    """(d_rows, d_weight, d_bias) in the dtypes of rows, weight and bias (None where not
    needed) for the per-row upstream gradient ``grad_out`` (N,), given the forward's ``lse``.

    ``chunk_rows``: as in ``linear_logprobs_forward``. ``held``: the buffer the forward
    filled, or None (recompute the logits); it is only read.
    """
    return _gradients(rows, weight, bias, targets, lse, grad_out, softcap, temperature, chunk_rows,
                      (need_rows, need_weight, None, need_bias), held)


def _picked_and_lse(rows, weight, targets, bias, softcap, temperature, chunk_rows, held=None):
    """(z_i[t_i], logsumexp(z_i)) (N,) in fp32 (fp64 for fp64 inputs), tile by tile: per
    vocabulary block, each row's block maximum and sum of exp(z - maximum) are merged into
    running ones (online log-sum-exp)."""
    n = rows.shape[0]
    block_rows, width = tile_shape(n, weight, chunk_rows)
    head = _Head(weight, bias, softcap, temperature, block_rows, width)
    sums = dict(dtype=head.dtype, device=rows.device)
    running_max = torch.full((n,), float("-inf"), **sums)
    total, picked = torch.zeros(n, **sums), torch.zeros(n, **sums)
    for first in range(0, weight.shape[0], width):
        last = min(first + width, weight.shape[0])
        for start in range(0, n, block_rows):
            end = min(start + block_rows, n)
            z, _ = head.logits(rows[start:end], first, last)
            if held is not None:
                held[start:end, first:last] = z
            column = targets[start:end] - first
            inside = (column >= 0) & (column < last - first)
            hit = z.gather(1, column.clamp(0, last - first - 1).unsqueeze(1)).squeeze(1)
            picked[start:end] = torch.where(inside, hit, picked[start:end])
            block_max = z.amax(dim=1)
            # A block of -inf logits (banned tokens) adds exp(-inf) = 0, not NaN.
            shift = torch.where(block_max > float("-inf"), block_max, 0.0)
            block_sum = z.sub_(shift.unsqueeze(1)).exp_().sum(dim=1)
            new_max = torch.maximum(running_max[start:end], block_max)
            anchor = torch.where(new_max > float("-inf"), new_max, 0.0)
            total[start:end] = (total[start:end] * (running_max[start:end] - anchor).exp_()
                                + block_sum * (shift - anchor).exp_())
            running_max[start:end] = new_max
    anchor = torch.where(running_max > float("-inf"), running_max, 0.0)
    return picked, total.log_().add_(anchor)


def _gradients(rows, weight, bias, targets, lse, grad_out, softcap, temperature, chunk_rows, needs, held=None):
    """(d_rows, d_weight, d_bias), each None where ``needs`` (rows, weight, _, bias) says so."""
    need_rows, need_weight, _, need_bias = needs
    n = rows.shape[0]
    if n == 0:  # nothing scored: no tile, every gradient is zero
        return tuple(torch.zeros_like(t) if need else None
                     for t, need in ((rows, need_rows), (weight, need_weight), (bias, need_bias)))
    accumulate = lse.dtype  # fp32 (fp64 for fp64 inputs)
    sums = dict(dtype=accumulate, device=weight.device)
    # Each row's g / temperature multiplies x_i (for dW) and the summed dx_i, after the matmuls
    # with W: in an fp16 operand g * du would flush to zero for per-token g ~ 1e-5.
    row_scale = grad_out.to(accumulate).div(temperature)
    vocab, dim = weight.shape
    block_rows, width = tile_shape(n, weight, chunk_rows)
    in_place = weight.dtype == accumulate  # W's own gradient can hold the sums
    # The first product into each sum overwrites it (beta = 0): no pass zeroing dx or dW first.
    d_rows = torch.empty(rows.shape, **sums) if need_rows else None  # sum over v of (p - onehot)_v W_v
    d_weight = torch.empty_like(weight) if need_weight else None
    block_sums = torch.empty((width, dim), **sums) if need_weight and not in_place else None
    scaled_rows = torch.empty((block_rows, dim), **sums) if need_weight else None
    scale_once = block_rows == n  # one tile of rows: scale them once, not once per vocabulary block
    if need_weight and scale_once:
        torch.mul(rows, row_scale.unsqueeze(1), out=scaled_rows)
    d_bias = torch.zeros(vocab, **sums) if need_bias else None
    head = _Head(weight, bias, softcap, temperature, block_rows, width)
    for first in range(0, vocab, width):
        last = min(first + width, vocab)
        d_weight_block = None
        if need_weight:
            d_weight_block = d_weight[first:last] if in_place else block_sums[: last - first]
        for start in range(0, n, block_rows):
            end = min(start + block_rows, n)
            if held is None:
                z, tanh = head.logits(rows[start:end], first, last)
            else:
                z, tanh = head.held(held, start, end, first, last)
            du = softmax_minus_onehot_(z, targets[start:end], lse[start:end], first)  # -dz / g
            if tanh is not None:
                du.mul_(tanh.square_().neg_().add_(1.0))
            if need_rows:
                if d_rows.dtype == weight.dtype:
                    d_rows[start:end].addmm_(du, weight[first:last], beta=float(first > 0))
                elif first:
                    d_rows[start:end].add_(torch.mm(head.in_weight_dtype(du), weight[first:last]))
                else:
                    d_rows[start:end].copy_(torch.mm(head.in_weight_dtype(du), weight[first:last]))
            if need_weight:
                scaled = scaled_rows
                if not scale_once:
                    scaled = torch.mul(rows[start:end], row_scale[start:end].unsqueeze(1),
                                       out=scaled_rows[: end - start])
                d_weight_block.addmm_(du.t(), scaled, beta=float(start > 0), alpha=-1.0)
            if need_bias:
                d_bias[first:last].addmv_(du.t(), row_scale[start:end], alpha=-1.0)
        if need_weight and not in_place:
            d_weight[first:last].copy_(d_weight_block)
    d_rows = d_rows.mul_(row_scale.neg().unsqueeze(1)).to(rows.dtype) if need_rows else None
    d_bias = d_bias.to(bias.dtype) if need_bias else None
    return d_rows, d_weight, d_bias


class _Head:
    """Computes tiles of logits z (rows x a vocabulary block) into buffers reused across tiles.

    z is fp32 (fp64 for fp64 inputs). The matmul runs in the input dtype (as the
    same-dtype reference does, and without an fp32 copy of W); bias, softcap and
    temperature are applied in z's dtype. Each tile is a contiguous view of the buffers.
    """

    def __init__(self, weight, bias, softcap, temperature, rows, width):
        self.dtype = torch.promote_types(weight.dtype, torch.float32)
        self.weight = weight
        self.bias = None if bias is None else bias.to(self.dtype)
        self.softcap, self.temperature = softcap, temperature
        self.z = torch.empty(rows * width, dtype=self.dtype, device=weight.device)
        self.tanh = torch.empty_like(self.z) if softcap is not None else None
        self.product = None
        if weight.dtype != self.dtype:
            self.product = torch.empty(rows * width, dtype=weight.dtype, device=weight.device)

    def logits(self, x, first, last):
        """(z, tanh(u / softcap) or None) of the rows ``x`` and vocabulary columns ``first:last``."""
        shape = (x.shape[0], last - first)
        z = self.z[: shape[0] * shape[1]].view(shape)
        if self.product is None:
            torch.mm(x, self.weight[first:last].t(), out=z)
        else:
            z.copy_(torch.mm(x, self.weight[first:last].t(), out=self.product[: z.numel()].view(shape)))
        if self.bias is not None:
            z.add_(self.bias[first:last])
        if self.softcap is None:
            return (z.div_(self.temperature) if self.temperature != 1.0 else z), None
        tanh = self.tanh[: z.numel()].view(shape)
        torch.tanh(z.div_(self.softcap), out=tanh)
        return torch.mul(tanh, self.softcap / self.temperature, out=z), tanh

    def held(self, held, start, end, first, last):
        """``logits``' result for rows ``start:end`` read from ``held``, where the forward put it."""
        shape = (end - start, last - first)
        z = self.z[: shape[0] * shape[1]].view(shape).copy_(held[start:end, first:last])
        if self.softcap is None:
            return z, None
        # z = tanh · (softcap / temperature) gives back the tanh, ±1 exactly where it saturated
        return z, torch.div(z, self.softcap / self.temperature, out=self.tanh[: z.numel()].view(shape))

    def in_weight_dtype(self, du):
        """``du`` in the weight dtype, for the matmul with W."""
        if self.product is None:
            return du
        return self.product[: du.numel()].view(du.shape).copy_(du)


def logits_logprobs_forward(logits, targets, lse, out, ignore_index, chunk_rows=None):
    """Torch twin of ``kernels.logits_logprobs.logits_logprobs_forward_kernel``: fill ``lse``
    and ``out`` (N,) from held ``logits`` (N, V), a chunk of scored rows at a time in fp32
    (fp64 for fp64 logits, with fp64 ``lse`` and ``out``)."""
    scored = (targets != ignore_index).nonzero().squeeze(1)
    lse.zero_()
    out.zero_()
    for index, z in _scored_chunks(logits, scored, chunk_rows):
        chunk_lse, picked = logsumexp_and_pick_(z, targets.index_select(0, index))
        lse.index_copy_(0, index, chunk_lse)
        out.index_copy_(0, index, picked - chunk_lse)


def logits_logprobs_backward(logits, targets, lse, grad_out, grad_logits, ignore_index, chunk_rows=None):
    """Torch twin of ``kernels.logits_logprobs.logits_logprobs_backward_kernel``: write every
    entry of ``grad_logits`` (N, V), ``g_i · (onehot(t_i) - softmax(z_i))``, 0 on ignored rows."""
    scored = (targets != ignore_index).nonzero().squeeze(1)
    grad_logits.zero_()
    for index, z in _scored_chunks(logits, scored, chunk_rows):
        du = softmax_minus_onehot_(z, targets.index_select(0, index), lse.index_select(0, index))
        du.mul_(grad_out.index_select(0, index).to(du.dtype).neg_().unsqueeze(1))
        grad_logits.index_copy_(0, index, du.to(grad_logits.dtype))


def _scored_chunks(logits, scored, chunk_rows):
    """(row indices, their logits in fp32 or fp64) for chunks of the ``scored`` rows, in one reused buffer."""
    chunk_rows = chunk_rows or default_chunk_rows(logits.shape[1], LOGITS_CHUNK_ELEMENTS)
    chunk_rows = min(chunk_rows, max(1, scored.numel()))
    dtype = torch.promote_types(logits.dtype, torch.float32)
    buffer = torch.empty((chunk_rows, logits.shape[1]), dtype=dtype, device=logits.device)
    for start in range(0, scored.numel(), chunk_rows):
        index = scored[start:start + chunk_rows]
        z = buffer[: index.numel()]
        if logits.dtype == dtype:
            torch.index_select(logits, 0, index, out=z)
        else:
            z.copy_(logits.index_select(0, index))
        yield index, z
