"""Benchmark: per-sequence mean log-probs from logits a model already produced, forward+backward.

Providers:

* ``original``: the original SAMI trainer's ``get_batch_logprobs``
  (``reference.get_batch_logprobs``: cross_entropy over the shifted logits, masked mean);
* ``sami_fast``: ``sami_fast.get_batch_logprobs`` (the streaming Triton kernel on CUDA,
  the chunked PyTorch path on CPU), with ``check_finite=False`` like the original.

Every provider gets a random per-sequence upstream gradient, as the MI loss gives.
Shapes: CPU fp32 with SmolLM2-135M's vocabulary (V=49152), "small" 4x257 positions,
"full" 4x1025; CUDA bf16 with Llama 3's (V=128256), 4x1025 and 16x1025. ``scored``
is the fraction of positions with a label (SAMI prompts are ~80% of the tokens).
"""

import torch

from sami_fast import reference
from sami_fast.batch_logprobs import get_batch_logprobs
from sami_fast.bench import Case

KERNEL = "get_batch_logprobs"
IGNORE = -100

PROVIDERS = {
    "original": reference.get_batch_logprobs,
    "sami_fast": lambda logits, labels: get_batch_logprobs(logits, labels, check_finite=False),
}


def _case(provider, device, dtype, batch, seq_len, V, scored):
    forward = PROVIDERS[provider]

    def setup():
        gen = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(batch, seq_len, V, device=device, dtype=dtype, generator=gen).requires_grad_()
        labels = torch.randint(0, V, (batch, seq_len), device=device, generator=gen)
        # The prompt (the first 1 - scored of each sequence) is not scored, as in SAMI.
        labels[:, : int(round(seq_len * (1 - scored)))] = IGNORE
        upstream = torch.randn(batch, device=device, dtype=torch.float32, generator=gen)

        def run():
            logits.grad = None
            (forward(logits, labels).float() * upstream).sum().backward()
            return logits.grad

        return run

    x = f"B={batch} T={seq_len} V={V} scored={scored:.0%}"
    return Case(KERNEL, provider, x, setup, notes={"dtype": str(dtype).replace("torch.", "")})


def cases(device: str, size: str) -> list[Case]:
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    if device == "cuda":
        dtype, V = torch.bfloat16, 128256
        shapes = [(4, 1025, 1.0), (16, 1025, 1.0), (16, 1025, 0.2)] if size == "full" else [(4, 1025, 1.0)]
    else:
        dtype, V = torch.float32, 49152
        shapes = [(4, 1025, 0.2), (4, 1025, 1.0)] if size == "full" else [(4, 257, 0.2), (4, 257, 1.0)]
    return [
        _case(provider, device, dtype, batch, seq_len, V, scored)
        for batch, seq_len, scored in shapes
        for provider in PROVIDERS
    ]
