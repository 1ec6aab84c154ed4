"""Input checks shared by the public functions: each error names the argument."""

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


def check_tensor(name: str, value, *, dims=None, dtypes=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() not in dims:
        expected = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have {expected} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {value.dtype}")


def check_float(name: str, value, *, dims=None) -> None:
    check_tensor(name, value, dims=dims, dtypes=FLOAT_DTYPES)


def check_no_nan(name: str, value: torch.Tensor) -> None:
    """Raise if ``value`` holds a NaN (costs one host synchronisation)."""
    if bool(torch.isnan(value).any()):
        raise ValueError(f"{name} contains NaN")


def check_finite_result(name: str, value: torch.Tensor) -> None:
    """Raise if a computed result is NaN or inf instead of passing it on silently."""
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"{name} is not finite (NaN or inf in the result)")


def check_positive(name: str, value, *, allow_none: bool = False) -> None:
    """A positive, finite number (or None when ``allow_none``): temperature, softcap."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be positive and finite, got {value}")


def check_positive_int(name: str, value, *, allow_none: bool = False, allow_zero: bool = False,
                       meaning: str = "") -> None:
    """A positive int (or 0 when ``allow_zero``), not a bool (or None when ``allow_none``):
    chunk sizes, counts, budgets.

    Raises a ValueError naming ``name`` (and ``meaning``, e.g. "pairs per chunk") otherwise.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        expected = ("a non-negative int" if allow_zero else "a positive int") + (" or None" if allow_none else "")
        expected += f" ({meaning})" if meaning else ""
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def scored_targets_mask(name: str, targets: torch.Tensor, vocab: int, ignore_index: int,
                        ignore_name: str = "ignore_index") -> torch.Tensor:
    """``targets != ignore_index``, after checking that every other target lies in [0, vocab) (one sync)."""
    scored = targets != ignore_index
    if bool((scored & ((targets < 0) | (targets >= vocab))).any()):
        raise ValueError(f"{name} must lie in [0, {vocab}) or equal {ignore_name}={ignore_index}")
    return scored


def check_every_sequence_scored(name: str, counts: torch.Tensor) -> None:
    """Raise if a sequence scores no token: its mean log-prob would be 0 / 0."""
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"{name} score no token in sequence(s) {empty}: their mean log-prob is undefined")
