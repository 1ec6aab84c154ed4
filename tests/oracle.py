"""The one comparison rule of the suite: no worse than the plain computation in the same dtype.

Ground truth is computed in float64 (``sami_fast.reference`` in fp64, or the same
model cast with ``.double()``), on the very numbers ours gets (inputs rounded to
ours' dtype first), so only the arithmetic's error is measured. A result ``ours``
in dtype d passes when, per tensor,

    max |ours - truth| <= k * (max |plain - truth| + tiny)

where ``plain`` is the straightforward computation in the same dtype d (the
original composition, the full-sequence forward, ...). The right-hand side is the
rounding noise of dtype d measured in the test itself, so the bound holds on any
CPU, BLAS or thread count; ``k`` says how much worse than plain we accept (a
stated small factor, measured). ``tiny`` is the least noise plain is credited
with: one unit in the last place of the largest true value, or more where a test
states it (a result that cancels far below the terms it sums, e.g. one ulp of the
logits for a log-prob), so that a plain result that happens to be exact, as a
tensor of one or two entries can be, does not make the bound vanish. A real bug
(a wrong position, a scored prompt token, a missing softcap) moves results by
orders of magnitude more than dtype rounding, so it fails.

Where entries differ in size by orders of magnitude (the softmax part of a
gradient), ``scale`` weighs each entry's error by its own natural size before the
maximum is taken, so an error in the small entries cannot hide under the large ones.

Model-level truth: ``fp64_twin(model)`` runs the plain full-sequence computation
(``full_sequence_matrix``) in float64; ``assert_matrix_oracle_close`` and
``assert_model_grads_oracle_close`` apply the rule to a score matrix and to the
parameter gradients of a loss of it, ``assert_stats_oracle_close`` to a SAMI loss and its stats.
"""

import copy
import itertools
import math

import torch

from sami_fast import reference

# k, measured on an AMD EPYC with 1 and 2 threads: the ratio error(ours) / (error(plain) + tiny)
# over the suite's checks with its seeds shifted five times (and hypothesis drawing anew).
# Kernel level (sami_loss, sequence_logprobs, get_batch_logprobs, the chunked torch path), fp32:
# the worst of ~4000 checks was 2.6 (d_hidden of a hypothesis-drawn sequence_logprobs case); k = 8.
K_DEFAULT = 8.0
# Model level (tiny random Llama, GPT-2, Gemma 2, Granite, Cohere; SmolLM2-135M), fp32.
# Scores: at most 0.8 over 12 problems per architecture (B, C, R from 1 to 3) and the suite's
# checks; k = 2. Parameter gradients: per-tensor maxima of as few as 64 entries (norm weights)
# scatter more: at most 3.1 over the same; k = 8. A wrong position id, a dropped softcap or the
# first response token read from the wrong prompt position exceed these bounds 90 to 10^5 times.
K_MATRIX = 2.0
K_MODEL_GRADS = 8.0


