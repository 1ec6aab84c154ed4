"""sami_fast.sami_loss (both backends) and the mi_loss kernel against the float64 oracle."""

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from oracle import assert_no_worse_per_entry, assert_oracle_close, ulp_floor
from sami_fast import reference, sami_loss
from sami_fast.kernels.mi_loss import COLUMN_HITS, COUNT, LOSS, ROW_HITS, mi_loss_kernel

# The interpreter evaluates exp(x - lse) of non-contributing lines before discarding it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

SIZES = [1, 2, 3, 8, 33, 130]
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
# No shrinking: under the interpreter it costs minutes; the failing example is printed as drawn.
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                phases=[Phase.explicit, Phase.reuse, Phase.generate])


def random_mask(shape, generator=None):
    """Random keep-mask with some diagonal entries masked; first query fully masked if batched."""
    mask = torch.rand(shape, generator=generator) > 0.25
    if len(shape) == 3 and shape[0] > 1:
        mask[0] = False
    flat = mask.reshape(-1, shape[-1], shape[-1])
    flat[-1, 0, 0] = True  # at least one contributing row
    return mask


def loss_and_grad(fn, x, mask, weight=1.0):
    """Loss and d(weight * loss)/dx, through autograd."""
    x = x.detach().clone().requires_grad_()
    loss = fn(x, mask)
    (grad,) = torch.autograd.grad(loss * weight, x)
    return loss.detach(), grad


def gradient_scale(x, mask, weight):
    """Per-entry size of one softmax term of the gradient, |weight| / (2 Q n_b): the scale
    that fp32 rounding errors are relative to, even where p_row + p_col - 2 cancels."""
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    n = torch.full(x3.shape[:1], float(x3.shape[-1]), dtype=torch.float64)
    if mask is not None:
        n = (mask if mask.dim() == 3 else mask.unsqueeze(0)).diagonal(dim1=1, dim2=2).sum(1).double()
    scale = abs(weight) / (2 * (n > 0).sum() * n.clamp(min=1))
    return scale[:, None, None].expand(x3.shape).reshape(x.shape)


def fp32_floor(x):
    """The least noise of a loss, an MI bound or a gradient (relative to its natural scale) from
    ``x``: one fp32 ulp of the largest finite |x|. That is the absolute rounding of x - lse, which
    a loss carries as is (lse - x cancels to far below x) and every p = exp(x - lse) relative to itself."""
    return ulp_floor(x[torch.isfinite(x)], torch.float32)


def assert_matches_oracle(x, mask, weight=1.0):
    """sami_loss in x's dtype against the reference in the same dtype (plain) and in fp64 (truth).

    fp32: the oracle rule, the gradient's errors in units of |truth| plus one softmax term
    (``gradient_scale``), so the small entries count. bf16/fp16: entry by entry no worse
    than plain, plus the one final rounding the fused kernel adds.
    """
    ref, ref_grad = loss_and_grad(reference.sami_loss, x.double(), mask, weight)
    same, same_grad = loss_and_grad(reference.sami_loss, x, mask, weight)
    loss, grad = loss_and_grad(sami_loss, x, mask, weight)
    assert loss.dtype == x.dtype and grad.dtype == x.dtype
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    natural = gradient_scale(x, mask, weight)
    if x.dtype == torch.float32:
        assert_oracle_close(loss, same, ref, tiny=fp32_floor(x), what="loss")
        assert_oracle_close(grad, same_grad, ref_grad, scale=ref_grad.abs() + natural, tiny=fp32_floor(x),
                            what="gradient")
        return
    eps = EPS[x.dtype]
    # The loss is accumulated in fp32 (a few fp32 ulps of the largest |x|) and rounded once to x.dtype.
    fp32_error = 8 * EPS[torch.float32] * max(1.0, x[torch.isfinite(x)].abs().max().item())
    assert_no_worse_per_entry(loss, same, ref, slack=eps * ref.abs() + fp32_error, what="loss")
    # The saved gradient is rounded once to x.dtype (the interpreter's fp32 -> bf16 cast
    # truncates: up to one ulp = 2 eps) and once more when scaled by grad_output != 1.
    subnormal_step = 2 * torch.finfo(x.dtype).tiny * eps  # fp16 gradients are often subnormal
    slack = 3 * eps * ref_grad.abs() + 1e-2 * eps * natural + 2 * subnormal_step
    assert_no_worse_per_entry(grad, same_grad, ref_grad, slack=slack, what="gradient")


