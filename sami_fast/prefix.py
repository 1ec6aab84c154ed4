"""SAMI log-prob matrices with shared prompts, and their constant-memory backward.

``logprob_matrix`` scores every response of a query under every principle
prompt, running each prompt once and all (prompt, response) pairs in one
batched pass (or in ``micro_batch_size`` chunks). ``sami_backward`` computes the
SAMI loss and accumulates its parameter gradients by gradient caching, so its
peak memory is one chunk's, whatever C*R is. ``PairScorer`` is the model as a
module whose ``forward`` scores a chunk of pairs: the module to wrap in
``DistributedDataParallel`` or to make the ``fully_shard`` root, so that every
forward of the model passes through the wrapper's hooks.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from sami_fast.backend import Backend, check_backend
from sami_fast.hf import (
    causal_lm_parts,
    check_lengths,
    ensure_checked,
    layer_checkpointing_active,
    layer_checkpointing_off,
    run_prompts,
    score_responses,
)
from sami_fast.loss import sami_loss
from sami_fast.validation import check_positive_int, check_tensor

SCORE_REDUCTIONS = ("mean", "sum")


@dataclass
class _Pairs:
    """The (B, C, R) problem flattened: pair i = (b, k, j) in row-major order."""

    shape: tuple  # (B, C, R)
    prompts: list  # B*C token tensors on the model's device
    responses: list  # B*R
    pair_prompt: torch.Tensor  # (B*C*R,) index into prompts
    pair_response: list  # (B*C*R,) index into responses
    pad_id: int
    backend: str | None = None  # of the fused head and the loss, as in ``sequence_logprobs``
    logits_budget: int = 0  # of the fused head, as in ``sequence_logprobs``


def _token_groups(name: str, groups, vocab_size: int):
    """Check a list of B lists of equally many 1-D id tensors; returns (flat list, per-query max length)."""
    if not isinstance(groups, (list, tuple)) or len(groups) == 0:
        raise ValueError(f"{name} must be a non-empty list with one list of token tensors per query")
    width = None
    flat, longest = [], []
    for b, group in enumerate(groups):
        if not isinstance(group, (list, tuple)) or len(group) == 0:
            raise ValueError(f"{name}[{b}] must be a non-empty list of token tensors (got {len(group)} entries)")
        if width is not None and len(group) != width:
            raise ValueError(f"{name}[{b}] has {len(group)} entries but {name}[0] has {width}")
        width = len(group)
        for i, ids in enumerate(group):
            where = f"{name}[{b}][{i}]"
            check_tensor(where, ids, dims=(1,), dtypes=(torch.long,))
            if ids.numel() == 0:
                raise ValueError(f"{where} is empty: every prompt and response needs at least one token")
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"{where} holds token id {bad} outside the vocabulary [0, {vocab_size})")
        flat.extend(group)
        longest.append(max(len(ids) for ids in group))
    return flat, width, longest


def _pairs(parts, prompts, responses, pad_token_id, backend=None, logits_budget=0) -> _Pairs:
    check_positive_int("logits_budget", logits_budget, allow_zero=True, meaning="bytes")
    flat_prompts, C, prompt_max = _token_groups("prompts", prompts, parts.vocab_size)
    flat_responses, R, response_max = _token_groups("responses", responses, parts.vocab_size)
    B = len(prompts)
    if len(responses) != B:
        raise ValueError(f"responses has {len(responses)} queries but prompts has {B}")
    for b in range(B):
        total = prompt_max[b] + response_max[b]
        if parts.max_positions is not None and total > parts.max_positions:
            raise ValueError(
                f"prompts[{b}] + responses[{b}]: prompt length {prompt_max[b]} + response length "
                f"{response_max[b]} = {total} exceeds the model's max positions {parts.max_positions}"
            )
    check_lengths(parts, max(prompt_max) + max(response_max))
    if pad_token_id is None:
        # Padding is always masked out, so any valid id serves but the embedding's padding_idx: its zero
        # embedding gives NaN gradients in models that normalise embeddings (Gemma 3n's sqrt(mean(x^2))).
        pad_id = 1 if parts.embedding_padding_idx == 0 else 0
    elif (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)
          or not 0 <= pad_token_id < parts.vocab_size):
        raise ValueError(f"pad_token_id must be an id in [0, {parts.vocab_size}), got {pad_token_id!r}")
    else:
        pad_id = pad_token_id
    device = parts.head_weight.device
    b, k, j = torch.meshgrid(torch.arange(B), torch.arange(C), torch.arange(R), indexing="ij")
    return _Pairs(
        shape=(B, C, R),
        prompts=[ids.to(device) for ids in flat_prompts],
        responses=[ids.to(device) for ids in flat_responses],
        pair_prompt=(b * C + k).reshape(-1).to(device),
        pair_response=(b * R + j).reshape(-1).tolist(),
        pad_id=pad_id,
        backend=backend,
        logits_budget=logits_budget,
    )


def _self_check_sample(pairs: _Pairs) -> tuple:
    """Two prompts and two responses of one query for the self-check: ([short prompt, longest prompt],
    [longest response, shortest response]) of the query holding the longest prompt. With prompts all of one
    length, the short one is the first half of the longest, so that the check always sees a padding offset."""
    B, C, R = pairs.shape
    b = max(range(B * C), key=lambda i: len(pairs.prompts[i])) // C
    prompts = sorted(pairs.prompts[b * C : (b + 1) * C], key=len)
    responses = sorted(pairs.responses[b * R : (b + 1) * R], key=len)
    longest, short = prompts[-1], prompts[0]
    if len(short) == len(longest):
        short = longest[: max(1, len(longest) // 2)]
    return [short, longest], [responses[-1], responses[0]]


def _check_finite(model, pairs: _Pairs, scores: torch.Tensor, start: int, reduction: str, search=True) -> None:
    """Raise if a score of pairs [start, start + len(scores)) is NaN or inf, naming its query, prompt and
    response and whether a weight or the hidden states are to blame (one host sync; the search only on failure).

    Responses packed in one row share its attention, so a non-finite hidden state of one makes its row-mates'
    scores NaN too (a zero attention weight times a NaN value): with ``search`` the pair named is the first whose
    score is non-finite when scored alone. Without it (FSDP2, where a lone forward would be a collective the
    other ranks do not join) the first non-finite score is named.
    """
    finite = torch.isfinite(scores.detach())
    if bool(finite.all()):
        return
    candidates = (start + (~finite).nonzero()[:, 0]).tolist()
    index = candidates[0]
    if search:
        parts = causal_lm_parts(model)
        with torch.no_grad(), layer_checkpointing_off(model):
            alone = (i for i in candidates
                     if not bool(torch.isfinite(_chunk_scores(parts, pairs, i, i + 1, reduction))))
            index = next(alone, index)
    _, C, R = pairs.shape
    b, k, j = index // (C * R), index // R % C, index % R
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    bad = next((name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    cause = (
        f"the model's weights are non-finite ({bad} holds NaN or inf)" if bad is not None
        else "the model's hidden states are non-finite for it (all weights are finite: an overflow, e.g. in fp16)"
    )
    value = float(scores.detach()[index - start])
    raise FloatingPointError(f"score [{b}, {k}, {j}] (responses[{b}][{j}] given prompts[{b}][{k}]) is {value}: {cause}")


def _chunks(n_pairs: int, micro_batch_size):
    if micro_batch_size is None:
        return [(0, n_pairs)]
    check_positive_int("micro_batch_size", micro_batch_size, meaning="pairs per chunk")
    return [(s, min(s + micro_batch_size, n_pairs)) for s in range(0, n_pairs, micro_batch_size)]


def _run(model, fn, *args, checkpointed: bool):
    """``fn(*args)`` with HF's layer checkpointing off; as one checkpointed unit when ``checkpointed``."""

    def run(*inputs):
        with layer_checkpointing_off(model):  # also around the recomputation during backward
            return fn(*inputs)

    return checkpoint(run, *args, use_reentrant=False) if checkpointed else run(*args)


