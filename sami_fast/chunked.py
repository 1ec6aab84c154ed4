"""Memory-lean per-row log-probs in plain PyTorch: the torch backend of the LM-head losses.

For aligned rows x_i (N, D), an LM head W (V, D), optional bias b (V,) and targets t_i:

    u_i = x_i Wᵀ + b
    z_i = softcap · tanh(u_i / softcap) / temperature        (without softcap: u_i / temperature)
    out_i = z_i[t_i] - logsumexp(z_i)                         (0 where t_i == ignore_index)

exactly ``sami_fast.reference.token_logprobs``, without ever holding the (N, V) logits.
Only rows with a scored target are processed (in SAMI most rows are prompt), in
chunks of ``chunk_rows``; the forward keeps the per-row log-sum-exp (fp32) and the
backward recomputes each chunk's logits (blocks of rows x vocabulary within the same
``chunk_rows * V`` budget when the vocabulary is split). With upstream gradient g_i and
p_i = softmax(z_i):

    dz_i = g_i · (onehot(t_i) - p_i)
    du_i = dz_i · (1 - tanh²(u_i / softcap)) / temperature  (without softcap: dz_i / temperature)
    dx_i = du_i W,   dW = Σ_i du_iᵀ x_i,   db = Σ_i du_i

Extra memory is O(chunk_rows · V), plus in backward an fp32 dx for bf16/fp16 rows and,
for a bf16/fp16 head, an fp32 dW accumulator for one vocabulary chunk at a time (~32
MiB), cast into the gradient as each chunk finishes: never an fp32 copy of all of W.
An fp32 head accumulates straight into its gradient, in one vocabulary chunk.

The functions here are the torch twins of the kernel launchers (``linear_logprobs_*``
of ``kernels/linear_logprobs.py``, ``logits_logprobs_*`` of ``kernels/logits_logprobs.py``);
the autograd Functions that call them live with their public functions.
"""

import functools

import torch

# The backward's fp32 dW accumulator for a bf16/fp16 head: one vocabulary chunk of ~32 MiB,
# as in the kernels' backward.
from sami_fast.kernels.linear_logprobs import D_WEIGHT_CHUNK_ELEMENTS
from sami_fast.validation import check_positive_int

# A chunk of logits holds about this many fp32 elements: 64 MiB, large enough that
# the rank-chunk update of dW is compute-bound rather than bound by streaming dW.
CHUNK_ELEMENTS = 2**24
# Held logits need no matmul: chunks of 4 MiB (fp32) stay in cache across their passes.
LOGITS_CHUNK_ELEMENTS = 2**20


