"""``get_batch_logprobs`` (both backends) and its logits kernel against the float64 reference."""

import pytest
import torch

from oracle import assert_no_worse_per_entry, assert_oracle_close, ulp_floor
from sami_fast import chunked, reference
from sami_fast.batch_logprobs import get_batch_logprobs
from sami_fast.kernels.logits_logprobs import logits_logprobs_backward_kernel, logits_logprobs_forward_kernel

IGNORE = -100


def make_case(B=3, T=7, V=1001, scale=3.0, seed=0):
    """fp64 logits, labels with ignored positions (a prompt prefix, a hole, a padded tail), upstream grad."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * scale
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, : T // 2] = IGNORE
    labels[-1, T // 2] = IGNORE
    if B > 1:
        labels[-1, -1] = IGNORE
    grad = torch.randn(B, generator=gen, dtype=torch.float64)
    return logits, labels, grad


def value_and_grad(fn, logits, labels, grad, dtype):
    x = logits.detach().to(dtype).requires_grad_()
    out = fn(x, labels)
    (d_logits,) = torch.autograd.grad(out, x, grad.to(out.dtype))
    return out, d_logits


def assert_matches_reference(logits, labels, grad, layout=None):
    """fp32 get_batch_logprobs obeys the oracle rule against the reference in fp32 (plain) and fp64 (truth).

    ``layout``: what ours reads instead of the fp32 logits (the same values, e.g. in a strided
    view). Most of d_logits is g * p, far below its max: its errors are weighed entry by entry
    (relative to each entry, one ulp of the largest where the truth is 0), so an error in the
    softmax term cannot hide under the target entries. Ours saves each row's log-sum-exp in
    fp32 and recomputes p = exp(z - lse): every p carries lse's rounding, one ulp of |lse|
    relative, which is the floor of d_logits (torch's log_softmax subtracts the max first and
    can be far more exact: ~300x at logits in the thousands).
    """
    logits, grad = logits.float().double(), grad.float().double()  # fp64 sees the fp32 inputs: arithmetic error only
    truth = value_and_grad(reference.get_batch_logprobs, logits, labels, grad, torch.float64)
    plain = value_and_grad(reference.get_batch_logprobs, logits, labels, grad, torch.float32)
    x = (logits.float() if layout is None else layout(logits.float())).requires_grad_()
    out = get_batch_logprobs(x, labels)
    (d_logits,) = torch.autograd.grad(out, x, grad.float())
    assert out.dtype == torch.float32 and d_logits.dtype == torch.float32
    assert_oracle_close(out, plain[0], truth[0], what="log-probs")
    per_entry = truth[1].abs() + ulp_floor(truth[1], torch.float32)
    lse_ulp = ulp_floor(torch.logsumexp(logits, dim=-1), torch.float32)
    assert_oracle_close(d_logits, plain[1], truth[1], scale=per_entry, tiny=lse_ulp, what="d_logits")
    return d_logits


@pytest.mark.parametrize("V", [1001, 1024])
def test_fp32_matches_fp64_reference(backend, V):
    assert_matches_reference(*make_case(V=V))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_torch_same_dtype(backend, dtype):
    logits, labels, grad = make_case(scale=4.0)
    # Inputs exactly representable in ``dtype``: fp64 then measures only the arithmetic's error.
    logits, grad = logits.to(dtype).double(), grad.to(dtype).double()
    exact = value_and_grad(reference.get_batch_logprobs, logits, labels, grad, torch.float64)
    same_dtype = value_and_grad(reference.get_batch_logprobs, logits, labels, grad, dtype)
    actual = value_and_grad(get_batch_logprobs, logits, labels, grad, dtype)
    eps, subnormal_step = torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    for name, a, s, e in zip(("out", "d_logits"), actual, same_dtype, exact):
        assert a.dtype == dtype
        # Slack relative to each entry (one ulp of the dtype; about an fp32 ulp of the largest, from
        # the fp32 arithmetic): most of d_logits is g * p, far below its max.
        slack = eps * e.abs() + 1e-7 * e.abs().max() + subnormal_step
        assert_no_worse_per_entry(a, s, e, slack=slack, what=name)


def test_peaked_logits_and_strided_input(backend):
    # Logits in the thousands (exp overflows without the running max), read through a
    # strided view of a wider buffer: rows are not contiguous with each other.
    logits, labels, grad = make_case(B=2, T=5, V=300, scale=2000.0)
    def wide_view(x):
        wide = torch.zeros(2, 5, 320, dtype=torch.float32)
        wide[..., :300] = x
        return wide[..., :300]

    assert_matches_reference(logits, labels, grad, layout=wide_view)


@pytest.mark.parametrize("V, block_v", [(1001, 128), (1024, 256)])
def test_kernel_streams_vocab_blocks_like_torch_twin(V, block_v):
    # Several V blocks per row (online log-sum-exp), with and without a ragged last block.
    N = 6
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(N, V, generator=gen) * 5).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[2] = IGNORE
    grad_out = torch.randn(N, generator=gen)
    results = []
    for forward, backward, kw in (
        (logits_logprobs_forward_kernel, logits_logprobs_backward_kernel, dict(block_v=block_v)),
        (chunked.logits_logprobs_forward, chunked.logits_logprobs_backward, dict(chunk_rows=2)),
    ):
        lse, out = torch.full((N,), 7.0), torch.full((N,), 7.0)
        forward(logits, targets, lse, out, IGNORE, **kw)
        grad_logits = torch.full_like(logits, 7.0)
        backward(logits, targets, lse, grad_out, grad_logits, IGNORE, **kw)
        results.append((lse, out, grad_logits.float()))
    z = logits.double()
    expected_lse = torch.logsumexp(z, dim=1).masked_fill(targets == IGNORE, 0.0)
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), V)
    scored_grad = grad_out.double().masked_fill(targets == IGNORE, 0.0)
    expected_grad = scored_grad[:, None] * (onehot - z.softmax(1))
    # torch's bf16 gradient of the same log-probs: the error a bf16 result may carry.
    x = logits.detach().requires_grad_()
    picked = x.log_softmax(dim=1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    (torch_grad,) = torch.autograd.grad(picked, x, scored_grad.to(x.dtype))
    # Most entries are g * p, far below max|grad|: the slack is relative to each entry
    # (one bf16 eps), so an error in the softmax term cannot hide under one absolute tolerance.
    slack = torch.finfo(torch.bfloat16).eps * expected_grad.abs() + 1e-7 * expected_grad.abs().max()
    plain_lse = torch.logsumexp(logits.float(), dim=1).masked_fill(targets == IGNORE, 0.0)  # fp32, as the kernels
    for lse, out, grad_logits in results:
        assert_oracle_close(lse, plain_lse, expected_lse, what="lse")
        assert out[2] == 0
        assert_no_worse_per_entry(grad_logits, torch_grad, expected_grad, slack=slack, what="d_logits")


def test_single_sequence_small_vocab(backend):
    d_logits = assert_matches_reference(*make_case(B=1, T=6, V=37))
    # Positions predicting an ignored label, and the last position, get no gradient.
    assert (d_logits[0, :3] == 0).all() and (d_logits[0, -1] == 0).all() and (d_logits[0, 3:5] != 0).all()


@pytest.mark.parametrize(
    "logits, labels, error, match",
    [
        (torch.randn(2, 4, 9), torch.tensor([[0, 1, 2, 3], [5, IGNORE, IGNORE, IGNORE]]), ValueError, "labels"),
        (torch.randn(2, 4, 9), torch.tensor([[0, 1, 2, 9], [5, 1, 2, 3]]), ValueError, "labels"),
        (torch.randn(2, 4, 9), torch.tensor([[0, 1, -3, 3], [5, 1, 2, 3]]), ValueError, "labels"),
        (torch.randn(2, 4, 9), torch.tensor([[0, 1, 2], [5, 1, 2]]), ValueError, "labels"),
        (torch.randn(2, 4, 9), torch.zeros(2, 4), TypeError, "labels"),
        (torch.randn(8, 9), torch.zeros(8, dtype=torch.int64), ValueError, "logits"),
        (torch.randint(0, 5, (2, 4, 9)), torch.zeros(2, 4, dtype=torch.int64), TypeError, "logits"),
        ([[[0.0]]], torch.zeros(1, 1, dtype=torch.int64), TypeError, "logits"),
    ],
)
def test_bad_input_raises(backend, logits, labels, error, match):
    with pytest.raises(error, match=match):
        get_batch_logprobs(logits, labels)


def test_nan_result_raises_unless_unchecked(backend):
    logits, labels, _ = make_case(B=2, T=4, V=50)
    logits = logits.float()
    logits[1, 0, 7] = float("nan")  # position 0 predicts the scored labels[1, 1]
    with pytest.raises(FloatingPointError, match="get_batch_logprobs"):
        get_batch_logprobs(logits, labels)
    out = get_batch_logprobs(logits, labels, check_finite=False)
    assert torch.isnan(out[1]) and torch.isfinite(out[0])


def test_neg_inf_logits_mask_tokens(backend):
    """-inf logits (a vocabulary mask) over the kernel's whole first 4096-block and inside
    the second: the online log-sum-exp must not turn -inf - -inf into NaN."""
    logits, labels, grad = make_case(B=2, T=4, V=5000, seed=3)
    logits[..., :4096] = -float("inf")
    logits[..., 4500:4600] = -float("inf")
    allowed = torch.cat([torch.arange(4096, 4500), torch.arange(4600, 5000)])
    pick = torch.randint(0, allowed.numel(), labels.shape, generator=torch.Generator().manual_seed(4))
    labels = torch.where(labels == IGNORE, labels, allowed[pick])
    assert_matches_reference(logits, labels, grad)


def test_fp64_logits_are_computed_in_fp64(backend):
    """The kernels compute in fp32: fp64 logits take the torch path, which keeps fp64."""
    logits, labels, grad = make_case(V=300, seed=5)
    expected, expected_grad = value_and_grad(reference.get_batch_logprobs, logits, labels, grad, torch.float64)
    out, d_logits = value_and_grad(get_batch_logprobs, logits, labels, grad, torch.float64)
    assert out.dtype == d_logits.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_logits, expected_grad, rtol=1e-12, atol=1e-14)
