"""The one comparison rule of the suite: no worse than the plain computation in the same dtype.

Ground truth is computed in float64 (``sami_fast.reference`` in fp64, or the same
model cast with ``.double()``). A result ``ours`` in dtype d passes when, per
tensor,

    max |ours - truth| <= k * max |plain - truth| + tiny

where ``plain`` is the straightforward computation in the same dtype d (the
original composition, the full-sequence forward, ...). The right-hand side is the
rounding noise of dtype d measured in the test itself, so the bound holds on any
CPU or BLAS; ``k`` says how much worse than plain we accept (a stated small
factor), ``tiny`` is one unit in the last place of the largest true value, so a
plain result that happens to be exact does not make the bound zero. A real bug
(a wrong position, a scored prompt token, a missing softcap) moves results by
orders of magnitude more than dtype rounding, so it fails.
"""

import torch

K_DEFAULT = 4.0


def ulp_floor(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place of ``dtype`` at the largest magnitude of ``truth``."""
    scale = float(truth.detach().abs().max()) if truth.numel() else 0.0
    return torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny)


def oracle_excess(ours, plain, truth, *, k: float = K_DEFAULT, tiny: float | None = None) -> tuple:
    """(error of ours, allowed error): the two sides of the rule, as floats."""
    if ours.shape != truth.shape or plain.shape != truth.shape:
        raise ValueError(f"shapes differ: ours {tuple(ours.shape)}, plain {tuple(plain.shape)}, truth {tuple(truth.shape)}")
    if tiny is None:
        tiny = ulp_floor(truth, ours.dtype)
    ours, plain, truth = (t.detach().double() for t in (ours, plain, truth))
    error = float((ours - truth).abs().max()) if ours.numel() else 0.0
    allowed = k * (float((plain - truth).abs().max()) if plain.numel() else 0.0) + tiny
    return error, allowed


def assert_oracle_close(ours, plain, truth, *, k: float = K_DEFAULT, tiny: float | None = None,
                        dtype: torch.dtype | None = None, what: str = "result") -> None:
    """``ours`` is within ``k`` times the error of ``plain`` (same dtype) from the fp64 ``truth``.

    ``dtype``: the dtype whose last place makes ``tiny`` (default: ``ours``' dtype).
    """
    if not torch.isfinite(ours.detach()).all():
        raise AssertionError(f"{what}: not finite")
    if tiny is None:
        tiny = ulp_floor(truth, dtype or ours.dtype)
    error, allowed = oracle_excess(ours, plain, truth, k=k, tiny=tiny)
    assert error <= allowed, (
        f"{what}: max error {error:.3e} vs fp64 exceeds {k:g} x the plain computation's {(allowed - tiny) / k:.3e} "
        f"+ {tiny:.1e}"
    )


def assert_grads_oracle_close(ours: dict, plain: dict, truth: dict, *, k: float = K_DEFAULT, what: str = "") -> None:
    """The rule per parameter gradient (dicts name -> tensor); every reference gradient must be non-zero."""
    assert ours.keys() == truth.keys() == plain.keys(), "the gradients cover different parameters"
    for name, true in truth.items():
        assert ours[name] is not None, f"no gradient reached {name}"
        assert true.abs().max() > 0, f"reference gradient of {name} is zero: the check would be vacuous"
        assert_oracle_close(ours[name], plain[name], true, k=k, what=f"{what}grad {name}")
