"""sami_fast: fused Triton kernels and a shared-prefix trainer for SAMI."""

from sami_fast import reference
from sami_fast.backend import requested_backend

__all__ = ["reference", "requested_backend"]
__version__ = "0.1.0"
