"""Backend selection: which implementation a public function dispatches to.

Every public op takes ``backend=None | "auto" | "triton" | "torch"``; ``resolve`` applies
the rule once per call:

1. the call's ``backend=`` argument, when it is given and not None;
2. else the ``SAMI_FAST_BACKEND`` environment variable (read at every call);
3. ``auto`` (the default): Triton kernels for CUDA tensors, the memory-lean PyTorch
   path for everything else.

float64 inputs always take the PyTorch path (the kernels compute in fp32). ``triton``
on CPU tensors needs ``TRITON_INTERPRET=1`` (set before Triton is imported), which
the tests use.
"""

import os
from typing import Literal

import torch

BACKENDS = ("auto", "triton", "torch")

Backend = Literal["auto", "triton", "torch"]


def requested_backend() -> str:
    """The backend ``SAMI_FAST_BACKEND`` asks for ("auto" when unset or empty).

    Raises:
        ValueError: the variable names no backend.
    """
    name = os.environ.get("SAMI_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"SAMI_FAST_BACKEND={name!r} is not a backend; choose one of {', '.join(BACKENDS)}"
        )
    return name


def triton_interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted(*tensors: torch.Tensor) -> bool:
    """Whether Triton kernels launched on ``tensors`` run in the interpreter (CPU tensors
    under ``TRITON_INTERPRET=1``): their launchers then get interpreter-friendly options."""
    return triton_interpreted() and not all(t.is_cuda for t in tensors)


def check_backend(backend) -> None:
    """Raise a ValueError naming ``backend`` unless it is None or one of ``BACKENDS``."""
    if backend is not None and not (isinstance(backend, str) and backend in BACKENDS):
        raise ValueError(f"backend must be None or one of {', '.join(BACKENDS)}, got {backend!r}")


def resolve(backend: str | None, *tensors: torch.Tensor) -> str:
    """The implementation a call on ``tensors`` runs: "triton" or "torch".

    Args:
        backend: the call's ``backend=`` argument: None (ask ``SAMI_FAST_BACKEND``),
            "auto", "triton" or "torch".
        tensors: the call's input tensors; their device and dtype decide "auto".

    Returns:
        "triton" or "torch".

    Raises:
        ValueError: ``backend`` (or ``SAMI_FAST_BACKEND``) names no backend.
        RuntimeError: "triton" was asked for CPU tensors without ``TRITON_INTERPRET=1``.
    """
    check_backend(backend)
    name = requested_backend() if backend is None else backend
    if name == "torch" or any(t.dtype == torch.float64 for t in tensors):
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "auto":
        return "triton" if on_cuda else "torch"
    if not on_cuda and not triton_interpreted():
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
            "imported (or use backend='auto'/'torch')"
        )
    return "triton"