def _check_reduction(reduction) -> None:
    if reduction not in SCORE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, SCORE_REDUCTIONS))}, got {reduction!r}")


def logprob_matrix(model, prompts: list, responses: list, *, pad_token_id: int | None = None,
                   micro_batch_size: int | None = None, reduction: str = "mean", self_check: bool = True,
                   backend: Backend | None = None, logits_budget: int = 0) -> torch.Tensor:
    """(B, C, R) SAMI scores: ``[b, k, j]`` = mean log-prob of ``responses[b][j]`` given ``prompts[b][k]``.

    Args:
        model: a transformers causal LM, or a ``PairScorer`` of one (possibly in
            ``DistributedDataParallel`` or the FSDP2 root).
        prompts: B lists of C 1-D int64 tensors (principle + query ids, BOS included).
        responses: B lists of R 1-D int64 tensors (no BOS).
        pad_token_id: the id fed at padded positions (default: an id other than the input
            embedding's padding_idx).
        micro_batch_size: None (all pairs in one forward) or pairs per forward.
        reduction: "mean" or "sum" of the response-token log-probs.
        self_check: self-check an unverified architecture on first use.
        backend: of the fused LM head, as in ``sequence_logprobs``.
        logits_budget: bytes of LM-head logits a chunk may keep for its backward instead of
            recomputing them (torch backend), as in ``sequence_logprobs``; 0 keeps none. Each
            chunk keeps its own until the backward: up to chunks x budget in all (checkpointed
            chunks drop theirs and recompute them with the chunk).

    Returns:
        (B, C, R) in fp32 (fp64 for an fp64 model), differentiable w.r.t. every parameter.

    Raises:
        TypeError, ValueError: malformed ``prompts``/``responses`` (naming the entry), bad
            options.
        sami_fast.hf.UnsupportedArchitectureError: a structure that cannot be scored exactly,
            or a failed self-check.
        FloatingPointError: a NaN/inf score, naming its (query, prompt, response).

    ``prompts``: B lists of C 1-D LongTensors (principle + query ids, BOS
    included); ``responses``: B lists of R 1-D LongTensors (no BOS). Equal, within
    fp32 rounding, to averaging the response-token log-probs of the concatenated
    sequence ``prompts[b][k] ++ responses[b][j]``, and differentiable w.r.t. every
    parameter. All prompts run in one forward; the B*C*R responses run in one
    forward, or ``micro_batch_size`` pairs at a time, on copies of their prompt's
    cache. With gradient checkpointing enabled (training mode) the prompt pass and
    each response chunk are checkpointed as a whole. ``reduction="sum"`` gives
    summed instead of mean response-token log-probs. ``pad_token_id``: the id fed
    at padded positions (masked out); the default is an id other than the input
    embedding's padding_idx, whose zero row can give NaN gradients. ``model`` may
    also be a ``PairScorer`` (e.g. the FSDP2 root): each chunk then runs through it
    and re-runs the prompts it needs.

    Architectures: a model type outside ``sami_fast.hf.VERIFIED_MODEL_TYPES`` is
    self-checked on four pairs of its first batch (``sami_fast.hf.self_check``);
    ``self_check=False`` skips that. A structure that cannot be scored exactly, or
    a failed self-check, raises ``sami_fast.hf.UnsupportedArchitectureError``. A
    NaN/inf score raises ``FloatingPointError`` naming its (query, prompt, response).
    """
    _check_reduction(reduction)
    check_backend(backend)
    given = model
    scorer, model = _scorer_and_model(model)
    parts = causal_lm_parts(model)
    pairs = _pairs(parts, prompts, responses, pad_token_id, backend, logits_budget)
    _ensure_checked(scorer, model, parts, pairs, self_check)
    chunks = _chunks(len(pairs.pair_response), micro_batch_size)
    if scorer is given:  # a scorer passed in: each chunk through it (its wrapper's hooks run)
        return torch.cat([scorer(pairs, s, e, reduction) for s, e in chunks]).reshape(pairs.shape)
    checkpointed = layer_checkpointing_active(model)
    states = _run(model, run_prompts, parts, pairs.prompts, pairs.pad_id, checkpointed=checkpointed)
    scores = [
        _run(
            model,
            score_responses,
            parts,
            states,
            pairs.pair_prompt[s:e],
            [pairs.responses[i] for i in pairs.pair_response[s:e]],
            pairs.pad_id,
            reduction,
            False,
            pairs.backend,
            pairs.logits_budget,
            checkpointed=checkpointed,
        )
        for s, e in chunks
    ]
    for (start, _), chunk in zip(chunks, scores):
        _check_finite(model, pairs, chunk, start, reduction)
    return torch.cat(scores).reshape(pairs.shape)


