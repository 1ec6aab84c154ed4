import pytest
import torch

from sami_fast.backend import requested_backend, use_triton


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("TORCH", "torch"), (" triton ", "triton"), ("", "auto")])
def test_requested_backend_reads_environment(monkeypatch, value, expected):
    monkeypatch.setenv("SAMI_FAST_BACKEND", value)
    assert requested_backend() == expected


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SAMI_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="SAMI_FAST_BACKEND"):
        use_triton(torch.zeros(1))


def test_auto_sends_cpu_tensors_to_torch(monkeypatch):
    monkeypatch.setenv("SAMI_FAST_BACKEND", "auto")
    assert not use_triton(torch.zeros(1))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("SAMI_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        use_triton(torch.zeros(1))


def test_torch_backend_never_uses_triton(monkeypatch):
    monkeypatch.setenv("SAMI_FAST_BACKEND", "torch")
    assert not use_triton(torch.zeros(1))
