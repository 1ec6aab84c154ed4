"""Benchmark: per-sequence mean log-probs from hidden states and the LM head, forward+backward.

Providers:

* ``naive``: the original composition, logits = hidden W^T -> log_softmax ->
  gather -> masked mean (``reference.get_batch_logprobs``), holding (rows, V) logits;
* ``sami_fast``: ``sami_fast.sequence_logprobs`` (Triton on CUDA, the chunked
  PyTorch path on CPU);
* ``sami_fast_torch`` (CUDA only): the same function forced onto its chunked
  PyTorch path (cuBLAS matmuls over vocabulary chunks), to compare the two
  backward strategies -- fused tiles with fp32 atomics vs materialised chunks;
* ``cut_cross_entropy`` / ``liger``: their fused linear cross-entropy with a
  per-token (reduction="none") output and a masked mean, only when importable
  (the ``[peers]`` extra). cut_cross_entropy runs with its defaults, as its users
  do: its backward skips vocabulary tiles whose softmax gradient is below its
  default ``filter_eps`` (an approximation) and accumulates the gradients in bf16;
  ``cut_cross_entropy_exact`` is the same call with ``filter_eps=None`` (no
  filter), the like-for-like comparison with sami_fast's exact backward.

Every provider gets a random per-sequence upstream gradient (as the MI loss
gives), so none can fold the backward into the forward as a scalar.
Shapes: CPU "full" is SmolLM2-135M's head (D=576, V=49152) over 4096 rows,
"small" the same head over 1024 rows; CUDA is bf16 D=4096, V=128256 (Llama 3)
over 4096 and 16384 rows. ``scored`` is the fraction of rows with a label (SAMI
prompts are ~80% of the tokens); ``flops`` counts the useful work,
8 * scored rows * D * V (2 forward, 6 backward: the recomputed logits,
d_hidden and d_weight), so TFLOP/s compare across providers.
"""

import torch

from sami_fast import reference
from sami_fast.bench import Case
from sami_fast.sequence_logprobs import sequence_logprobs

KERNEL = "sequence_logprobs"
IGNORE = -100


def _inputs(device, dtype, batch, seq_len, D, V, scored):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, seq_len, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(V, D, device=device, dtype=dtype, generator=gen) * D**-0.5).requires_grad_()
    labels = torch.randint(0, V, (batch, seq_len), device=device, generator=gen)
    # The prompt (the first 1 - scored of each sequence) is not scored, as in SAMI.
    labels[:, : int(round(seq_len * (1 - scored)))] = IGNORE
    upstream = torch.randn(batch, device=device, dtype=torch.float32, generator=gen)
    return hidden, weight, labels, upstream


def _masked_mean(per_token, labels):
    """Per-sequence mean of shifted per-token log-probs (B, T-1) over scored positions."""
    scored = labels[:, 1:] != IGNORE
    return (per_token * scored).sum(dim=1) / scored.sum(dim=1)


def _naive(hidden, weight, labels):
    return reference.get_batch_logprobs(hidden @ weight.t(), labels)


def _sami_fast(hidden, weight, labels):
    return sequence_logprobs(hidden, weight, labels, check_finite=False)


def _sami_fast_torch(hidden, weight, labels):
    return sequence_logprobs(hidden, weight, labels, check_finite=False, backend="torch")


def _cut_cross_entropy(hidden, weight, labels, **options):
    from cut_cross_entropy import linear_cross_entropy

    loss = linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], ignore_index=IGNORE, reduction="none",
                                **options)
    return _masked_mean(-loss.float().reshape(labels.shape[0], -1), labels)


def _cut_cross_entropy_exact(hidden, weight, labels):
    return _cut_cross_entropy(hidden, weight, labels, filter_eps=None)


def _liger(hidden, weight, labels):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    B, T, D = hidden.shape
    loss = liger_fused_linear_cross_entropy(
        hidden[:, :-1].reshape(-1, D), weight, labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="none",
    )
    return _masked_mean(-loss.float().reshape(B, T - 1), labels)


def _available(provider):
    modules = {"cut_cross_entropy": "cut_cross_entropy", "cut_cross_entropy_exact": "cut_cross_entropy",
               "liger": "liger_kernel"}
    if provider not in modules:
        return True
    try:
        __import__(modules[provider])
    except Exception:  # any import failure (missing package, no GPU build) means not available
        return False
    return True


PROVIDERS = {
    "naive": _naive, "sami_fast": _sami_fast, "sami_fast_torch": _sami_fast_torch,
    "cut_cross_entropy": _cut_cross_entropy, "cut_cross_entropy_exact": _cut_cross_entropy_exact, "liger": _liger,
}


def _case(provider, device, dtype, batch, seq_len, D, V, scored):
    forward = PROVIDERS[provider]

    def setup():
        hidden, weight, labels, upstream = _inputs(device, dtype, batch, seq_len, D, V, scored)

        def run():
            hidden.grad = weight.grad = None
            (forward(hidden, weight, labels).float() * upstream).sum().backward()
            return hidden.grad

        return run

    rows = batch * (seq_len - 1)
    x = f"rows={rows} D={D} V={V} scored={scored:.0%}"
    # Labels 1 .. ignored-1 are prompt (see _inputs); targets are labels[:, 1:].
    scored_rows = batch * (seq_len - max(int(round(seq_len * (1 - scored))), 1))
    flops = 8.0 * scored_rows * D * V
    return Case(KERNEL, provider, x, setup, flops=flops, notes={"dtype": str(dtype).replace("torch.", "")})


def cases(device: str, size: str) -> list[Case]:
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    if device == "cuda":
        dtype, D, V = torch.bfloat16, 4096, 128256
        shapes = [(4, 1025, 1.0), (16, 1025, 1.0), (16, 1025, 0.2)] if size == "full" else [(4, 1025, 1.0)]
    else:
        dtype, D, V = torch.float32, 576, 49152
        shapes = [(4, 1025, 0.2), (4, 1025, 1.0)] if size == "full" else [(4, 257, 0.2)]
    return [
        _case(provider, device, dtype, batch, seq_len, D, V, scored)
        for batch, seq_len, scored in shapes
        for provider in PROVIDERS
        if _available(provider) and (provider != "sami_fast_torch" or device == "cuda")
    ]
