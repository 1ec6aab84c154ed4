"""The plain-PyTorch oracle agrees with the ORIGINAL SAMI implementation.

``reference.original_sami_loss`` and ``reference.original_get_batch_logprobs`` are
transcribed from janphilippfranken/sami, src/sami/trainers/sami_trainer.py; everything in
``sami_fast.reference`` that claims the original's semantics is checked against
them in float64.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sami_fast import reference
from sami_fast.reference import original_batched_sami_loss, original_get_batch_logprobs, original_sami_loss

TIGHT = dict(rtol=1e-12, atol=1e-12)


def _scores(*shape, scale=3.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_()


def _loss_and_grad(fn, x, *args):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@settings(max_examples=25, deadline=None)
@given(C=st.integers(1, 12), scale=st.sampled_from([0.1, 3.0, 50.0]), seed=st.integers(0, 2**31 - 1))
def test_loss_and_gradient_match_original(C, scale, seed):
    torch.manual_seed(seed)
    x = _scores(C, C, scale=scale)
    ours, ours_grad = _loss_and_grad(reference.sami_loss, x)
    orig, orig_grad = _loss_and_grad(original_sami_loss, x)
    torch.testing.assert_close(ours, orig, **TIGHT)
    torch.testing.assert_close(ours_grad, orig_grad, **TIGHT)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 5), C=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_batched_is_mean_of_per_query_originals(B, C, seed):
    torch.manual_seed(seed)
    x = _scores(B, C, C)
    ours, ours_grad = _loss_and_grad(reference.sami_loss, x)
    orig, orig_grad = _loss_and_grad(lambda t: torch.stack([original_sami_loss(q) for q in t]).mean(), x)
    torch.testing.assert_close(ours, orig, **TIGHT)
    torch.testing.assert_close(ours_grad, orig_grad, **TIGHT)


@settings(max_examples=20, deadline=None)
@given(C=st.integers(2, 10), data=st.data())
def test_mask_selecting_a_sub_square_equals_original_on_it(C, data):
    keep = sorted(data.draw(st.sets(st.integers(0, C - 1), min_size=1, max_size=C)))
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = _scores(C, C)
    idx = torch.tensor(keep)
    mask = torch.zeros(C, C, dtype=torch.bool)
    mask[idx[:, None], idx[None, :]] = True
    ours, ours_grad = _loss_and_grad(reference.sami_loss, x, mask)
    orig, orig_sub_grad = _loss_and_grad(original_sami_loss, x.detach()[idx][:, idx])
    orig_grad = torch.zeros_like(ours_grad)
    orig_grad[idx[:, None], idx[None, :]] = orig_sub_grad
    torch.testing.assert_close(ours, orig, **TIGHT)
    torch.testing.assert_close(ours_grad, orig_grad, **TIGHT)


def test_fully_masked_query_is_left_out_of_the_batch_mean():
    x = _scores(3, 4, 4)
    mask = torch.ones(3, 4, 4, dtype=torch.bool)
    mask[1].fill_(False)
    mask[2, 1, 1] = False  # row 1 / column 1 of query 2 do not contribute ...
    mask[2, 3, 0] = False  # ... and entry (3, 0) takes no part in either softmax
    ours, ours_grad = _loss_and_grad(reference.sami_loss, x, mask)

    def expected(t):
        q2 = t[2].masked_fill(~mask[2], -math.inf)
        keep = torch.tensor([0, 2, 3])
        row = (torch.logsumexp(q2[keep], dim=1) - q2[keep, keep]).sum()
        col = (torch.logsumexp(q2[:, keep], dim=0) - q2[keep, keep]).sum()
        return (original_sami_loss(t[0]) + (row + col) / (2 * 3)) / 2

    orig, orig_grad = _loss_and_grad(expected, x)
    torch.testing.assert_close(ours, orig, **TIGHT)
    torch.testing.assert_close(ours_grad, orig_grad, **TIGHT)
    assert ours_grad[1].abs().max() == 0


def test_get_batch_logprobs_matches_original_with_ignored_positions():
    B, T, V = 4, 9, 17
    logits = torch.randn(B, T, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100  # a masked prompt
    labels[2, 5:] = -100  # padding
    labels[3, ::2] = -100
    ours = reference.get_batch_logprobs(logits, labels)
    orig = original_get_batch_logprobs(logits, labels)
    torch.testing.assert_close(ours, orig, **TIGHT)


def test_stats_on_a_diagonal_dominant_matrix():
    C = 6
    x = torch.randn(C, C, dtype=torch.float64) + 10 * torch.eye(C, dtype=torch.float64)
    s = reference.stats(x)
    assert s["row_accuracy"] == 1 and s["column_accuracy"] == 1
    loss = original_sami_loss(x)
    torch.testing.assert_close(s["loss"], loss, **TIGHT)
    torch.testing.assert_close(s["mi_lower_bound"], math.log(C) - loss, **TIGHT)


def test_stats_count_misses_and_use_the_contributing_count():
    x = 2 * torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    x[:, 0, 1] = 5.0  # row 0 and column 1 of both queries miss
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    mask[1, 2, 2] = False  # query 1 has n = 2
    s = reference.stats(x, mask)
    assert s["row_accuracy"].item() == pytest.approx(3 / 5)
    assert s["column_accuracy"].item() == pytest.approx(3 / 5)
    n = torch.tensor([3.0, 2.0], dtype=torch.float64)
    per_query = torch.stack([reference.sami_loss(x[b], mask[b]) for b in range(2)])
    torch.testing.assert_close(s["mi_lower_bound"], (n.log() - per_query).mean(), **TIGHT)


def test_batched_original_is_the_mean_of_per_query_originals():
    x = _scores(5, 7, 7)
    batched, batched_grad = _loss_and_grad(original_batched_sami_loss, x)
    per_query, per_query_grad = _loss_and_grad(lambda t: torch.stack([original_sami_loss(q) for q in t]).mean(), x)
    torch.testing.assert_close(batched, per_query, **TIGHT)
    torch.testing.assert_close(batched_grad, per_query_grad, **TIGHT)
