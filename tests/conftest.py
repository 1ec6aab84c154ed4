"""Test setup: Triton runs in its interpreter so the kernels execute on CPU tensors.

TRITON_INTERPRET must be set before any module decorated with @triton.jit is
imported, because @triton.jit chooses the interpreter at decoration time.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test once per backend through SAMI_FAST_BACKEND."""
    monkeypatch.setenv("SAMI_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
