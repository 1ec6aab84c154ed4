"""Backend selection: which implementation a public function dispatches to.

``SAMI_FAST_BACKEND`` (read at every call, so tests and users can switch it):

* ``auto`` (default): Triton kernels for CUDA tensors, the memory-lean PyTorch
  path for everything else;
* ``triton``: always the kernels; on CPU tensors this needs
  ``TRITON_INTERPRET=1`` (set before Triton is imported), which the tests use;
* ``torch``: always the PyTorch path.
"""

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def requested_backend() -> str:
    name = os.environ.get("SAMI_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"SAMI_FAST_BACKEND={name!r} is not a backend; choose one of {', '.join(BACKENDS)}"
        )
    return name


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the call on ``tensors`` should run the Triton kernels."""
    name = requested_backend()
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "torch":
        return False
    if name == "auto":
        return on_cuda
    if not on_cuda and not triton_interpreted():
        raise RuntimeError(
            "SAMI_FAST_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 "
            "set before triton is imported (or use SAMI_FAST_BACKEND=auto/torch)"
        )
    return True
