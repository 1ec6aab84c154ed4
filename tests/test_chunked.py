"""The memory-lean torch path of ``sequence_logprobs`` (``sami_fast.chunked``) against the float64 reference."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

from oracle import assert_no_worse_per_entry, assert_oracle_close, linear_head_floors
from sami_fast import chunked, sequence_logprobs
from sami_fast.reference import token_logprobs
from sami_fast.sequence_logprobs import _TorchLinearLogprobs

IGNORE = -100


def chunked_token_logprobs(rows, weight, targets, *, bias=None, softcap=None, temperature=1.0, chunk_rows=None,
                           logits_budget=0):
    """Per-row log p(target) (N,) of aligned ``rows`` (N, D) through the torch path's Function,
    ``chunk_rows`` rows of logits per chunk; 0 where ``targets`` is IGNORE."""
    scored = (targets != IGNORE).nonzero().squeeze(1)
    per_row = _TorchLinearLogprobs.apply(rows, weight, bias, scored, targets.index_select(0, scored), softcap,
                                         float(temperature), {"chunk_rows": chunk_rows, "logits_budget": logits_budget})
    return per_row.new_zeros(targets.shape[0]).index_copy(0, scored, per_row)


def make_case(N, D, V, dtype=torch.float32, *, bias=True, ignored=0.3, scale=1.0, seed=0):
    """fp64 leaves (rows, weight, bias), targets with some ignored rows, upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(N, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64) * (scale / D**0.5)
    b = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < ignored] = IGNORE
    grad = torch.randn(N, generator=gen, dtype=torch.float64)
    return rows, weight, b, targets, grad


def value_and_grads(fn, rows, weight, bias, targets, grad, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (rows, weight, bias)]
    out = fn(leaves[0], leaves[1], targets, bias=leaves[2], **kw)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wrt, grad.to(out.dtype))
    return [out.detach().double()] + [g.double() for g in grads]


def reference(rows, weight, targets, *, bias=None, softcap=None, temperature=1.0):
    return token_logprobs(rows, weight, targets, IGNORE, bias, softcap, temperature)


def ours(rows, weight, targets, *, bias=None, softcap=None, temperature=1.0, chunk_rows=None, logits_budget=0):
    return chunked_token_logprobs(
        rows, weight, targets, bias=bias, softcap=softcap, temperature=temperature, chunk_rows=chunk_rows,
        logits_budget=logits_budget,
    )


def in_dtype(case, dtype):
    """The case's leaves and upstream gradient rounded to ``dtype`` (kept in fp64): fp64 then
    computes on exactly the numbers ours gets, and the rule measures the arithmetic's error only."""
    return [t.to(dtype).double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in case]


def assert_matches_reference(case, *, dtype=torch.float32, chunk_rows=None, logits_budget=0, **kw):
    """Value and gradients of ours in ``dtype`` obey the oracle rule: the reference in ``dtype``
    (plain) and in fp64 (truth), on the inputs rounded to ``dtype``."""
    case = in_dtype(case, dtype)
    truth = value_and_grads(reference, *case, torch.float64, **kw)
    plain = value_and_grads(reference, *case, dtype, **kw)
    actual = value_and_grads(ours, *case, dtype, chunk_rows=chunk_rows, logits_budget=logits_budget, **kw)
    rows, weight, bias, _, grad = case
    floors = linear_head_floors(rows, weight, bias, grad, kw.get("softcap"), kw.get("temperature", 1.0), dtype)
    for name, a, p, t in zip(("value", "d_rows", "d_weight", "d_bias"), actual, plain, truth):
        assert_oracle_close(a, p, t, tiny=floors[name], dtype=dtype, what=name)


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, None])
@pytest.mark.parametrize("softcap, temperature", [(None, 1.0), (None, 0.7), (4.0, 1.0), (2.5, 1.3)])
@pytest.mark.parametrize("vocab_block", [None, 96])
def test_fp32_matches_fp64_reference(chunk_rows, softcap, temperature, vocab_block, monkeypatch):
    """vocab_block: tiles cover 96 vocabulary columns (11 blocks, the last ragged), so the
    forward merges its log-sum-exp across blocks; by default one block holds all 1001."""
    if vocab_block is not None:
        monkeypatch.setattr(chunked, "VOCAB_BLOCK", vocab_block)
    # Odd shapes: D=123 and V=1001 are not powers of two, 7 does not divide N=37.
    assert_matches_reference(make_case(37, 123, 1001, scale=4.0), softcap=softcap, temperature=temperature,
                             chunk_rows=chunk_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [7, None])
