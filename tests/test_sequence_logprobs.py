"""sami_fast.sequence_logprobs against the float64 reference, on both backends.

Shapes are small (the Triton backend runs in the interpreter) but odd: D is not a
power of two and V is not a multiple of the kernel's vocabulary block.
"""

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from oracle import assert_no_worse_per_entry, assert_oracle_close, linear_head_floors
from sami_fast import reference, sequence_logprobs
from sami_fast.kernels import linear_logprobs
from sami_fast.kernels.common import tanh
from sami_fast.sequence_logprobs import (
    INTERPRETER_BACKWARD, INTERPRETER_FORWARD, _TorchLinearLogprobs, _TritonLinearLogprobs,
)

# The module (the package exports the function under the same name).
dispatch = importlib.import_module("sami_fast.sequence_logprobs")

IGNORE = -100
NAMES = ("value", "d_hidden", "d_weight", "d_bias")


def forward_launch(*args, **kwargs):
    """The forward launcher with the options sami_fast gives it under the interpreter."""
    return linear_logprobs.linear_logprobs_kernel(*args, **{**INTERPRETER_FORWARD, **kwargs})


def backward_launch(*args, **kwargs):
    """The backward launcher with the options sami_fast gives it under the interpreter."""
    return linear_logprobs.linear_logprobs_backward_kernel(*args, **{**INTERPRETER_BACKWARD, **kwargs})


def make_inputs(B, T, D, V, *, ignored=0.2, dtype=torch.float64, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen, dtype=dtype)
    weight = torch.randn(V, D, generator=gen, dtype=dtype) * scale
    bias = torch.randn(V, generator=gen, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[torch.rand(B, T, generator=gen) < ignored] = IGNORE
    labels[:, :2] = torch.randint(0, V, (B, 2), generator=gen)  # every sequence scores a token
    return hidden, weight, bias, labels


def evaluate(fn, hidden, weight, bias, labels, upstream, dtype, **kw):
    """(output, d_hidden, d_weight, d_bias) in float64 for ``sum(upstream * fn(...))``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = leaves
    out = fn(h, w, labels, bias=b if kw.pop("use_bias", True) else None, **kw)
    (out.double() * upstream).sum().backward()
    grads = [t.grad.double() if t.grad is not None else torch.zeros_like(t, dtype=torch.float64) for t in leaves]
    return [out.detach().double()] + grads


def upstream_for(out_shape, seed=1):
    """A random upstream gradient, fp64 holding fp32 numbers (what ours and the plain fp32 reference get)."""
    return torch.randn(out_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float().double()


def as_fp32(*tensors):
    """fp64 tensors rounded to fp32 and back: fp64 then computes on exactly the numbers ours gets,
    so the oracle rule measures the arithmetic's error only."""
    return [t.float().double() for t in tensors]


def check_fp32(backend_inputs, **kw):
    """Value and gradients of fp32 sequence_logprobs obey the oracle rule: the reference in fp32
    (plain) and in fp64 (truth), on the inputs rounded to fp32."""
    hidden, weight, bias = as_fp32(*backend_inputs[:3])
    labels = backend_inputs[3]
    ref_out = reference.sequence_logprobs(hidden, weight, labels, bias=bias if kw.get("use_bias", True) else None,
                                          **{k: v for k, v in kw.items() if k != "use_bias"})
    upstream = upstream_for(ref_out.shape)
    truth = evaluate(reference.sequence_logprobs, hidden, weight, bias, labels, upstream, torch.float64, **kw)
    plain = evaluate(reference.sequence_logprobs, hidden, weight, bias, labels, upstream, torch.float32, **kw)
    ours = evaluate(sequence_logprobs, hidden, weight, bias, labels, upstream, torch.float32, **kw)
    assert ours[0].shape == truth[0].shape
    floors = linear_head_floors(hidden, weight, bias if kw.get("use_bias", True) else None, upstream,
                                kw.get("softcap"), kw.get("temperature", 1.0), torch.float32)
    for name, floor, o, p, t in zip(NAMES, floors.values(), ours, plain, truth):
        assert_oracle_close(o, p, t, tiny=floor, dtype=torch.float32, what=name)


def test_all_features_at_odd_sizes(backend):
    """B=3, T=47, D=123, V=1001, 20% ignored, softcap, temperature, bias, per-sequence gradients.

    On Triton this is the test with several row blocks (the last one ragged) and a
    vocabulary of several blocks in each of several splits, values and gradients.
    """
    inputs = make_inputs(3, 47, 123, 1001)
    interpreted = INTERPRETER_FORWARD["config"].kwargs  # the one tile config under TRITON_INTERPRET
    scored_rows = (inputs[3][:, 1:] != IGNORE).sum().item()
    assert scored_rows > interpreted["BLOCK_M"] and scored_rows % interpreted["BLOCK_M"], "setup: ragged row blocks"
    vocab_blocks = math.ceil(1001 / interpreted["BLOCK_N"])
    assert vocab_blocks >= 2 * INTERPRETER_FORWARD["n_splits"] >= 4, "setup: several vocabulary blocks per split"
    check_fp32(inputs, softcap=4.0, temperature=0.7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [True, False])
def test_reductions_and_shift(backend, reduction, shift):
    check_fp32(make_inputs(2, 13, 40, 300, seed=3), reduction=reduction, shift=shift)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 3), T=st.integers(3, 12), D=st.integers(1, 70), V=st.integers(2, 300),
    ignored=st.sampled_from([0.0, 0.2, 0.6]), reduction=st.sampled_from(["mean", "sum", "none"]),
    shift=st.booleans(), softcap=st.sampled_from([None, 1.5, 30.0]), temperature=st.sampled_from([1.0, 0.5, 2.0]),
    use_bias=st.booleans(), seed=st.integers(0, 2**16),
)
# Found by the search: small logits under softcap 30 (a tanh accurate to an ulp of 1, not of its value).
@example(B=2, T=3, D=47, V=3, ignored=0.0, reduction="sum", shift=False, softcap=30.0, temperature=1.0,
         use_bias=False, seed=1040)
