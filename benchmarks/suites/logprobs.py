"""Suite ``logprobs``: per-sequence mean log-probs, forward+backward with a random
per-sequence upstream gradient (as the MI loss gives, so no candidate can fold the
backward into the forward as a scalar).

Kernel ``lm_head`` (from hidden states and the LM-head weight):

* ``naive`` (original-style): logits = hidden Wᵀ, then the original ``get_batch_logprobs``
  (``reference.get_batch_logprobs``), holding the (rows, V) logits;
* ``sami_fast[torch]``, ``sami_fast[triton]``: ``sami_fast.sequence_logprobs`` on each
  backend the device has; ``sami_fast[torch] held logits``: the torch backend with a
  ``logits_budget`` that keeps the scored rows' logits for the backward (no recompute);
* peers, each giving per-token losses (``reduction="none"``) and then the masked
  per-sequence mean: torch's ``linear_cross_entropy`` chunked
  (``options=LinearCrossEntropyOptions()``) and its reference path (``options=None``);
  cut-cross-entropy (CPU: its ``torch_compile`` implementation; CUDA: its Triton ``cce``
  with its defaults, whose backward skips tiles under ``filter_eps`` and accumulates in
  bf16, and ``cce_exact`` with ``filter_eps=None``); Liger's fused linear cross-entropy
  (CUDA). A peer that is missing, or too old a torch, is a row saying so.

Kernel ``get_batch_logprobs`` (from logits a model already produced): ``original``
(``reference.get_batch_logprobs``) and ``sami_fast.get_batch_logprobs`` per backend.

Shapes: CPU fp32, full: SmolLM2-135M's head (D=576, V=49152) over 8 sequences x 512
positions (4096 rows) and 2 x 512, quick: D=576, V=8192 over 2 x 256; CUDA bf16 with
Llama 3's head (D=4096, V=128256): quick 4 x 1024, full 4 x 1024 and 16 x 1024. ``scored`` is the share
of positions with a label (SAMI's prompts are ~80% of the tokens: 20% scored).
"""

import torch

from benchmarks.runner import Candidate, Case, module_missing, sami_fast_backends, with_backend
from sami_fast import reference
from sami_fast.batch_logprobs import get_batch_logprobs
from sami_fast.sequence_logprobs import sequence_logprobs

IGNORE = -100
HEAD_SHAPES = {  # device -> size -> [(sequences, positions + 1, scored share)]
    "cpu": {"quick": [(2, 257, 0.2), (2, 257, 1.0)],
            "full": [(2, 513, 0.2), (2, 513, 1.0), (8, 513, 0.2), (8, 513, 1.0)]},
    "cuda": {"quick": [(4, 1025, 1.0)], "full": [(4, 1025, 0.2), (4, 1025, 1.0), (16, 1025, 0.2), (16, 1025, 1.0)]},
}
LOGITS_SHAPES = {"cpu": {"quick": [(2, 257, 0.2)], "full": [(4, 1025, 0.2), (4, 1025, 1.0)]},
                 "cuda": {"quick": [(4, 1025, 1.0)], "full": [(4, 1025, 1.0), (16, 1025, 0.2)]}}
# (dtype, D, V) per device and size; the CPU's quick head has SmolLM2's width and a sixth of its
# vocabulary: torch's chunked linear_cross_entropy takes ~15 s a run at V=49152 and 512 rows.
HEADS = {"cpu": {"quick": (torch.float32, 576, 8192), "full": (torch.float32, 576, 49152)},
         "cuda": {"quick": (torch.bfloat16, 4096, 128256), "full": (torch.bfloat16, 4096, 128256)}}


def head_inputs(device, dtype, sequences, length, dim, vocab, scored):
    """Seeded (hidden (B, T, D), weight (V, D), labels (B, T), upstream (B,)); the first
    1 - ``scored`` of each sequence is prompt (label -100), as in SAMI."""
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(sequences, length, dim, device=device, generator=generator).to(dtype)
    weight = (torch.randn(vocab, dim, device=device, generator=generator) * dim**-0.5).to(dtype)
    labels = torch.randint(0, vocab, (sequences, length), device=device, generator=generator)
    labels[:, : int(round(length * (1 - scored)))] = IGNORE
    upstream = torch.randn(sequences, device=device, generator=generator)
    return hidden, weight, labels, upstream