def _chunk_scores(parts, pairs: _Pairs, start: int, stop: int, reduction: str,
                  always_run_decoder=False) -> torch.Tensor:
    """Scores of pairs [start, stop), re-running just the prompts they need."""
    first = int(pairs.pair_prompt[start])
    last = int(pairs.pair_prompt[stop - 1])
    states = run_prompts(parts, pairs.prompts[first : last + 1], pairs.pad_id)
    responses = [pairs.responses[i] for i in pairs.pair_response[start:stop]]
    return score_responses(parts, states, pairs.pair_prompt[start:stop] - first, responses, pairs.pad_id, reduction,
                           always_run_decoder=always_run_decoder, backend=pairs.backend,
                           logits_budget=pairs.logits_budget)


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class PairScorer(torch.nn.Module):
    """A causal LM as a module whose ``forward`` scores a chunk of (prompt, response) pairs.

    ``sami_backward`` runs every forward of the model as ``scorer(pairs, start, stop,
    reduction)``, so a wrapper around the scorer sees all of them: wrap it in
    ``DistributedDataParallel(scorer, broadcast_buffers=False)`` for data parallel
    training, or shard the decoder layers with ``fully_shard`` and make the scorer the
    FSDP2 root (``sami_fast.distributed.shard``): the root's hooks then unshard the
    embeddings and the LM head, which scoring reads directly rather than through
    ``lm_head.forward``. ``run(fn)`` gives ``fn(model)`` the same treatment under FSDP2
    once registered as a forward method (generation does it).

    Arguments:
        model: a transformers causal LM (``causal_lm_parts`` must accept it).
    """

    def __init__(self, model):
        super().__init__()
        causal_lm_parts(model)  # refuse a non-causal-LM here, not at the first forward
        self.model = model

    def forward(self, pairs: _Pairs, start: int, stop: int, reduction: str) -> torch.Tensor:
        """Scores of pairs ``[start, stop)`` of ``pairs`` (as ``sami_backward`` prepares them):
        shape (stop - start,)."""
        # Sharded, every chunk makes the same layer calls on every rank (each call is a collective).
        return _chunk_scores(causal_lm_parts(self.model), pairs, start, stop, reduction,
                             always_run_decoder=_is_fsdp_module(self))

    def run(self, fn):
        """``fn(model)``: another use of the model (e.g. generation) through the scorer."""
        return fn(self.model)