def test_random_configurations(backend, B, T, D, V, ignored, reduction, shift, softcap, temperature, use_bias, seed):
    check_fp32(make_inputs(B, T, D, V, ignored=ignored, seed=seed), reduction=reduction, shift=shift,
               softcap=softcap, temperature=temperature, use_bias=use_bias)


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < N
    tl.store(out_ptr + offsets, tanh(tl.load(x_ptr + offsets, mask=inside)), mask=inside)


def test_kernel_tanh_is_accurate_relative_to_its_value():
    """A softcapped logit is c·tanh(s / c): an error of an ulp of 1 where tanh is small would be
    c ulps of a small logit. Relative errors, from 1e-30 to saturation, both sides of 0.625."""
    x = torch.cat([torch.logspace(-30, 2, 1500), torch.linspace(0.5, 0.75, 501)])
    x = torch.cat([x, -x, torch.tensor([0.0, float("inf"), float("-inf")])])
    out = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
    truth = torch.tanh(x.double())
    assert_oracle_close(out, torch.tanh(x), truth, k=4, scale=truth.abs().clamp_min(1e-38), what="tanh")


@pytest.mark.parametrize("shape", [(2, 40, 128, 256), (2, 9, 1, 3)], ids=["block_multiples", "tiny"])
def test_edge_sizes(backend, shape):
    """D, V exact multiples of the kernel blocks (unmasked EVEN_D path); D=1 and V=3 (an empty vocabulary split)."""
    check_fp32(make_inputs(*shape, seed=5), softcap=2.0)


def test_peaked_softmax(backend):
    """Weight rows equal to scaled hidden rows: softmax is near one-hot, p -> 1 for the target."""
    hidden, weight, bias, labels = make_inputs(2, 17, 48, 211, seed=7)
    labels = torch.randperm(211, generator=torch.Generator().manual_seed(8))[:34].reshape(2, 17)
    # Row t predicts labels[t+1]: make weight[labels[t+1]] a large multiple of hidden[t].
    for b in range(2):
        for t in range(16):
            weight[labels[b, t + 1]] = 3.0 * hidden[b, t] / hidden[b, t].norm() * 4.0
    ref = reference.sequence_logprobs(hidden, weight, labels)
    assert (ref > -1e-2).all(), "setup: the target should dominate the softmax"
    check_fp32((hidden, weight, bias, labels), use_bias=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_torch_error(backend, dtype):
    """|ours - fp64| <= |torch in the same dtype - fp64| + one rounding of the output dtype."""
    hidden, weight, bias, labels = make_inputs(3, 29, 75, 517, seed=11)
    kw = dict(softcap=5.0, temperature=0.7)
    upstream = upstream_for(3)
    exact = evaluate(reference.sequence_logprobs, hidden, weight, bias, labels, upstream, torch.float64, **kw)
    torch_same = evaluate(reference.sequence_logprobs, hidden, weight, bias, labels, upstream, dtype, **kw)
    ours = evaluate(sequence_logprobs, hidden, weight, bias, labels, upstream, dtype, **kw)
    eps = torch.finfo(dtype).eps
    for name, a, t, r in zip(NAMES, ours, torch_same, exact):
        assert_no_worse_per_entry(a, t, r, slack=eps * r.abs().max().item(), what=name)


@pytest.mark.parametrize("shift", [True, False])
def test_packed_matches_padded(backend, shift):
    """Packed sequences (cu_seqlens) and the same sequences right-padded: both obey the rule."""
    lengths = [9, 4, 13]
    D, V = 33, 150
    hidden, weight, bias, labels = make_inputs(3, 13, D, V, seed=13)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    packed_h = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])
    packed_l = torch.cat([labels[i, :n] for i, n in enumerate(lengths)])
    padded_l = labels.clone()
    for i, n in enumerate(lengths):
        padded_l[i, n:] = IGNORE
    for reduction in ("mean", "sum"):
        check_fp32((hidden, weight, bias, padded_l), reduction=reduction, shift=shift)
        check_fp32((packed_h, weight, bias, packed_l), reduction=reduction, shift=shift, cu_seqlens=cu)
    check_fp32((packed_h, weight, bias, packed_l), reduction="none", shift=shift, cu_seqlens=cu.long())
    none = sequence_logprobs(packed_h.float(), weight.float(), packed_l, shift=shift, cu_seqlens=cu, reduction="none")
    assert none.shape == (sum(lengths),)