def masked_mean(per_token, labels):
    """Per-sequence mean of the shifted per-token log-probs (B, T-1) over scored positions."""
    scored = labels[:, 1:] != IGNORE
    return (per_token.float() * scored).sum(dim=1) / scored.sum(dim=1)


def naive_head(hidden, weight, labels):
    return reference.get_batch_logprobs(hidden @ weight.t(), labels)


def _shifted(hidden, labels):
    """Rows (B(T-1), D) and their targets (B(T-1),): position t predicts label t+1."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)


def torch_linear_cross_entropy(hidden, weight, labels, chunked=True):
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    rows, targets = _shifted(hidden, labels)
    loss = torch.nn.functional.linear_cross_entropy(rows, weight, targets, reduction="none", ignore_index=IGNORE,
                                                    options=options)
    return masked_mean(-loss.reshape(labels.shape[0], -1), labels)


def cut_cross_entropy(hidden, weight, labels, **options):
    from cut_cross_entropy import linear_cross_entropy

    loss = linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], ignore_index=IGNORE, reduction="none",
                                **options)
    return masked_mean(-loss.reshape(labels.shape[0], -1), labels)


def liger(hidden, weight, labels):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    rows, targets = _shifted(hidden, labels)
    loss = liger_fused_linear_cross_entropy(rows, weight, targets, ignore_index=IGNORE, reduction="none")
    return masked_mean(-loss.reshape(labels.shape[0], -1), labels)


def _torch_lce_missing():
    has = hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    return None if has else f"not in torch {torch.__version__}"


def head_peers(device):
    """(name, forward, why it cannot run here or None) for every peer of the LM head."""
    cce_missing = module_missing("cut_cross_entropy")
    cuda_only = None if device == "cuda" else "CUDA only"
    peers = [
        ("torch_lce_chunked", torch_linear_cross_entropy, _torch_lce_missing()),
        ("torch_lce_reference", lambda h, w, y: torch_linear_cross_entropy(h, w, y, chunked=False),
         _torch_lce_missing()),
        ("cce[torch_compile]", lambda h, w, y: cut_cross_entropy(h, w, y, impl="torch_compile"), cce_missing),
        ("cce", cut_cross_entropy, cce_missing or cuda_only),
        ("cce_exact", lambda h, w, y: cut_cross_entropy(h, w, y, filter_eps=None), cce_missing or cuda_only),
        ("liger", liger, module_missing("liger_kernel") or cuda_only),
    ]
    if device == "cuda":  # torch_compile is cut-cross-entropy's CPU fallback; on CUDA its kernels are the peer
        peers = [p for p in peers if p[0] != "cce[torch_compile]"]
    return peers


def _head_candidate(name, role, device, shape, forward, backend=None, unavailable=None):
    def setup():
        hidden, weight, labels, upstream = head_inputs(device, *shape)
        hidden.requires_grad_()
        weight.requires_grad_()

        def forward_backward():
            out = forward(hidden, weight, labels)
            (out.float() * upstream).sum().backward()
            results = out.detach(), hidden.grad, weight.grad
            hidden.grad = weight.grad = None  # the caller holds them: a run's peak includes its gradients
            return results

        return (lambda: with_backend(backend, forward_backward)) if backend else forward_backward

    return Candidate(name, role, None if unavailable else setup, unavailable)


def _head_reference(device, shape):
    def compute():
        from tests.oracle import linear_head_floors

        results = []
        hidden, weight, labels, upstream = head_inputs(device, *shape)
        for dtype, forward in ((torch.float64, reference.sequence_logprobs), (hidden.dtype, naive_head)):
            h, w = (t.to(dtype, copy=True).requires_grad_() for t in (hidden, weight))
            out = forward(h, w, labels)
            (out * upstream.to(dtype)).sum().backward()
            results.append((out.detach(), h.grad, w.grad))
        per_token = upstream / (labels[:, 1:] != IGNORE).sum(dim=1)
        floors = linear_head_floors(hidden, weight, None, per_token, None, 1.0, hidden.dtype)
        return results[0], results[1], (floors["value"], floors["d_rows"], floors["d_weight"])

    return compute


def _logits_candidate(name, role, device, shape, forward, backend=None, unavailable=None):
    def setup():
        logits, labels, upstream = _logits_inputs(device, *shape)
        logits.requires_grad_()

        def forward_backward():
            out = forward(logits, labels)
            (out.float() * upstream).sum().backward()
            results = out.detach(), logits.grad
            logits.grad = None
            return results

        return (lambda: with_backend(backend, forward_backward)) if backend else forward_backward

    return Candidate(name, role, None if unavailable else setup, unavailable)


def _logits_inputs(device, dtype, sequences, length, vocab, scored):
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(sequences, length, vocab, device=device, generator=generator).to(dtype)
    labels = torch.randint(0, vocab, (sequences, length), device=device, generator=generator)
    labels[:, : int(round(length * (1 - scored)))] = IGNORE
    return logits, labels, torch.randn(sequences, device=device, generator=generator)


def _logits_reference(device, shape):
    def compute():
        results = []
        logits, labels, upstream = _logits_inputs(device, *shape)
        for dtype in (torch.float64, logits.dtype):
            x = logits.to(dtype, copy=True).requires_grad_()
            out = reference.get_batch_logprobs(x, labels)
            (out * upstream.to(dtype)).sum().backward()
            results.append((out.detach(), x.grad))
        return results[0], results[1], (None, None)

    return compute


def cases(device: str, size: str) -> list[Case]:
    if size not in HEAD_SHAPES["cpu"]:
        raise ValueError(f"size must be one of {', '.join(HEAD_SHAPES['cpu'])}, got {size!r}")
    dtype, dim, vocab = HEADS[device][size]
    backends = sami_fast_backends(device)
    out = []
    for sequences, length, scored in HEAD_SHAPES[device][size]:
        shape = (dtype, sequences, length, dim, vocab, scored)
        candidates = [_head_candidate("naive", "original", device, shape, naive_head)]
        candidates += [
            _head_candidate(f"sami_fast[{backend}]", "sami_fast", device, shape,
                            lambda h, w, y: sequence_logprobs(h, w, y, check_finite=False), backend, reason)
            for backend, reason in backends.items()
        ]
        if device == "cpu":  # the torch backend's opt-in trade: memory for the recompute
            budget = sequences * length * vocab * 4  # every position's fp32 logits: the scored rows' fit
            candidates.append(_head_candidate(
                "sami_fast[torch] held logits", "sami_fast", device, shape,
                lambda h, w, y, budget=budget: sequence_logprobs(h, w, y, check_finite=False, logits_budget=budget),
                "torch"))
        candidates += [_head_candidate(name, "peer", device, shape, forward, unavailable=reason)
                       for name, forward, reason in head_peers(device)]
        rows = sequences * (length - 1)
        out.append(Case("logprobs", "lm_head", f"rows={rows} D={dim} V={vocab} scored={scored:.0%}", candidates,
                        _head_reference(device, shape), params={"rows": rows, "scored": scored},
                        result_names=("value", "d_hidden", "d_weight")))
    for sequences, length, scored in LOGITS_SHAPES[device][size]:
        shape = (dtype, sequences, length, vocab, scored)
        candidates = [_logits_candidate("original", "original", device, shape, reference.get_batch_logprobs)]
        candidates += [
            _logits_candidate(f"sami_fast[{backend}]", "sami_fast", device, shape,
                              lambda x, y: get_batch_logprobs(x, y, check_finite=False), backend, reason)
            for backend, reason in backends.items()
        ]
        out.append(Case("logprobs", "get_batch_logprobs", f"B={sequences} T={length} V={vocab} scored={scored:.0%}",
                        candidates, _logits_reference(device, shape),
                        params={"rows": sequences * (length - 1), "scored": scored},
                        result_names=("value", "d_logits")))
    return out