@pytest.mark.parametrize("C", SIZES)
def test_fp32_matches_reference(backend, C):
    B = 2 if C > 33 else 3
    assert_matches_oracle(torch.randn(C, C) * 3, None)
    assert_matches_oracle(torch.randn(B, C, C) * 3, None, weight=-2.5)
    assert_matches_oracle(torch.randn(B, C, C) * 3, random_mask((B, C, C)))


@settings(FAST, max_examples=12)
@given(
    C=st.sampled_from(SIZES),
    B=st.sampled_from([None, 1, 2, 4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    masked=st.booleans(),
    scale=st.sampled_from([0.5, 4.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_inputs_match_reference(backend, C, B, dtype, masked, scale, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (C, C) if B is None else (B, C, C)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    assert_matches_oracle(x, random_mask(shape, g) if masked else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_minus_inf_off_the_diagonal_and_masked_diagonals(backend, dtype):
    B, C = 3, 9
    x = torch.randn(B, C, C) * 2
    x[torch.rand(B, C, C) < 0.3] = -math.inf
    x.diagonal(dim1=1, dim2=2).copy_(torch.randn(B, C))  # contributing diagonal stays finite
    x[1, 4, :] = -math.inf  # whole row impossible: its diagonal is masked below
    mask = random_mask((B, C, C))
    mask[1, 4, 4] = False
    x, mask = x.to(dtype), mask
    assert_matches_oracle(x, mask)
    _, grad = loss_and_grad(sami_loss, x, mask)
    assert grad[0].abs().max() == 0  # the fully masked query
    assert grad[~mask].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_magnitudes_do_not_overflow(backend, dtype):
    x = ((torch.rand(2, 33, 33) * 2 - 1) * 1e4).to(dtype)
    assert_matches_oracle(x, None)
    assert_matches_oracle(x, random_mask((2, 33, 33)))


def test_non_contiguous_input_and_broadcast_mask(backend):
    x = torch.randn(3, 10, 10)
    mask = random_mask((1, 10, 10)).expand(3, 10, 10)
    assert_matches_oracle(x.transpose(1, 2), mask)
    assert_matches_oracle(torch.randn(12, 12)[1:11, 2:12], None)


@pytest.mark.parametrize("C", [1, 3, 33])
def test_stats_match_reference(backend, C):
    x = torch.randn(4, C, C) + 2 * torch.eye(C)
    mask = random_mask((4, C, C))
    for dtype in (torch.float32, torch.bfloat16):  # bf16 produces ties: first argmax wins
        for m in (None, mask):
            xd = x.to(dtype)
            loss, stats = sami_loss(xd, m, return_stats=True)
            truth, plain = reference.stats(xd.double(), m), reference.stats(xd, m)
            for key, value in {"loss": loss, **stats}.items():
                # Accuracies are counts: one ulp of the value. The loss and the MI bound: fp32_floor.
                tiny = None if key.endswith("accuracy") else fp32_floor(xd)
                assert_oracle_close(value, plain[key], truth[key], tiny=tiny, what=key)


def test_no_grad_and_unbatched_shapes(backend):
    x = torch.randn(5, 5)
    with torch.no_grad():
        loss = sami_loss(x)
    assert loss.shape == () and loss.dtype == torch.float32
    truth = reference.sami_loss(x.double())
    assert_oracle_close(loss, reference.sami_loss(x), truth, tiny=fp32_floor(x))


def test_gradcheck_float64(backend):
    x = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    mask = random_mask((2, 4, 4))
    mask[1, 2, 3] = False
    assert torch.autograd.gradcheck(lambda t: sami_loss(t, mask), (x,))
    assert torch.autograd.gradcheck(lambda t: sami_loss(t), (x[0].detach().clone().requires_grad_(),))


# ------------------------------------------------------------------ the kernel's multi-tile path
def per_query_oracle(x, mask, dtype=torch.float64):
    """The kernel's table (L_b / Q, n_b, row hits, column hits) and the batch loss's gradient, in ``dtype``."""
    x = x.detach().to(dtype).requires_grad_()
    B, C = x.shape[:2]
    table = torch.zeros(B, 4, dtype=dtype)
    table[:, COUNT] = C if mask is None else mask.diagonal(dim1=1, dim2=2).sum(1).to(dtype)
    num_queries = (table[:, COUNT] > 0).sum()
    for b in range(B):
        m = None if mask is None else mask[b]
        if table[b, COUNT] > 0:
            s = reference.stats(x[b].detach(), m)
            table[b, LOSS] = s["loss"] / num_queries
            table[b, ROW_HITS] = (s["row_accuracy"] * table[b, COUNT]).round()
            table[b, COLUMN_HITS] = (s["column_accuracy"] * table[b, COUNT]).round()
    (grad,) = torch.autograd.grad(reference.sami_loss(x, mask), x)
    return table, grad


@pytest.mark.parametrize("C, block", [(33, 16), (20, 8), (32, 16), (7, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_multi_tile_kernel_matches_reference(C, block, dtype, masked):
    B = 3
    x = (torch.randn(B, C, C) * 3).to(dtype)
    x[torch.rand(B, C, C) < 0.1] = -math.inf
    x.diagonal(dim1=1, dim2=2).copy_(torch.randn(B, C))
    x[:, C - 1, :block] = -math.inf  # the last row and column start with an all -inf tile
    x[:, :block, C - 1] = -math.inf
    mask = random_mask((B, C, C)) if masked else None
    table, grad = per_query_oracle(x, mask)
    out, ours_grad = mi_loss_kernel(x, mask, block_size=block)
    single, single_grad = mi_loss_kernel(x, mask)  # one register tile
    natural = gradient_scale(x, mask, 1.0)
    # The kernel computes in fp32 (also on bf16 input): plain is the reference in fp32. Its bf16
    # gradient adds one rounding (the interpreter's cast truncates: up to one bf16 ulp).
    plain_table, plain_grad = per_query_oracle(x, mask, torch.float32)
    for tiles, (t, g) in {"several tiles": (out, ours_grad), "one tile": (single, single_grad)}.items():
        torch.testing.assert_close(t[:, 1:].double(), table[:, 1:], rtol=0, atol=0)  # counts: exact
        if dtype == torch.float64:  # fp64 against fp64: no plain computation of lower precision to measure by
            torch.testing.assert_close(t[:, LOSS], table[:, LOSS], rtol=1e-12, atol=1e-15)
            excess = (g - grad).abs() - 1e-12 * (grad.abs() + natural)
            assert excess.max() <= 0, tiles
            continue
        assert_oracle_close(t[:, LOSS], plain_table[:, LOSS], table[:, LOSS],
                            tiny=fp32_floor(x), what=f"loss, {tiles}")
        assert_oracle_close(g, plain_grad, grad, scale=grad.abs() + natural, tiny=fp32_floor(x), dtype=dtype,
                            what=f"gradient, {tiles}")


@pytest.mark.parametrize("block", [8, None])
def test_argmax_ties_go_to_the_first_index_across_tiles(block):
    x = torch.randn(1, 20, 20) * 0.1 + torch.eye(20)
    for k, j in [(1, 17), (5, 9), (12, 2)]:  # rows 1, 5: tie after the diagonal (hit); 12: before (miss)
        x[0, k, k] = x[0, k, j] = 3.0
    for j, k in [(3, 19), (6, 10), (15, 4)]:  # columns 3, 6: tie below the diagonal (hit); 15: above
        x[0, j, j] = x[0, k, j] = 3.0
    table, _ = per_query_oracle(x, None)
    out, _ = mi_loss_kernel(x, None, block_size=block)
    assert table[0, ROW_HITS] < 20 and table[0, COLUMN_HITS] < 20
    torch.testing.assert_close(out[:, ROW_HITS:].double(), table[:, ROW_HITS:], rtol=0, atol=0)


def test_kernel_at_c4096():
    C = 4096
    x = torch.randn(1, C, C)
    out, grad = mi_loss_kernel(x, None, block_size=1024, max_block=1024)
    truth, plain = reference.stats(x.double()), reference.stats(x)
    assert_oracle_close(out[0, LOSS], plain["loss"], truth["loss"], tiny=fp32_floor(x),
                        what="loss")
    assert out[0, ROW_HITS].item() == round(truth["row_accuracy"].item() * C)
    assert out[0, COLUMN_HITS].item() == round(truth["column_accuracy"].item() * C)

    def closed_form_grad(z):
        """(softmax_row + softmax_col - 2 I) / (2 C), in z's dtype."""
        expect = torch.softmax(z, dim=1)
        expect += torch.softmax(z, dim=0)
        expect.diagonal().sub_(2.0)
        return expect / (2 * C)

    truth_grad = closed_form_grad(x[0].double())
    # Every entry counts relative to itself (all are > 0 off the diagonal): most are ~1e-8, the diagonal ~1e-4.
    assert_oracle_close(grad[0], closed_form_grad(x[0]), truth_grad, scale=truth_grad.abs(), tiny=fp32_floor(x),
                        what="gradient")


def test_kernel_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        mi_loss_kernel(torch.randn(1, 4, 4), None, block_size=12)


# ------------------------------------------------------------------ bad input
def _masked_everywhere(x):
    return torch.zeros(x.shape, dtype=torch.bool)


BAD_INPUTS = [
    ("not a tensor", lambda: ([[0.0]], None), TypeError, "logprobs"),
    ("rank 1", lambda: (torch.randn(3), None), ValueError, "logprobs"),
    ("rank 4", lambda: (torch.randn(1, 2, 3, 3), None), ValueError, "logprobs"),
    ("not square", lambda: (torch.randn(2, 3, 4), None), ValueError, "logprobs"),
    ("integer dtype", lambda: (torch.ones(3, 3, dtype=torch.int64), None), TypeError, "logprobs"),
    ("C == 0", lambda: (torch.randn(2, 0, 0), None), ValueError, "logprobs"),
    ("B == 0", lambda: (torch.randn(0, 3, 3), None), ValueError, "logprobs"),
    ("NaN", lambda: (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), None), ValueError, "logprobs"),
    ("+inf", lambda: (torch.tensor([[0.0, math.inf], [1.0, 2.0]]), None), ValueError, "logprobs"),
    ("-inf on the diagonal", lambda: (torch.tensor([[-math.inf, 0.0], [1.0, 2.0]]), None), ValueError, "logprobs"),
    ("mask not a tensor", lambda: (torch.randn(3, 3), [[True] * 3] * 3), TypeError, "mask"),
    ("mask not bool", lambda: (torch.randn(3, 3), torch.ones(3, 3)), TypeError, "mask"),
    ("mask shape", lambda: (torch.randn(2, 3, 3), torch.ones(3, 3, dtype=torch.bool)), ValueError, "mask"),
    ("mask masks all", lambda: (torch.randn(2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.bool)), ValueError, "mask"),
]


@pytest.mark.parametrize("name, make, error, argument", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(backend, name, make, error, argument):
    x, mask = make()
    with pytest.raises(error, match=argument):
        sami_loss(x, mask)


def test_fully_masked_batch_raises_with_the_finite_check_only(backend):
    x, nothing = torch.randn(2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask"):
        sami_loss(x, nothing)
    # check_finite=False promises no host sync: the caller owns the check.
    assert not torch.isfinite(sami_loss(x, nothing, check_finite=False))


@pytest.mark.parametrize("shape,mask", [((2, 3, 3), False), ((2, 3, 3), True), ((2, 100, 100), False)])
def test_second_derivative_is_right_or_absent(backend, shape, mask):
    # The Functions are once-differentiable (their result carries no graph); the small
    # unmasked PyTorch composition is plain autograd, so its second derivative must be right.
    # float64 takes the PyTorch path on every backend.
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    m = torch.rand(*shape) > 0.2 if mask else None
    if m is not None:
        m.diagonal(dim1=1, dim2=2).fill_(True)
    (grad,) = torch.autograd.grad(sami_loss(x, m), x, create_graph=True)
    if grad.requires_grad:
        assert m is None and x.numel() <= 2**14
        (second,) = torch.autograd.grad((grad * grad).sum(), x)
        (grad_ref,) = torch.autograd.grad(reference.sami_loss(x, m), x, create_graph=True)
        (second_ref,) = torch.autograd.grad((grad_ref * grad_ref).sum(), x)
        torch.testing.assert_close(second, second_ref, rtol=1e-9, atol=1e-12)


def test_check_finite_false_skips_the_nan_check(backend):
    x = torch.tensor([[0.0, float("nan")], [1.0, 2.0]])
    assert torch.isnan(sami_loss(x, check_finite=False))


def test_masked_entries_may_hold_nan(backend):
    x = torch.randn(4, 4)
    mask = torch.rand(4, 4) > 0.3
    mask.fill_diagonal_(True)
    x[~mask] = float("nan")
    truth = reference.sami_loss(x.double(), mask)
    assert_oracle_close(sami_loss(x, mask), reference.sami_loss(x, mask), truth,
                        tiny=fp32_floor(x[mask]))