@pytest.mark.parametrize("trainable", ["hidden", "weight"])
def test_frozen_inputs_get_no_gradient_and_no_work(backend, monkeypatch, trainable):
    """Only the gradients asked for: the autograd backward returns None for a frozen input
    (on Triton the launcher is told to skip it), and the other gradients stay exact."""
    hidden, weight, bias, labels = make_inputs(2, 11, 37, 120, seed=17)
    hidden, weight, bias = as_fp32(hidden, weight, bias)
    h = hidden.float().requires_grad_(trainable == "hidden")
    w = weight.float().requires_grad_(trainable == "weight")
    b = bias.float()  # frozen in both cases
    function = _TritonLinearLogprobs if backend == "triton" else _TorchLinearLogprobs
    backward, launcher = function.backward, dispatch.linear_logprobs_backward_kernel
    returned, requested = [], []

    def spy_backward(ctx, *grads):
        returned.append(backward(ctx, *grads))
        return returned[-1]

    def spy_launcher(*args, **kwargs):
        requested.append(args[-3:])  # need_rows, need_weight, need_bias
        return launcher(*args, **kwargs)

    monkeypatch.setattr(function, "backward", staticmethod(spy_backward))
    monkeypatch.setattr(dispatch, "linear_logprobs_backward_kernel", spy_launcher)
    sequence_logprobs(h, w, labels, bias=b).sum().backward()

    rows_grad, weight_grad, bias_grad = returned[0][:3]
    assert bias_grad is None and b.grad is None
    if backend == "triton":
        assert requested == [(trainable == "hidden", trainable == "weight", False)]
    else:
        assert requested == []
    truth, plain = (evaluate(reference.sequence_logprobs, hidden, weight, bias, labels, torch.ones(2), dtype)
                    for dtype in (torch.float64, torch.float32))
    if trainable == "hidden":
        assert weight_grad is None and w.grad is None
        assert_oracle_close(h.grad, plain[1], truth[1], what="d_hidden")
    else:
        assert rows_grad is None and h.grad is None
        assert_oracle_close(w.grad, plain[2], truth[2], what="d_weight")


def test_noncontiguous_inputs(backend):
    """Strided views obey the rule as contiguous tensors do."""
    hidden, weight, bias, labels = make_inputs(2, 11, 37, 120, seed=17)
    hidden, weight = as_fp32(hidden, weight)
    h_big = torch.randn(2, 11, 2 * 37, dtype=torch.float32)[:, :, ::2]
    h_big.copy_(hidden)
    w_t = weight.float().t().contiguous().t()  # (V, D) with stride (1, V)
    h_view = h_big.detach().requires_grad_()
    ours = sequence_logprobs(h_view, w_t, labels.int())
    ours.sum().backward()
    truth, plain = (evaluate(reference.sequence_logprobs, hidden, weight, bias, labels, torch.ones(2), dtype,
                             use_bias=False) for dtype in (torch.float64, torch.float32))
    assert_oracle_close(ours, plain[0], truth[0], what="value")
    assert_oracle_close(h_view.grad, plain[1], truth[1], what="d_hidden")


def test_sequence_without_scored_token(backend):
    hidden, weight, bias, labels = make_inputs(2, 6, 16, 50, seed=19)
    labels[1] = IGNORE
    with pytest.raises(ValueError, match="sequence"):
        sequence_logprobs(hidden.float(), weight.float(), labels)
    total = sequence_logprobs(hidden.float(), weight.float(), labels, reduction="sum")
    assert total[1].item() == 0.0
    labels[:] = IGNORE
    none = sequence_logprobs(hidden.float(), weight.float(), labels, reduction="none")
    assert none.shape == (2, 5) and not none.any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_nan_input_raises_unless_unchecked(backend):
    hidden, weight, bias, labels = make_inputs(2, 6, 16, 50, seed=23)
    hidden = hidden.float()
    hidden[0, 0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="sequence_logprobs"):
        sequence_logprobs(hidden, weight.float(), labels)
    assert torch.isnan(sequence_logprobs(hidden, weight.float(), labels, check_finite=False)[0])