def ulp_floor(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place of ``dtype`` at the largest magnitude of ``truth``."""
    scale = float(truth.detach().abs().max()) if truth.numel() else 0.0
    return torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny)


def oracle_excess(ours, plain, truth, *, k: float = K_DEFAULT, tiny: float | None = None,
                  dtype: torch.dtype | None = None, scale=None) -> tuple:
    """(error of ours, allowed error): the two sides of the rule, as floats.

    ``tiny``: the least noise credited to plain, never below one ulp of ``dtype`` (default:
    ours' dtype) at ``max |truth|``. ``scale``: a tensor broadcastable to ``truth`` of positive
    per-entry sizes; errors and ``tiny`` are then in units of it.
    """
    if ours.shape != truth.shape or plain.shape != truth.shape:
        raise ValueError(
            f"shapes differ: ours {tuple(ours.shape)}, plain {tuple(plain.shape)}, truth {tuple(truth.shape)}")
    dtype = dtype or ours.dtype
    ours, plain, truth = (t.detach().double() for t in (ours, plain, truth))
    if scale is not None:
        scale = torch.as_tensor(scale, dtype=torch.float64)
        if not (scale > 0).all():
            raise ValueError("scale must be positive everywhere")
        ours, plain, truth = ours / scale, plain / scale, truth / scale
    tiny = max(tiny or 0.0, ulp_floor(truth, dtype))
    error = float((ours - truth).abs().max()) if ours.numel() else 0.0
    plain_error = float((plain - truth).abs().max()) if plain.numel() else 0.0
    return error, k * (plain_error + tiny)


def assert_oracle_close(ours, plain, truth, *, k: float = K_DEFAULT, tiny: float | None = None,
                        dtype: torch.dtype | None = None, scale=None, what: str = "result") -> None:
    """``ours`` is within ``k`` times the error of ``plain`` (same dtype) from the fp64 ``truth``.

    ``tiny``, ``dtype``, ``scale``: as in ``oracle_excess``.
    """
    if not torch.isfinite(ours.detach()).all():
        raise AssertionError(f"{what}: not finite")
    error, allowed = oracle_excess(ours, plain, truth, k=k, tiny=tiny, dtype=dtype, scale=scale)
    units = " (in units of the per-entry scale)" if scale is not None else ""
    assert error <= allowed, (
        f"{what}: max error {error:.3e} vs fp64 exceeds {allowed:.3e} = {k:g} x (the plain computation's error"
        f" + the floor){units}"
    )


def linear_head_floors(rows, weight, bias, upstream, softcap, temperature, dtype) -> dict:
    """The least noise of each result of a linear head's log-probs: one ulp of ``dtype`` at the
    size of the terms it adds up, which cancel to far less where the softmax is flat or peaked.

    Values: the logits (and log V). Gradients: |upstream| times |weight| (d_rows), |rows|
    (d_weight) or 1 (d_bias), over the temperature, times 1 + max |lse|: ours recomputes
    p = exp(z - lse) from a saved fp32 log-sum-exp, so every p carries lse's rounding, up to
    one ulp of |lse| relative (torch's autograd of log_softmax subtracts the max exactly and
    can be far more exact when the logits are large). ``rows`` (..., D), ``upstream``: any shape.
    """
    rows = rows.detach().double().reshape(-1, rows.shape[-1])
    logits = rows @ weight.detach().double().t()
    if bias is not None:
        logits = logits + bias.detach().double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    largest_logit = float(logits[torch.isfinite(logits)].abs().max())
    largest_lse = float(torch.logsumexp(logits, dim=1).abs().max())
    eps, g = torch.finfo(dtype).eps, float(upstream.abs().max()) / temperature * (1 + largest_lse)
    return {
        "value": eps * (largest_logit + math.log(weight.shape[0])),
        "d_rows": eps * g * float(weight.abs().max()),
        "d_weight": eps * g * float(rows.abs().max()),
        "d_bias": eps * g,
    }


def assert_grads_oracle_close(ours: dict, plain: dict, truth: dict, *, k: float = K_DEFAULT, what: str = "") -> None:
    """The rule per parameter gradient (dicts name -> tensor); every reference gradient must be non-zero."""
    assert ours.keys() == truth.keys() == plain.keys(), "the gradients cover different parameters"
    for name, true in truth.items():
        assert ours[name] is not None, f"no gradient reached {name}"
        assert true.abs().max() > 0, f"reference gradient of {name} is zero: the check would be vacuous"
        assert_oracle_close(ours[name], plain[name], true, k=k, what=f"{what}grad {name}")


def assert_no_worse_per_entry(ours, plain, truth, *, slack, what: str = "result") -> None:
    """Entry by entry, ``|ours - truth| <= |plain - truth| + slack`` (``slack``: a float or a tensor).

    For low-precision results whose rounding is one final cast: ours may not be worse
    than plain anywhere by more than the ``slack`` the test states (its own ulps).
    """
    if not torch.isfinite(ours.detach()).all():
        raise AssertionError(f"{what}: not finite")
    excess = per_entry_excess(ours, plain, truth, slack=slack)
    assert excess <= 0, f"{what}: worse than the plain computation in the same dtype by {excess:.3g} beyond the slack"


def per_entry_excess(ours, plain, truth, *, slack) -> float:
    """``max(|ours - truth| - |plain - truth| - slack)`` over the entries: at most 0 when ours is
    nowhere worse than plain by more than ``slack`` (the rule of ``assert_no_worse_per_entry``,
    also reported by ``benchmarks/gpu_check.py``)."""
    ours, plain, truth = (t.detach().double() for t in (ours, plain, truth))
    slack = slack.detach().double() if isinstance(slack, torch.Tensor) else slack
    return float(((ours - truth).abs() - (plain - truth).abs() - slack).max())


# ---------------------------------------------------------------- model level


def fp64_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` (same weights, mode and settings) for the ground truth."""
    return copy.deepcopy(model).double()


def full_sequence_matrix(model, prompts, responses) -> torch.Tensor:
    """(B, C, R): each prompt ++ response through the model; mean log-prob of the response tokens.

    The plain computation ``logprob_matrix`` replaces, in the model's dtype.
    """
    B, C, R = len(prompts), len(prompts[0]), len(responses[0])
    scores = [_full_sequence_score(model, prompts[b][k], responses[b][j])
              for b in range(B) for k in range(C) for j in range(R)]
    return torch.stack(scores).reshape(B, C, R)


def _full_sequence_score(model, prompt, response) -> torch.Tensor:
    """Mean log-prob of ``response``'s tokens after ``prompt``, from the whole sequence's logits."""
    sequence = torch.cat([prompt, response])
    logprobs = model(sequence[None]).logits[0].log_softmax(-1)
    start = len(prompt) - 1  # the last prompt position predicts the first response token
    return logprobs[start : len(sequence) - 1].gather(1, response[:, None]).mean()


def grads_after(model, step, names=None) -> dict:
    """The parameter gradients ``step()`` leaves (it calls backward itself), from zero.

    ``names``: only these parameters (the others are frozen meanwhile, which saves their work).
    """
    parameters = dict(model.named_parameters())
    frozen = [p for name, p in parameters.items() if names is not None and name not in names and p.requires_grad]
    model.zero_grad(set_to_none=True)
    for p in frozen:
        p.requires_grad_(False)
    try:
        step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return {name: p.grad.clone() for name, p in parameters.items() if names is None or name in names}


def parameter_grads(model, loss_fn, names=None) -> dict:
    """The parameter gradients of ``loss_fn()``, from zero (``names``: as in ``grads_after``)."""
    return grads_after(model, lambda: loss_fn().backward(), names)


def assert_matrix_oracle_close(ours, model, prompts, responses, *, twin=None, k: float = K_MATRIX,
                               what: str = "matrix") -> None:
    """A (B, C, R) score matrix from ``model`` obeys the rule against the full-sequence matrix.

    plain: ``full_sequence_matrix`` of ``model``; truth: the same of ``twin`` (default
    ``fp64_twin(model)``).
    """
    twin = fp64_twin(model) if twin is None else twin
    with torch.no_grad():
        plain = full_sequence_matrix(model, prompts, responses)
        truth = full_sequence_matrix(twin, prompts, responses)
    assert_oracle_close(ours, plain, truth, k=k, what=what)


def full_sequence_grads(model, loss_of_matrix, prompts, responses, names=None) -> tuple:
    """(parameter gradients of ``loss_of_matrix(full_sequence_matrix(model, ...))`` from zero, the matrix).

    ``loss_of_matrix``: a scalar from a (B, C, R) matrix, in the model's dtype (fp32 or fp64).
    ``names``: as in ``grads_after``.
    """
    matrices = []

    def loss():
        matrices.append(full_sequence_matrix(model, prompts, responses))
        return loss_of_matrix(matrices[-1])

    return parameter_grads(model, loss, names), matrices[-1].detach()


def streamed_full_sequence_grads(model, loss_of_matrix, prompts, responses, names=None) -> tuple:
    """``full_sequence_grads``' result holding one sequence's graph at a time: the matrix without
    a graph, the loss's gradient with respect to it, then each sequence's forward and backward
    with its score's gradient (the chain rule term by term; one forward more). For models and
    sizes whose C*R graphs do not fit together (Llama-3-8B in float64 on one GPU).
    """
    with torch.no_grad():
        matrix = full_sequence_matrix(model, prompts, responses)
    scores = matrix.clone().requires_grad_(True)
    (d_matrix,) = torch.autograd.grad(loss_of_matrix(scores), scores)

    def step():
        for (b, k, j), d_score in zip(itertools.product(*map(range, matrix.shape)), d_matrix.flatten()):
            _full_sequence_score(model, prompts[b][k], responses[b][j]).backward(d_score)

    return grads_after(model, step, names), matrix


def assert_model_grads_oracle_close(ours: dict, model, loss_of_matrix, prompts, responses, *, twin=None,
                                    k: float = K_MODEL_GRADS, what: str = "") -> None:
    """Parameter gradients ``ours`` obey the rule against ``full_sequence_grads`` of ``model`` and its fp64 twin."""
    twin = fp64_twin(model) if twin is None else twin
    plain, _ = full_sequence_grads(model, loss_of_matrix, prompts, responses)
    truth, _ = full_sequence_grads(twin, loss_of_matrix, prompts, responses)
    assert_grads_oracle_close(ours, plain, truth, k=k, what=what)


def assert_stats_oracle_close(loss, stats: dict, plain_matrix, truth_matrix, mask=None, *, k: float = K_MATRIX) -> None:
    """A SAMI loss and its stats (``sami_backward``, a trainer step) obey the rule against
    ``reference.stats`` of the full-sequence matrix in fp32 (plain) and of the fp64 twin (truth).

    The floor is two ulps of the largest score, not one of the result: the loss and the MI
    bound weigh the scores with an l1 norm of at most 2 (each row's and column's
    softmax-minus-target, averaged), and the MI bound log n - loss cancels to well below
    the scores' size.
    """
    plain, truth = reference.stats(plain_matrix.detach(), mask), reference.stats(truth_matrix.detach(), mask)
    tiny = 2 * ulp_floor(truth_matrix, plain_matrix.dtype)
    assert set(stats) == set(truth) - {"loss"}, f"stats {sorted(stats)}"
    for name, value in {"loss": loss, **stats}.items():
        value = torch.as_tensor(value, dtype=plain[name].dtype)
        assert_oracle_close(value, plain[name], truth[name], k=k, tiny=tiny, what=name)
