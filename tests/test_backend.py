import pytest
import torch

from oracle import assert_oracle_close
from sami_fast.backend import requested_backend, resolve


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("TORCH", "torch"), (" triton ", "triton"), ("", "auto")])
def test_requested_backend_reads_environment(monkeypatch, value, expected):
    monkeypatch.setenv("SAMI_FAST_BACKEND", value)
    assert requested_backend() == expected


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SAMI_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="SAMI_FAST_BACKEND"):
        resolve(None, torch.zeros(1))
    with pytest.raises(ValueError, match="backend"):
        resolve("cuda-magic", torch.zeros(1))


def test_auto_sends_cpu_tensors_to_torch(monkeypatch):
    monkeypatch.setenv("SAMI_FAST_BACKEND", "auto")
    assert resolve(None, torch.zeros(1)) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("SAMI_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve(None, torch.zeros(1)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve(None, torch.zeros(1))


def test_torch_backend_never_uses_triton(monkeypatch):
    monkeypatch.setenv("SAMI_FAST_BACKEND", "torch")
    assert resolve(None, torch.zeros(1)) == "torch"


def test_the_argument_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("SAMI_FAST_BACKEND", "torch")
    assert resolve("triton", torch.zeros(1)) == "triton"
    monkeypatch.setenv("SAMI_FAST_BACKEND", "triton")
    assert resolve("torch", torch.zeros(1)) == "torch"
    assert resolve("auto", torch.zeros(1)) == "torch"


def test_float64_always_takes_the_torch_path():
    assert resolve("triton", torch.zeros(1, dtype=torch.float64)) == "torch"


def _public_ops():
    """Per op: (run(backend), the same op of ``sami_fast.reference`` on (inputs, dtype))."""
    from sami_fast import get_batch_logprobs, reference, sami_loss, sequence_logprobs

    scores, logits = torch.randn(3, 3), torch.randn(2, 3, 5)
    hidden, weight, labels = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randint(0, 5, (2, 3))
    return {
        "sami_loss": (lambda backend: sami_loss(scores, backend=backend),
                      lambda dtype: reference.sami_loss(scores.to(dtype))),
        "sequence_logprobs": (lambda backend: sequence_logprobs(hidden, weight, labels, backend=backend),
                              lambda dtype: reference.sequence_logprobs(hidden.to(dtype), weight.to(dtype), labels)),
        "get_batch_logprobs": (lambda backend: get_batch_logprobs(logits, labels, backend=backend),
                               lambda dtype: reference.get_batch_logprobs(logits.to(dtype), labels)),
    }


@pytest.mark.parametrize("op", ["sami_loss", "sequence_logprobs", "get_batch_logprobs"])
def test_every_op_takes_backend_per_call(op, monkeypatch):
    """Both backends per call, whatever the environment says; a bad value names ``backend``."""
    monkeypatch.setenv("SAMI_FAST_BACKEND", "cuda-magic")  # would raise if it were read
    run, plain = _public_ops()[op]
    for backend in ("triton", "torch", "auto"):
        assert_oracle_close(run(backend), plain(torch.float32), plain(torch.float64), what=f"{op} {backend}")
    with pytest.raises(ValueError, match="backend"):
        run("gpu")


def test_model_level_ops_take_backend_per_call(monkeypatch):
    """logprob_matrix and sami_backward pass backend= down to the fused head (and the loss):
    both backends give the full-sequence scores; a bad value names ``backend`` before any work."""
    from oracle import assert_matrix_oracle_close
    from sami_fast import logprob_matrix, sami_backward
    from tiny_lm import bpe_tokenizer, tiny_causal_lm

    monkeypatch.setenv("SAMI_FAST_BACKEND", "cuda-magic")  # would raise if it were read
    model = tiny_causal_lm(bpe_tokenizer())
    gen = torch.Generator().manual_seed(3)
    prompts = [[torch.randint(0, 300, (n,), generator=gen) for n in (4, 6)]]
    responses = [[torch.randint(0, 300, (n,), generator=gen) for n in (3, 2)]]
    for backend in ("triton", "torch"):
        with torch.no_grad():
            matrix = logprob_matrix(model, prompts, responses, backend=backend)
        assert_matrix_oracle_close(matrix, model, prompts, responses, what=f"matrix {backend}")
        loss, _ = sami_backward(model, prompts, responses, micro_batch_size=2, backend=backend)
        assert torch.isfinite(loss)
    for call in (lambda: logprob_matrix(model, prompts, responses, backend="gpu"),
                 lambda: sami_backward(model, prompts, responses, micro_batch_size=2, backend="gpu")):
        with pytest.raises(ValueError, match="backend"):
            call()