def _bad_inputs():
    h, w, b, lab = make_inputs(2, 6, 16, 50, dtype=torch.float32, seed=29)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    ph, pl = h.reshape(12, 16), lab.reshape(12)
    bad_label = lab.clone()
    bad_label[0, 3] = 50
    negative = lab.clone()
    negative[1, 2] = -1
    return [
        ("hidden", TypeError, lambda: sequence_logprobs(h.numpy(), w, lab)),
        ("hidden", ValueError, lambda: sequence_logprobs(ph, w, lab)),
        ("hidden", TypeError, lambda: sequence_logprobs(h.long(), w, lab)),
        ("weight dtype", TypeError, lambda: sequence_logprobs(h, w.double(), lab)),
        ("weight must have shape", ValueError, lambda: sequence_logprobs(h, w[:, :15], lab)),
        ("labels", TypeError, lambda: sequence_logprobs(h, w, lab.float())),
        ("labels must have shape", ValueError, lambda: sequence_logprobs(h, w, lab[:, :5])),
        ("labels must lie", ValueError, lambda: sequence_logprobs(h, w, bad_label)),
        ("labels must lie", ValueError, lambda: sequence_logprobs(h, w, negative)),
        ("bias must have shape", ValueError, lambda: sequence_logprobs(h, w, lab, bias=b[:49])),
        ("bias dtype", TypeError, lambda: sequence_logprobs(h, w, lab, bias=b.double())),
        ("reduction", ValueError, lambda: sequence_logprobs(h, w, lab, reduction="avg")),
        ("temperature", ValueError, lambda: sequence_logprobs(h, w, lab, temperature=0.0)),
        ("temperature", ValueError, lambda: sequence_logprobs(h, w, lab, temperature=-1.0)),
        ("softcap", ValueError, lambda: sequence_logprobs(h, w, lab, softcap=0.0)),
        ("softcap", TypeError, lambda: sequence_logprobs(h, w, lab, softcap="30")),
        ("ignore_index", TypeError, lambda: sequence_logprobs(h, w, lab, ignore_index=-100.0)),
        ("cu_seqlens", TypeError, lambda: sequence_logprobs(ph, w, pl, cu_seqlens=cu.float())),
        ("cu_seqlens must start at 0", ValueError,
         lambda: sequence_logprobs(ph, w, pl, cu_seqlens=torch.tensor([1, 5, 12]))),
        ("end at N", ValueError, lambda: sequence_logprobs(ph, w, pl, cu_seqlens=torch.tensor([0, 5, 11]))),
        ("non-decreasing", ValueError, lambda: sequence_logprobs(ph, w, pl, cu_seqlens=torch.tensor([0, 7, 5, 12]))),
        ("cu_seqlens must hold", ValueError, lambda: sequence_logprobs(ph, w, pl, cu_seqlens=torch.tensor([0]))),
        ("hidden", ValueError, lambda: sequence_logprobs(h, w, lab, cu_seqlens=cu)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_raises(backend, case):
    match, error, call = _bad_inputs()[case]
    with pytest.raises(error, match=match):
        call()


def test_gpu_check_script_dry_run(backend):
    """benchmarks/gpu_check.py: its checks run end to end at tiny shapes on the CPU (the GPU run
    itself is not testable here)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--cpu-dry-run"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASS") >= 20 and "FAIL" not in done.stdout


def test_gpu_check_script_stops_at_its_hard_limit():
    """Whatever it is doing (here: still importing), the run ends at --hard-limit-s: status 1,
    "Timeout" and the stacks on stderr, no check run."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--cpu-dry-run", "--hard-limit-s", "0.3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("Timeout") and "PASS" not in done.stdout


def banned_bias_inputs(V, banned, seed):
    """make_inputs with bias -inf on the ``banned`` slices of the vocabulary and no label there."""
    hidden, weight, bias, labels = make_inputs(2, 13, 40, V, seed=seed)
    allowed = torch.ones(V, dtype=torch.bool)
    for block in banned:
        allowed[block] = False
        bias[block] = -math.inf
    allowed_ids = allowed.nonzero().squeeze(1)
    pick = torch.randint(0, allowed_ids.numel(), labels.shape, generator=torch.Generator().manual_seed(seed))
    remapped = allowed_ids[pick]
    labels = torch.where(labels == IGNORE, labels, remapped)
    return hidden, weight, bias, labels


# The interpreter's vocabulary tile is 128 wide and V=300 is split in two: [0, 256) and [256, 300).
@pytest.mark.parametrize("banned", [
    (slice(0, 128), slice(150, 170)),   # a whole first tile of a split, then part of the next tile
    (slice(40, 60), slice(256, 300)),   # a whole split
], ids=["first_tile", "whole_split"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_neg_inf_bias_bans_tokens(backend, banned, softcap):
    """A -inf bias (banned tokens) leaves the other tokens' log-probs and all gradients exact."""
    inputs = banned_bias_inputs(300, banned, seed=31)
    check_fp32(inputs, softcap=softcap, temperature=0.8, reduction="none")
    check_fp32(inputs, softcap=softcap)


def test_fp64_input_is_computed_in_fp64(backend):
    """The kernels' dots are fp32 at best: fp64 input takes the torch path on every backend."""
    hidden, weight, bias, labels = make_inputs(2, 9, 40, 300, seed=37)
    kw = dict(softcap=4.0, temperature=0.7)
    upstream = upstream_for(2)
    ref = evaluate(reference.sequence_logprobs, hidden, weight, bias, labels, upstream, torch.float64, **kw)
    ours = evaluate(sequence_logprobs, hidden, weight, bias, labels, upstream, torch.float64, **kw)
    assert sequence_logprobs(hidden, weight, labels).dtype == torch.float64
    for name, a, r in zip(("value", "d_hidden", "d_weight", "d_bias"), ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12 * r.abs().max().item(), msg=lambda m: f"{name}: {m}")  # noqa: B023


def fp16_ulp(x):
    """Spacing of fp16 numbers at |x| (2^-24 among the subnormals)."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=2.0**-14)))
    return 2.0 ** (exponent - 10)


def test_fp16_small_upstream_gradients_not_flushed(backend):
    """Per-token upstream gradients ~1e-5 (SAMI's MI loss): g * (onehot - p) flushes to zero
    in an fp16 matmul operand, so g must be applied to the fp32 products. The fp16 gradients
    are then the exact ones up to their own rounding (within one fp16 ulp), far better than
    torch in fp16; the flushed version is ~3.5x further from fp64 than the rounding."""
    dtype = torch.float16
    hidden, weight, bias, labels = make_inputs(3, 29, 75, 517, seed=11)
    # Inputs exactly representable in fp16, so fp64 gives the gradients of the same numbers.
    hidden, weight, bias = (t.to(dtype).double() for t in (hidden, weight, bias))
    kw = dict(softcap=5.0, temperature=0.7, reduction="sum")
    upstream = upstream_for(3) * 1e-5
    exact = evaluate(reference.sequence_logprobs, hidden, weight, bias, labels, upstream, torch.float64, **kw)
    torch_same = evaluate(reference.sequence_logprobs, hidden, weight, bias, labels, upstream, dtype, **kw)
    ours = evaluate(sequence_logprobs, hidden, weight, bias, labels, upstream, dtype, **kw)
    for name, a, t, r in list(zip(("value", "d_hidden", "d_weight", "d_bias"), ours, torch_same, exact))[1:]:
        assert r.abs().max() < 1e-4, "setup: the gradients should lie where fp16 is subnormal or nearly"
        worst = ((a - r).abs() / fp16_ulp(r)).max().item()
        assert worst <= 1.0, f"{name}: {worst:.3g} fp16 ulps from fp64"
        assert (a - r).norm() < 0.5 * (t - r).norm(), f"{name}: not better than torch in fp16"


def test_backward_autotune_hooks_restore_the_accumulated_gradients():
    """Autotuning reruns the accumulating backward kernel on the live buffers, where d_rows
    already holds earlier vocabulary chunks: every trial run is undone (gradients that are not
    computed, None, are skipped), and the call before the final launch changes nothing."""
    from sami_fast.kernels.linear_logprobs import _linear_logprobs_backward_kernel_tuned as kernel

    accumulated = dict(d_rows_ptr=torch.randn(3, 2), d_weight_ptr=torch.randn(5, 2), d_bias_ptr=None)
    buffers = {name: None if t is None else t.clone() for name, t in accumulated.items()}
    for _ in range(2):  # two trial runs
        kernel.pre_hook(buffers)
        buffers["d_rows_ptr"] += 1.0
        buffers["d_weight_ptr"] *= 3.0
        kernel.post_hook(buffers, exception=None)
        for name in ("d_rows_ptr", "d_weight_ptr"):
            torch.testing.assert_close(buffers[name], accumulated[name], rtol=0, atol=0)
    kernel.pre_hook(buffers, reset_only=True)
    for name in ("d_rows_ptr", "d_weight_ptr"):
        torch.testing.assert_close(buffers[name], accumulated[name], rtol=0, atol=0)


def test_numpy_scalars_are_accepted_for_softcap_and_temperature(backend):
    import numpy as np

    torch.manual_seed(3)
    hidden, weight = torch.randn(2, 5, 7), torch.randn(11, 7)
    labels = torch.randint(0, 11, (2, 5))
    truth, plain = (
        reference.sequence_logprobs(hidden.to(dtype), weight.to(dtype), labels, softcap=3.0, temperature=0.5)
        for dtype in (torch.float64, torch.float32)
    )
    got = sequence_logprobs(hidden, weight, labels, softcap=np.float32(3.0), temperature=np.float32(0.5))
    assert_oracle_close(got, plain, truth)


def test_vocab_chunk_keeps_the_fp32_accumulator_small_and_the_gpu_busy():
    """Columns per backward launch on a 132-SM GPU: ~32 MiB of fp32 d_weight at many rows;
    for few rows wider, towards four whole waves of 128 x 128 tiles, but at most 4x (128 MiB);
    whole 128-column tiles, never past V."""
    chunk = linear_logprobs._vocab_chunk
    assert chunk(16384, 128256, 4096, 132) == 2048  # 2**23 fp32 values / 4096
    assert chunk(4096, 128256, 4096, 132) == 2048  # 32 row tiles x 16 = 512 tiles <= 4 waves of 132
    assert chunk(2048, 128256, 4096, 132) == 4224  # 16 row tiles x 33 = 528 tiles = exactly 4 waves
    assert chunk(512, 128256, 4096, 132) == 8192  # would want 132 column tiles: capped at 4 x 16
    assert chunk(128, 128256, 4096, 132) == 8192
    assert chunk(16384, 262144, 8192, 132) == 1024
    assert chunk(4096, 49152, 576, 132) == 14464
    assert chunk(10, 1000, 64, 132) == 1000


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_backward_launcher_gives_the_same_gradients_for_any_vocabulary_chunking(dtype):
    """The backward walks the vocabulary in launches; d_rows adds up over them in fp32 and each
    chunk's d_weight (fp32 scratch, or the fp32 gradient itself) lands in its slice. Chunks of
    one block and a ragged last chunk are as close to fp64 as one launch over the whole vocabulary."""
    hidden, weight, bias, labels = make_inputs(1, 150, 45, 1001, ignored=0.0, seed=23)
    hidden, weight, bias = hidden[0].to(dtype), weight.to(dtype), bias.to(dtype)
    row_index = torch.randperm(150, generator=torch.Generator().manual_seed(2))[:130]
    targets = labels[0].long()[:130]
    grad = upstream_for(130, seed=4).float()
    _, lse = forward_launch(hidden, weight, row_index, targets, bias, 3.0, 0.8)
    results = {
        chunk: backward_launch(hidden, weight, row_index, targets, lse, grad, bias, 3.0, 0.8, need_bias=True,
                               vocab_chunk=chunk)
        for chunk in (128, 384, 1001)
    }
    whole = results[1001]
    assert [t.dtype for t in whole] == [torch.float32, dtype, torch.float32]
    assert all(t.abs().sum() > 0 for t in whole)
    truth = kernel_backward_truth(hidden, weight, row_index, targets, grad, bias, 3.0, 0.8)
    for chunk in (128, 384):
        for name, a, b, t in zip(("d_rows", "d_weight", "d_bias"), results[chunk], whole, truth):
            assert_oracle_close(a, b, t, what=f"{name}, chunks of {chunk}")


def kernel_backward_truth(hidden, weight, row_index, targets, grad, bias, softcap, temperature):
    """fp64 (d_rows, d_weight, d_bias) of ``sum(grad * log p(target))`` over the rows ``hidden[row_index]``,
    as the backward launcher returns them."""
    leaves = [t.double().requires_grad_() for t in (hidden[row_index], weight, bias)]
    out = reference.token_logprobs(*leaves[:2], targets, IGNORE, leaves[2], softcap, temperature)
    return torch.autograd.grad((out * grad.double()).sum(), leaves)


_FAR_APART_ROWS = """
import torch
from sami_fast.kernels import linear_logprobs as ll
from sami_fast.sequence_logprobs import INTERPRETER_BACKWARD, INTERPRETER_FORWARD

gen = torch.Generator().manual_seed(5)
rows = torch.randn(3, 24, generator=gen).bfloat16()
weight = torch.randn(3, 24, generator=gen).bfloat16()
targets, grad, index = torch.tensor([2, 0, 1]), torch.randn(3, generator=gen), torch.tensor([2, 0, 1])
# W's rows 2**30 + 64 elements apart in one mostly untouched (virtual) allocation: the
# third starts past 2**31 elements.
stride = 2**30 + 64
far_weight = torch.empty(2 * stride + 24, dtype=torch.bfloat16).as_strided((3, 24), (stride, 1))
far_weight.copy_(weight)
expected = ll.linear_logprobs_kernel(rows, weight, index, targets, **INTERPRETER_FORWARD)
got = ll.linear_logprobs_kernel(rows, far_weight, index, targets, **INTERPRETER_FORWARD)
expected_grads = ll.linear_logprobs_backward_kernel(rows, weight, index, targets, expected[1], grad,
                                                    **INTERPRETER_BACKWARD)
got_grads = ll.linear_logprobs_backward_kernel(rows, far_weight, index, targets, got[1], grad,
                                               **INTERPRETER_BACKWARD)
for a, b in zip((*got, *got_grads[:2]), (*expected, *expected_grads[:2])):
    torch.testing.assert_close(a, b, rtol=0, atol=0)
print("ok")
"""


def test_weight_offsets_past_2_to_the_31_elements_use_64_bit_arithmetic():
    """Rows of W more than 2**31 elements apart (V * D beyond 2**31 in a real head): 32-bit
    offsets would wrap (the interpreter then reads the wrong memory or crashes), so the
    forward and backward must give exactly what they give on the same rows packed densely.
    (Rows of hidden are addressed through the int64 row index, 64-bit by construction.)
    A subprocess, so that a crash is a failure rather than the end of the test run."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _FAR_APART_ROWS], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_scatter_rows_writes_every_gathered_row_in_steps(monkeypatch):
    """The Triton backward's fp32 row gradients go into hidden's shape a few rows at a time
    (no full low-precision copy); unscored rows stay zero."""
    module = dispatch
    monkeypatch.setattr(module, "_SCATTER_ELEMENTS", 3 * 7)  # 3 rows per step, the last step ragged
    gen = torch.Generator().manual_seed(9)
    rows = torch.randn(10, 7, generator=gen)
    index = torch.randperm(16, generator=gen)[:10]
    out = module._scatter_rows(rows, index, torch.zeros(16, 7, dtype=torch.bfloat16))
    expected = torch.zeros(16, 7, dtype=torch.bfloat16).index_copy_(0, index, rows.bfloat16())
    assert torch.equal(out, expected)


def test_triton_backward_keeps_fp32_d_weight_to_one_vocabulary_chunk(monkeypatch, allocations):
    """For a bf16 head the fp32 accumulators are one vocabulary chunk of d_weight and the
    gathered rows' d_rows: nothing of V x D in fp32 (3 GB at Llama 3's head), and the
    gradient lands in the weight's dtype."""
    monkeypatch.setenv("SAMI_FAST_BACKEND", "triton")
    hidden, weight, bias, labels = make_inputs(2, 60, 45, 1001, seed=29)
    hidden, weight = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    out = sequence_logprobs(hidden, weight, labels)
    with allocations() as log:
        out.sum().backward()
    largest_fp32 = max(log.numels(torch.float32))
    assert 256 * 45 <= largest_fp32 < 1001 * 45 // 2, log.made
    assert weight.grad.dtype == torch.bfloat16 and weight.grad.abs().sum() > 0


def test_autotuning_every_chunk_keeps_the_accumulated_gradients(monkeypatch):
    """The real autotuner, with two configurations and a key that changes at every
    vocabulary chunk, so that trials run while d_rows already holds earlier chunks: the
    gradients equal those of the untuned launches (the interpreter cannot time, so its
    benchmark runs each trial a few times and calls the first fastest)."""
    from triton.runtime.autotuner import Autotuner

    trials = []

    def bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        trials.append(len(trials))
        return [float(len(trials) % 2)] * 3

    kernel = linear_logprobs._linear_logprobs_backward_kernel_tuned
    configs = [triton_config(64, 128, 64, 8), triton_config(32, 64, 32, 2)]
    tuned = Autotuner(kernel.fn, kernel.arg_names, configs, ["D", "DOT_FP32", "vocab_start"], None, None,
                      pre_hook=kernel.pre_hook, post_hook=kernel.post_hook, do_bench=bench)
    gen = torch.Generator().manual_seed(12)
    hidden, weight, bias = torch.randn(90, 48, generator=gen), torch.randn(700, 48, generator=gen), torch.randn(700)
    hidden, weight, bias = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    row_index, targets = torch.randperm(90, generator=gen)[:70], torch.randint(0, 700, (70,), generator=gen)
    grad = torch.randn(70, generator=gen)
    _, lse = forward_launch(hidden, weight, row_index, targets, bias, 3.0, 0.8)
    args = (hidden, weight, row_index, targets, lse, grad, bias, 3.0, 0.8)
    untuned = backward_launch(*args, need_bias=True, vocab_chunk=256)
    monkeypatch.setattr(linear_logprobs, "_linear_logprobs_backward_kernel_tuned", tuned)
    got = backward_launch(*args, need_bias=True, vocab_chunk=256, config=None)  # autotuned
    assert len(trials) == 2 * 3  # two configurations at each of the three chunks
    # Another tile shape adds in another order: as close to fp64 as the untuned launches.
    # A trial left in the buffers would double a chunk's contribution.
    truth = kernel_backward_truth(hidden, weight, row_index, targets, grad, bias, 3.0, 0.8)
    for name, a, b, t in zip(("d_rows", "d_weight", "d_bias"), got, untuned, truth):
        assert_oracle_close(a, b, t, what=name)


def triton_config(block_m, block_n, block_k, group_m):
    import triton

    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m})


@pytest.mark.parametrize("layout", ["most_scored", "few_scored", "sequence_first"])
def test_triton_path_keeps_hidden_or_only_the_scored_rows(monkeypatch, layout):
    """What the Triton path keeps for backward: hidden itself when most rows are scored
    (the kernels gather from it), else only a copy of the scored rows, so that hidden can
    be freed: at SAMI's 80% prompt, or when hidden (sequence-first) cannot be viewed as rows."""
    monkeypatch.setenv("SAMI_FAST_BACKEND", "triton")
    B, T, D, V = 3, 20, 16, 50
    hidden, weight, _, labels = make_inputs(B, T, D, V, ignored=0.0, seed=31)
    if layout == "few_scored":
        labels[:, : int(0.8 * T)] = IGNORE
    hidden = hidden.float()
    if layout == "sequence_first":
        hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    hidden.requires_grad_()
    head = weight.float()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = sequence_logprobs(hidden, head, labels)
    scored = int((labels[:, 1:] != IGNORE).sum())
    row_sets = [t for t in saved if t.dim() == 2 and t.shape[1] == D and t.untyped_storage().data_ptr()
                != head.untyped_storage().data_ptr()]
    keeps_hidden = any(t.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr() for t in row_sets)
    assert keeps_hidden == (layout == "most_scored")
    if layout != "most_scored":
        assert [tuple(t.shape) for t in row_sets] == [(scored, D)]
    out.sum().backward()
    truth, plain = (evaluate(reference.sequence_logprobs, hidden, head, torch.zeros(V), labels, torch.ones(B), dtype,
                             use_bias=False) for dtype in (torch.float64, torch.float32))
    assert_oracle_close(hidden.grad, plain[1], truth[1], what="d_hidden")


def test_launchers_reject_strided_row_vectors_and_bad_chunks():
    hidden, weight = torch.randn(6, 8), torch.randn(30, 8)
    row_index, targets = torch.arange(6), torch.randint(0, 30, (6,))
    with pytest.raises(ValueError, match="contiguous"):
        forward_launch(hidden, weight, torch.arange(12)[::2], targets)
    _, lse = forward_launch(hidden, weight, row_index, targets)
    with pytest.raises(ValueError, match="vocab_chunk"):
        backward_launch(hidden, weight, row_index, targets, lse, torch.ones(6), vocab_chunk=0)


def test_fp32_dots_follow_torchs_tf32_setting(monkeypatch):
    """fp32 inputs run exact (ieee) dots unless torch allows TF32 for fp32 matmuls, through
    the legacy ``set_float32_matmul_precision("high")`` or torch >= 2.9's ``fp32_precision``
    (after which the legacy getters raise), as cuBLAS does; bf16/fp16 never ask. The TF32
    kernels run here too (the interpreter computes them exactly); that they lower to
    Hopper's TF32 tensor cores is checked by tests/test_hopper_compile.py."""
    monkeypatch.setenv("SAMI_FAST_BACKEND", "triton")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not linear_logprobs.tf32_dots(torch.float32)
        torch.set_float32_matmul_precision("high")
        assert linear_logprobs.tf32_dots(torch.float32)
        assert not linear_logprobs.tf32_dots(torch.bfloat16) and not linear_logprobs.tf32_dots(torch.float16)
        check_fp32(make_inputs(2, 9, 20, 300, seed=37), softcap=4.0)
    finally:
        torch.set_float32_matmul_precision(previous)
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # last: the legacy getters raise once it was set
        before = matmul.fp32_precision
        try:
            matmul.fp32_precision = "tf32"
            assert linear_logprobs.tf32_dots(torch.float32)
            check_fp32(make_inputs(2, 9, 20, 300, seed=38))
            matmul.fp32_precision = "ieee"
            assert not linear_logprobs.tf32_dots(torch.float32)
        finally:
            matmul.fp32_precision = before


def test_autocast_runs_the_head_in_the_autocast_dtype(backend):
    """Under torch.autocast (mixed-precision training with fp32 weights) the head runs in
    bf16 like the nn.Linear it stands for: as close to fp64 as torch's own bf16 head, with
    fp32 gradients for the fp32 leaves; outside autocast the same call stays fp32."""
    hidden, weight, bias, labels = make_inputs(3, 29, 75, 517, seed=41)
    upstream = upstream_for(3)
    exact = evaluate(reference.sequence_logprobs, hidden, weight, bias, labels, upstream, torch.float64)
    torch_bf16 = evaluate(reference.sequence_logprobs, hidden, weight, bias, labels, upstream, torch.bfloat16)
    leaves = [t.float().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sequence_logprobs(leaves[0], leaves[1], labels, bias=leaves[2])
    (out.double() * upstream).sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in leaves)
    ours = [out.detach().double()] + [t.grad.double() for t in leaves]
    for name, a, t, e in zip(NAMES, ours, torch_bf16, exact):
        assert_no_worse_per_entry(a, t, e, slack=2 * torch.finfo(torch.bfloat16).eps * max(1.0, e.abs().max().item()),
                                  what=name)
    # It really ran in bf16: far from the fp32 answer, which plain fp32 reproduces.
    fp32 = evaluate(sequence_logprobs, hidden, weight, bias, labels, upstream, torch.float32)
    assert (ours[0] - exact[0]).abs().max() > 10 * (fp32[0] - exact[0]).abs().max()


def test_backward_uses_the_forwards_tf32_choice(monkeypatch):
    """The backward recomputes logits against the forward's saved LSE: it must use the
    forward's dot precision even if torch's TF32 setting changed in between."""
    monkeypatch.setenv("SAMI_FAST_BACKEND", "triton")
    hidden, weight, bias, labels = make_inputs(2, 9, 20, 300, seed=39)
    requested = []
    launcher = dispatch.linear_logprobs_backward_kernel
    monkeypatch.setattr(dispatch, "linear_logprobs_backward_kernel",
                        lambda *args, **kwargs: requested.append(kwargs["tf32"]) or launcher(*args, **kwargs))
    previous = torch.get_float32_matmul_precision()
    try:
        for forward, backward in (("high", "highest"), ("highest", "high")):
            h = hidden.float().requires_grad_()
            torch.set_float32_matmul_precision(forward)
            out = sequence_logprobs(h, weight.float(), labels)
            torch.set_float32_matmul_precision(backward)
            out.sum().backward()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert requested == [True, False]