def _scorer_and_model(model):
    """(scorer, causal LM) for ``model``: a causal LM, a ``PairScorer``, or a ``PairScorer`` in
    ``DistributedDataParallel``."""
    inner = getattr(model, "module", None) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if isinstance(inner, PairScorer):
        return model, inner.model
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError("model: a DistributedDataParallel model must wrap a sami_fast.prefix.PairScorer "
                        "(DDP only reduces gradients of forwards that run through it)")
    scorer = PairScorer(model)
    _refuse_sharded(model)
    return scorer, model


def _refuse_sharded(model) -> None:
    """Outside the FSDP2 root's forward the root's parameters are shards (DTensors): scoring them
    would fail or be wrong."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(model.get_output_embeddings().weight, DTensor):
            raise ValueError("model: its parameters are sharded (FSDP2); pass the PairScorer that is the fully_shard "
                             "root (sami_fast.distributed.shard) so that FSDP's hooks unshard them")


def _ensure_checked(scorer, model, parts, pairs: _Pairs, enabled: bool) -> None:
    """``ensure_checked`` for ``model``; under FSDP2 through the root (the self-check runs the model)."""
    if not _is_fsdp_module(scorer):
        ensure_checked(model, parts, lambda: _self_check_sample(pairs), pairs.pad_id, enabled, pairs.backend)
        return
    scorer.run(lambda model: ensure_checked(model, causal_lm_parts(model), lambda: _self_check_sample(pairs),
                                            pairs.pad_id, enabled, pairs.backend))


def _gradient_sync(scorer, sync: bool):
    """A context for one forward and backward: gradients are reduced across ranks only when ``sync``."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(scorer, torch.nn.parallel.DistributedDataParallel):
        return scorer.no_sync()
    if _is_fsdp_module(scorer):
        return _fsdp_no_sync(scorer)
    return contextlib.nullcontext()