def test_backward_writes_every_sum_before_reading_it(dtype, chunk_rows, monkeypatch):
    """The backward's sums start as uninitialised buffers that the first product overwrites:
    buffers filled with NaN instead must give the same exact gradients."""
    monkeypatch.setattr(chunked, "VOCAB_BLOCK", 96)  # several vocabulary blocks
    monkeypatch.setattr(chunked, "D_WEIGHT_CHUNK_ELEMENTS", 64 * 123)  # bf16: blocks of 64 columns

    def filled_with_nan(factory):
        return lambda *args, **kwargs: factory(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", filled_with_nan(torch.empty))
    monkeypatch.setattr(torch, "empty_like", filled_with_nan(torch.empty_like))
    assert_matches_reference(make_case(37, 123, 1001, scale=4.0, seed=12), dtype=dtype, chunk_rows=chunk_rows,
                             softcap=3.0)


def test_output_is_fp32_and_zero_on_ignored_rows():
    rows, weight, bias, targets, _ = make_case(11, 9, 50, ignored=0.5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = chunked_token_logprobs(rows.to(dtype), weight.to(dtype), targets, bias=bias.to(dtype))
        assert out.dtype == torch.float32 and out.shape == (11,)
        assert (out[targets == IGNORE] == 0).all() and (out[targets != IGNORE] < 0).all()


@settings(max_examples=30, deadline=None)
@given(
    N=st.integers(1, 40), D=st.integers(1, 33), V=st.integers(2, 300), chunk_rows=st.integers(1, 50),
    ignored=st.sampled_from([0.0, 0.5, 0.9]), bias=st.booleans(),
    softcap=st.sampled_from([None, 1.5, 20.0]), temperature=st.floats(0.3, 3.0), seed=st.integers(0, 2**16),
    vocab_block=st.integers(1, 300),
)
def test_random_shapes_match_reference(N, D, V, chunk_rows, ignored, bias, softcap, temperature, seed, vocab_block):
    with mock.patch.object(chunked, "VOCAB_BLOCK", vocab_block):
        assert_matches_reference(make_case(N, D, V, bias=bias, ignored=ignored, scale=3.0, seed=seed),
                                 softcap=softcap, temperature=temperature, chunk_rows=chunk_rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("vocab_chunk, chunk_rows, temperature", [(None, 10, 1.0), (96, 10, 1.0), (96, 1, 0.7)])
def test_low_precision_no_worse_than_torch_same_dtype(dtype, softcap, vocab_chunk, chunk_rows, temperature,
                                                      monkeypatch):
    """vocab_chunk: the backward's fp32 dW accumulator covers 96 vocabulary rows at a time
    (11 chunks, the last ragged) instead of the default, here all 1001 in one; with
    chunk_rows=1 each tile holds one row."""
    if vocab_chunk is not None:
        monkeypatch.setattr(chunked, "D_WEIGHT_CHUNK_ELEMENTS", vocab_chunk * 123)
    case = make_case(33, 123, 1001, scale=4.0)
    kw = dict(softcap=softcap, temperature=temperature)
    exact = value_and_grads(reference, *case, torch.float64, **kw)
    same_dtype = value_and_grads(reference, *case, dtype, **kw)
    actual = value_and_grads(ours, *case, dtype, chunk_rows=chunk_rows, **kw)
    tol = 4 * torch.finfo(dtype).eps
    for name, a, s, e in zip(("out", "d_rows", "d_weight", "d_bias"), actual, same_dtype, exact):
        assert_no_worse_per_entry(a, s, e, slack=tol * max(1.0, e.abs().max().item()), what=name)


@pytest.mark.parametrize("vocab_block", [None, 32])
def test_peaked_softmax_stays_accurate(vocab_block, monkeypatch):
    # Logits span hundreds: softmax is one-hot up to exp(-100) and naive exp overflows; with
    # 32-column blocks the running maximum jumps by hundreds between blocks.
    if vocab_block is not None:
        monkeypatch.setattr(chunked, "VOCAB_BLOCK", vocab_block)
    assert_matches_reference(make_case(20, 16, 257, scale=300.0, bias=False, ignored=0.2), chunk_rows=6)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("vocab_block", [None, 64])
@pytest.mark.parametrize("logits_budget", [0, 2**20])
def test_neg_inf_bias_bans_tokens(softcap, vocab_block, logits_budget, monkeypatch):
    """bias -inf on a block of the vocabulary (banned tokens), targets elsewhere; with
    64-column tiles the first two vocabulary blocks are -inf throughout."""
    if vocab_block is not None:
        monkeypatch.setattr(chunked, "VOCAB_BLOCK", vocab_block)
    rows, weight, bias, targets, grad = make_case(17, 20, 300, scale=3.0, seed=4)
    bias[:128] = -float("inf")
    bias[200:230] = -float("inf")
    targets = torch.where(targets == IGNORE, targets, 128 + targets % 72)
    assert_matches_reference((rows, weight, bias, targets, grad), softcap=softcap, chunk_rows=5,
                             logits_budget=logits_budget)


def test_frozen_head_gives_rows_grad_only():
    rows, weight, bias, targets, grad = in_dtype(make_case(19, 12, 77), torch.float32)
    x = rows.float().requires_grad_()
    out = chunked_token_logprobs(x, weight.float(), targets, bias=bias.float(), chunk_rows=4)
    (d_rows,) = torch.autograd.grad(out, x, grad.float())

    def reference_rows_grad(dtype):
        r = rows.to(dtype).requires_grad_()
        return torch.autograd.grad(reference(r, weight.to(dtype), targets, bias=bias.to(dtype)), r, grad.to(dtype))[0]

    assert_oracle_close(d_rows, reference_rows_grad(torch.float32), reference_rows_grad(torch.float64), what="d_rows")


def test_all_rows_ignored_gives_zeros_and_zero_grads():
    rows, weight, _, targets, grad = make_case(6, 5, 11, bias=False)
    x, w = rows.float().requires_grad_(), weight.float().requires_grad_()
    out = chunked_token_logprobs(x, w, torch.full_like(targets, IGNORE))
    d_rows, d_weight = torch.autograd.grad(out, (x, w), grad.float())
    assert (out == 0).all() and (d_rows == 0).all() and (d_weight == 0).all()


def test_gradcheck_float64():
    rows, weight, bias, targets, _ = make_case(5, 4, 9, ignored=0.3, seed=3)
    targets[1] = IGNORE
    leaves = [t.clone().requires_grad_() for t in (rows, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda x, w, b: chunked_token_logprobs(x, w, targets, bias=b, softcap=2.0, temperature=0.8, chunk_rows=2),
        leaves,
    )


def test_forward_keeps_no_logits():
    # Nothing of size N*V may be saved for backward: logits are recomputed per chunk.
    N, D, V = 64, 8, 500
    rows, weight, bias, targets, _ = make_case(N, D, V)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_token_logprobs(rows.float().requires_grad_(), weight.float().requires_grad_(), targets,
                               bias=bias.float(), chunk_rows=8)
    assert saved and max(saved) <= V * D


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(labels=torch.tensor([0, 3, 9])), ValueError, "labels"),
        (dict(labels=torch.tensor([0, -1, 2])), ValueError, "labels"),
        (dict(labels=torch.tensor([0, 1])), ValueError, "labels"),
        (dict(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels"),
        (dict(weight=torch.randn(9, 5, dtype=torch.float64)), TypeError, "weight"),
        (dict(weight=torch.randn(9, 4)), ValueError, "weight"),
        (dict(hidden=torch.randn(3, 5).to(torch.int64)), TypeError, "hidden"),
        (dict(bias=torch.randn(8)), ValueError, "bias"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(temperature=-1.0), ValueError, "temperature"),
    ],
)
def test_bad_input_raises(change, error, match):
    """Packed rows scored where aligned (``shift=False``), as the torch path gets them."""
    args = dict(hidden=torch.randn(3, 5), weight=torch.randn(9, 5), labels=torch.tensor([0, IGNORE, 8]),
                bias=None, softcap=None, temperature=1.0)
    args.update(change)
    with pytest.raises(error, match=match):
        sequence_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), shift=False, reduction="none",
                          cu_seqlens=torch.tensor([0, 3]), backend="torch", **args)


def test_bad_chunk_rows_raises():
    with pytest.raises(ValueError, match="chunk_rows"):
        chunked_token_logprobs(torch.randn(3, 5), torch.randn(9, 5), torch.tensor([0, IGNORE, 8]), chunk_rows=0)


def test_low_precision_head_gets_no_fp32_copy_of_its_gradient(monkeypatch, allocations):
    """A bf16 head's dW sums in fp32 one vocabulary chunk at a time: the largest fp32
    allocation of the backward is that chunk (or the rows' dx), never V x D, and the chunks
    together give every row of dW."""
    monkeypatch.setattr(chunked, "D_WEIGHT_CHUNK_ELEMENTS", 40 * 24)  # 40 vocabulary rows per chunk
    rows, weight, bias, targets, grad = make_case(30, 24, 301, seed=8)
    x, w = rows.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    out = chunked_token_logprobs(x, w, targets, chunk_rows=8)
    with allocations() as log:
        out.backward(grad.float())
    assert (torch.float32, (40, 24)) in log.made and max(log.numels(torch.float32)) < 301 * 24 // 2, log.made
    case = in_dtype((rows, weight, None, targets, grad), torch.bfloat16)
    truth, plain = (value_and_grads(reference, *case, dtype) for dtype in (torch.float64, torch.bfloat16))
    assert w.grad.dtype == torch.bfloat16
    assert_oracle_close(w.grad, plain[2], truth[2], what="d_weight")


def test_backward_inside_autocast_keeps_the_forwards_dtypes():
    """A .backward() called inside an autocast region (a common slip) must not recast the
    backward's matmuls: an fp32 head's gradients stay as close to fp64 as a plain fp32 backward
    (bf16 matmuls would be ~1e4 times further)."""
    rows, weight, _, targets, grad = in_dtype(make_case(18, 64, 300, scale=2.0, seed=6), torch.float32)
    case = rows, weight, None, targets, grad
    truth, plain = (value_and_grads(reference, *case, dtype) for dtype in (torch.float64, torch.float32))
    x, w = rows.float().requires_grad_(), weight.float().requires_grad_()
    out = chunked_token_logprobs(x, w, targets, chunk_rows=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.backward(grad.float())
    for name, got, p, t in zip(("d_rows", "d_weight"), (x.grad, w.grad), plain[1:], truth[1:]):
        assert_oracle_close(got, p, t, what=name)


def test_chunked_backward_holds_one_chunk_of_logits_at_a_time(monkeypatch, allocations):
    """Peak of what the bf16 backward allocates: one tile's logits buffers plus the
    accumulators and the gradient, never two tiles' buffers at once."""
    monkeypatch.setattr(chunked, "D_WEIGHT_CHUNK_ELEMENTS", 1000 * 32)  # 4 vocabulary chunks
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(64, 32, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(4000, 32, generator=gen).bfloat16().requires_grad_()
    out = chunked_token_logprobs(x, w, torch.randint(0, 4000, (64,), generator=gen), chunk_rows=16)
    with allocations() as log:
        out.sum().backward()
    logits_buffers = 16 * 1000 * (4 + 2)  # fp32 z and the bf16 product of one tile (chunk_rows rows of a chunk)
    # fp32 dx, fp32 dW chunk, bf16 dW, the tile's rows scaled by their upstream gradient (fp32)
    accumulators = 64 * 32 * 4 + 1000 * 32 * 4 + 4000 * 32 * 2 + 16 * 32 * 4
    assert logits_buffers + accumulators <= log.peak_bytes < 2 * logits_buffers + accumulators


@pytest.mark.parametrize("softcap, temperature", [(None, 1.0), (None, 0.6), (3.0, 1.4)])
@pytest.mark.parametrize("vocab_block", [None, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_held_logits_skip_the_recompute_and_match_fp64(softcap, temperature, vocab_block, dtype, monkeypatch,
                                                       head_tiles):
    """A budget that holds the scored rows' logits: the backward computes no tile with W, and
    values and gradients obey the oracle rule (softcap: the tanh comes back from the held z)."""
    monkeypatch.setattr(chunked, "VOCAB_BLOCK", vocab_block)
    case = make_case(37, 123, 1001, scale=4.0, seed=3)
    budget = 37 * 1001 * 4  # fp32 logits, whatever the head's dtype
    assert_matches_reference(case, dtype=dtype, softcap=softcap, temperature=temperature, chunk_rows=7,
                             logits_budget=budget)
    forward_tiles = -(-(case[3] != IGNORE).sum().item() // 7) * -(-1001 // (vocab_block or 1001))
    assert len(head_tiles) == forward_tiles  # the forward's tiles only


def test_logits_over_the_budget_are_recomputed(head_tiles):
    rows, weight, bias, targets, grad = make_case(20, 16, 300, ignored=0.0)
    leaves = [t.float().requires_grad_() for t in (rows, weight, bias)]
    out = ours(leaves[0], leaves[1], targets, bias=leaves[2], logits_budget=20 * 300 * 4 - 1)
    out.backward(grad.float())
    assert len(head_tiles) == 2  # one tile forward, one recomputed


def test_a_second_backward_reads_the_held_logits_again(head_tiles):
    """retain_graph: both backwards read the held logits (which the first leaves intact) and
    obey the oracle rule."""
    case = in_dtype(make_case(23, 16, 200, seed=5), torch.float32)
    rows, weight, bias, targets, grad = case
    truth = value_and_grads(reference, *case, torch.float64)[1:]
    plain = value_and_grads(reference, *case, torch.float32)[1:]
    floors = linear_head_floors(rows, weight, bias, grad, None, 1.0, torch.float32)
    leaves = [t.float().requires_grad_() for t in (rows, weight, bias)]
    out = ours(leaves[0], leaves[1], targets, bias=leaves[2], logits_budget=2**20)
    for retain in (True, False):
        grads = torch.autograd.grad(out, leaves, grad.float(), retain_graph=retain)
        assert len(head_tiles) == 1  # the forward's tile only
        for name, a, p, t in zip(("d_rows", "d_weight", "d_bias"), grads, plain, truth):
            assert_oracle_close(a.double(), p, t, tiny=floors[name], dtype=torch.float32, what=name)


def test_sequence_logprobs_holds_logits_only_for_a_backward(held_buffers):
    """Public path: no buffer without a graph (no_grad, frozen inputs); the budget is checked."""
    hidden = torch.randn(2, 9, 8)
    weight = torch.randn(50, 8)
    labels = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        sequence_logprobs(hidden, weight.requires_grad_(), labels, backend="torch", logits_budget=2**20)
    sequence_logprobs(hidden, weight.detach(), labels, backend="torch", logits_budget=2**20)
    assert held_buffers == [None, None]
    out = sequence_logprobs(hidden, weight, labels, backend="torch", logits_budget=2**20)
    assert held_buffers[-1] is not None and held_buffers[-1].shape == (16, 50)
    out.sum().backward()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="logits_budget"):
            sequence_logprobs(hidden, weight, labels, backend="torch", logits_budget=bad)