def default_chunk_rows(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // vocab_size)


def logsumexp_and_pick_(z: torch.Tensor, targets: torch.Tensor):
    """(logsumexp(z, 1), z[i, targets[i]]) of an fp32 chunk; overwrites ``z`` (no temporaries)."""
    picked = z.gather(1, targets.unsqueeze(1)).squeeze(1)
    top = z.amax(dim=1, keepdim=True)
    lse = z.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
    return lse, picked


def onehot_minus_softmax_(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, first_column: int = 0):
    """In place, ``z <- onehot(targets) - softmax(z)`` given its row ``lse``, for the columns
    ``first_column ..`` of the vocabulary that ``z`` holds (targets outside them add nothing)."""
    z.sub_(lse.unsqueeze(1)).exp_().neg_()
    column = targets - first_column
    inside = (column >= 0) & (column < z.shape[1])
    # scatter_add_ of 0/1 rather than indexing the hits: no host sync on a GPU.
    return z.scatter_add_(1, column.clamp(0, z.shape[1] - 1).unsqueeze(1), inside.to(z.dtype).unsqueeze(1))


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


def linear_logprobs_forward(rows, weight, targets, bias=None, softcap=None, temperature=1.0, chunk_rows=None):
    """(log p(target) (N,), lse (N,)) in fp32 (fp64 for fp64 inputs) of ``rows`` (N, D) under
    the head ``weight`` (V, D), ``bias`` (V,); every target lies in [0, V).

    ``chunk_rows``: rows of logits per chunk (default: about ``CHUNK_ELEMENTS`` logits).
    """
    if chunk_rows is not None:
        check_positive_int("chunk_rows", chunk_rows)
    chunk_rows = min(chunk_rows or default_chunk_rows(weight.shape[0]), max(1, rows.shape[0]))
    head = _Head(weight, bias, softcap, temperature, chunk_rows)
    lse = torch.empty(rows.shape[0], dtype=head.z.dtype, device=rows.device)
    picked = torch.empty_like(lse)
    for start in range(0, rows.shape[0], chunk_rows):
        end = min(start + chunk_rows, rows.shape[0])
        z, _ = head.logits(rows[start:end])
        lse[start:end], picked[start:end] = logsumexp_and_pick_(z, targets[start:end])
    return picked - lse, lse


def linear_logprobs_backward(rows, weight, targets, lse, grad_out, bias=None, softcap=None, temperature=1.0,
                             need_rows=True, need_weight=True, need_bias=False, chunk_rows=None):
    """(d_rows, d_weight, d_bias) in the dtypes of rows, weight and bias (None where not
    needed) for the per-row upstream gradient ``grad_out`` (N,), given the forward's ``lse``.

    ``chunk_rows``: as in ``linear_logprobs_forward`` (the same value: its logits budget).
    """
    chunk_rows = min(chunk_rows or default_chunk_rows(weight.shape[0]), max(1, rows.shape[0]))
    accumulate = lse.dtype  # fp32 (fp64 for fp64 inputs)
    sums = dict(dtype=accumulate, device=weight.device)
    # Each row's du carries g / temperature, applied after the matmul with W: in an
    # fp16 operand g * du would flush to zero for per-token g ~ 1e-5.
    row_scale = grad_out.to(accumulate).div(temperature).unsqueeze(1)
    vocab, dim = weight.shape
    in_place = weight.dtype == accumulate  # W's own gradient can hold the sums
    one_chunk = in_place or not need_weight
    width = vocab if one_chunk else max(1, min(vocab, D_WEIGHT_CHUNK_ELEMENTS // max(dim, 1)))
    block_rows = max(1, min(rows.shape[0], chunk_rows * vocab // width))  # forward's logits budget
    d_rows = torch.zeros(rows.shape, **sums) if need_rows else None
    d_weight = (torch.zeros_like if in_place else torch.empty_like)(weight) if need_weight else None
    scratch = torch.empty((width, dim), **sums) if need_weight and not in_place else None
    d_bias = torch.zeros(vocab, **sums) if need_bias else None
    for first in range(0, vocab, width):
        last = min(first + width, vocab)
        d_weight_chunk = None
        if need_weight:
            d_weight_chunk = d_weight[first:last] if in_place else scratch[: last - first].zero_()
        head = _Head(weight[first:last], None if bias is None else bias[first:last], softcap, temperature,
                     block_rows)
        _add_vocab_chunk_gradients(rows, targets, lse, row_scale, head, first,
                                   d_rows, d_weight_chunk, None if d_bias is None else d_bias[first:last])
        del head  # its logits buffers go before the next chunk's are made
        if need_weight and not in_place:
            d_weight[first:last].copy_(d_weight_chunk)
    d_rows = d_rows.to(rows.dtype) if need_rows else None
    d_bias = d_bias.to(bias.dtype) if need_bias else None
    return d_rows, d_weight, d_bias


def _add_vocab_chunk_gradients(rows, targets, lse, row_scale, head, first, d_rows, d_weight, d_bias):
    """Add the gradients of the vocabulary columns ``first ..`` that ``head`` covers, a block of
    rows at a time: into d_rows (all rows), d_weight and d_bias (this chunk's). A function of
    its own so that no view of the head's logits buffers outlives the chunk."""
    for start in range(0, rows.shape[0], head.z.shape[0]):
        end = min(start + head.z.shape[0], rows.shape[0])
        z, tanh = head.logits(rows[start:end])
        du = onehot_minus_softmax_(z, targets[start:end], lse[start:end], first)
        if tanh is not None:
            du.mul_(tanh.square_().neg_().add_(1.0))
        if d_rows is not None:
            d_rows[start:end].addcmul_(torch.mm(head.in_weight_dtype(du), head.weight), row_scale[start:end])
        du.mul_(row_scale[start:end])
        if d_weight is not None:
            d_weight.addmm_(du.t(), rows[start:end].to(du.dtype))
        if d_bias is not None:
            d_bias.add_(du.sum(dim=0))


class _Head:
    """Recomputes chunks of logits z into buffers reused across chunks.

    z is fp32 (fp64 for fp64 inputs). The matmul runs in the input dtype (as the
    same-dtype reference does, and without an fp32 copy of W); bias, softcap and
    temperature are applied in z's dtype.
    """

    def __init__(self, weight, bias, softcap, temperature, chunk_rows):
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.weight = weight
        self.bias = None if bias is None else bias.to(dtype)
        self.softcap, self.temperature = softcap, temperature
        shape = (chunk_rows, weight.shape[0])
        self.z = torch.empty(shape, dtype=dtype, device=weight.device)
        self.tanh = torch.empty_like(self.z) if softcap is not None else None
        self.product = None
        if weight.dtype != dtype:
            self.product = torch.empty(shape, dtype=weight.dtype, device=weight.device)

    def logits(self, x):
        """(z, tanh(u / softcap) or None) of the rows ``x``; both are views of the buffers."""
        n = x.shape[0]
        z = self.z[:n]
        if self.product is None:
            torch.mm(x, self.weight.t(), out=z)
        else:
            z.copy_(torch.mm(x, self.weight.t(), out=self.product[:n]))
        if self.bias is not None:
            z.add_(self.bias)
        if self.softcap is None:
            return (z.div_(self.temperature) if self.temperature != 1.0 else z), None
        tanh = self.tanh[:n]
        torch.tanh(z.div_(self.softcap), out=tanh)
        return torch.mul(tanh, self.softcap / self.temperature, out=z), tanh

    def in_weight_dtype(self, du):
        """``du`` in the weight dtype, for the matmul with W."""
        if self.product is None:
            return du
        return self.product[: du.shape[0]].copy_(du)


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
        du = onehot_minus_softmax_(z, targets.index_select(0, index), lse.index_select(0, index))
        du.mul_(grad_out.index_select(0, index).to(du.dtype).unsqueeze(1))
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