def _is_fsdp_module(module) -> bool:
    """Whether ``fully_shard`` made ``module`` an FSDP2 unit."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def sami_backward(model, prompts: list, responses: list, *, micro_batch_size: int,
                  mask: torch.Tensor | None = None, reduction: str = "mean", loss_weight: float = 1.0,
                  self_check: bool = True, sync_gradients: bool = True, min_chunks: int | None = None,
                  backend: Backend | None = None, logits_budget: int = 0) -> tuple[torch.Tensor, dict]:
    """SAMI loss of the (B, C, C) matrix and its parameter gradients (accumulated into ``.grad``).

    Args:
        model, prompts, responses, reduction, self_check: as in ``logprob_matrix`` (C == R).
        micro_batch_size: (prompt, response) pairs per chunk: bounds the peak memory.
        mask: None or (B, C, C) bool, as in ``sami_loss``.
        loss_weight: the gradients accumulated are those of ``loss_weight * loss``.
        sync_gradients: whether this call's last backward reduces gradients across ranks.
        min_chunks: run at least this many chunks (FSDP2 ranks must agree).
        backend: of the fused LM head and the loss, as in ``sequence_logprobs``.
        logits_budget: as in ``logprob_matrix``: bytes of logits one chunk's head may keep
            for its backward (the graph-free first pass keeps none).

    Returns:
        ``(loss, stats)``: the detached 0-dim loss and ``sami_loss``'s stats.

    Raises:
        ValueError: no trainable parameter, C != R, bad options; as ``logprob_matrix`` otherwise.

    Gradient caching keeps peak memory at one chunk of ``micro_batch_size`` pairs:
    (1) the matrix is computed chunk by chunk without a graph; (2) the loss and
    d loss / d matrix come from a leaf copy; (3) each chunk is recomputed with a
    graph and back-propagates its slice of that gradient. A chunk re-runs the
    prompts it needs. The RNG state is replayed per chunk so dropout draws the
    same masks in (1) and (3). Returns ``(loss (detached), stats)`` with stats
    from the SAMI loss (row/column accuracy, MI lower bound). ``reduction``: the
    scores, as in ``logprob_matrix``. ``loss_weight``: the gradients accumulated are
    those of ``loss_weight * loss`` (gradient accumulation over batches of
    different sizes weights each by its share); the returned loss is unweighted.
    Architectures, ``self_check`` and non-finite scores: as in ``logprob_matrix``.

    ``model``: a causal LM, or a ``PairScorer`` of one (possibly in
    ``DistributedDataParallel`` or the root of ``fully_shard``): every forward then
    runs through the scorer. ``sync_gradients``: whether this call's last backward
    reduces gradients across ranks; every other chunk's backward runs under
    ``no_sync()`` (DDP) or ``set_requires_gradient_sync(False)`` (FSDP2), so with
    accumulation only the last call of an optimiser step passes True. No effect
    without a distributed wrapper. ``min_chunks``: run at least this many chunks
    (the extra ones recompute the last chunk and back-propagate zeros): every
    forward and backward of an FSDP2 model is a collective, so its ranks must
    run the same number of chunks.
    """
    _check_reduction(reduction)
    check_backend(backend)
    if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) or not math.isfinite(loss_weight):
        raise ValueError(f"loss_weight must be a finite number, got {loss_weight!r}")
    if not isinstance(sync_gradients, bool):
        raise TypeError(f"sync_gradients must be a bool, got {type(sync_gradients).__name__}")
    scorer, model = _scorer_and_model(model)
    parts = causal_lm_parts(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"sami_backward: no parameter of model ({type(model).__name__}) requires grad, so there is nothing to "
            "train; unfreeze some (requires_grad_(True)), or use logprob_matrix under torch.no_grad() for scores"
        )
    pairs = _pairs(parts, prompts, responses, pad_token_id=None, backend=backend, logits_budget=logits_budget)
    B, C, R = pairs.shape
    if C != R:
        raise ValueError(
            f"sami_backward needs square matrices: responses[b] must hold as many responses as prompts[b] "
            f"has prompts (C == R), got C={C}, R={R}"
        )
    check_positive_int("micro_batch_size", micro_batch_size, meaning="pairs per chunk")
    check_positive_int("min_chunks", min_chunks, allow_none=True)
    chunks = _chunks(len(pairs.pair_response), micro_batch_size)
    padding = max(0, (min_chunks or 0) - len(chunks))
    if mask is not None:
        check_tensor("mask", mask, dims=(3,), dtypes=(torch.bool,))
        if tuple(mask.shape) != pairs.shape:
            raise ValueError(f"mask must have shape {pairs.shape}, got {tuple(mask.shape)}")
    _ensure_checked(scorer, model, parts, pairs, self_check)
    device = parts.head_weight.device
    with layer_checkpointing_off(model):  # each chunk is recomputed anyway: no extra checkpointing
        replay = []
        with torch.no_grad():
            pieces = []
            for start, stop in chunks:
                replay.append(_rng_state(device))
                pieces.append(scorer(pairs, start, stop, reduction))
                _check_finite(model, pairs, pieces[-1], start, reduction, search=not _is_fsdp_module(scorer))
            for _ in range(padding):
                scorer(pairs, *chunks[-1], reduction)
        matrix = torch.cat(pieces).reshape(pairs.shape).requires_grad_()
        with torch.enable_grad():
            loss, stats = sami_loss(matrix, None if mask is None else mask.to(device), return_stats=True,
                                    backend=backend)
            (d_matrix,) = torch.autograd.grad(loss, matrix)
        d_scores = d_matrix.reshape(-1) * loss_weight
        resume = _rng_state(device)
        runs = list(zip(chunks, replay, [d_scores[s:e] for s, e in chunks]))
        runs += [(chunks[-1], replay[-1], torch.zeros_like(d_scores[slice(*chunks[-1])]))] * padding
        for index, ((start, stop), state, d_chunk) in enumerate(runs):
            _set_rng_state(device, state)
            with torch.enable_grad(), _gradient_sync(scorer, sync_gradients and index == len(runs) - 1):
                scorer(pairs, start, stop, reduction).backward(d_chunk)
        _set_rng_state(device, resume)
    return loss.detach(), stats
