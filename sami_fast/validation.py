"""Input checks shared by the public functions: each error names the argument."""

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
