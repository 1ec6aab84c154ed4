"""Plain-PyTorch reference semantics of SAMI: the oracle every kernel is tested against.

Written for clarity, not speed or memory: it materialises full logits and full
softmaxes. Evaluate it in float64 to get the ground truth.
"""

import math

import torch
import torch.nn.functional as F


def _as_batched(logprobs: torch.Tensor, mask):
    batched = logprobs.dim() == 3
    x = logprobs if batched else logprobs.unsqueeze(0)
    if mask is None:
        mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    elif not batched:
        mask = mask.unsqueeze(0)
    return x, mask


def _masked_terms(logprobs: torch.Tensor, mask):
    """Per-query row and column cross-entropies with their validity.

    Returns (row_ce, col_ce, valid, x, mask) with row_ce/col_ce/valid of shape (B, C).
    Row k (column j) contributes iff its diagonal entry is unmasked.
    """
    x, mask = _as_batched(logprobs, mask)
    valid = torch.diagonal(mask, dim1=1, dim2=2)
    xm = x.masked_fill(~mask, -math.inf)
    # Rows/columns that do not contribute are zeroed so their (unused) log-sum-exp
    # stays finite and cannot leak NaN into the gradient.
    row_lse = torch.logsumexp(xm.masked_fill(~valid[:, :, None], 0.0), dim=2)
    col_lse = torch.logsumexp(xm.masked_fill(~valid[:, None, :], 0.0), dim=1)
    diag = torch.diagonal(x, dim1=1, dim2=2)
    row_ce = torch.where(valid, row_lse - diag, torch.zeros_like(diag))
    col_ce = torch.where(valid, col_lse - diag, torch.zeros_like(diag))
    return row_ce, col_ce, valid, x, mask


def sami_loss(logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SAMI contrastive loss of a (C, C) or batched (B, C, C) log-prob matrix.

    ``logprobs[b, k, j]`` scores response j under constitution k; response j was
    generated under constitution j, so targets lie on the diagonal. Per query:
    ``(mean_k CE(softmax(row k), k) + mean_j CE(softmax(column j), j)) / 2``; the
    result is the mean over queries. ``mask[b, k, j] = False`` removes an entry
    from both softmaxes; a row or column whose diagonal entry is masked does not
    contribute; queries with no contributing row are left out of the mean.
    """
    if logprobs.shape[-1] != logprobs.shape[-2]:
        raise ValueError(f"logprobs must be square (C == R), got shape {tuple(logprobs.shape)}")
    row_ce, col_ce, valid, _, _ = _masked_terms(logprobs, mask)
    n = valid.sum(dim=1)
    per_query = 0.5 * (row_ce.sum(dim=1) + col_ce.sum(dim=1)) / n.clamp(min=1)
    return per_query[n > 0].mean()


def stats(logprobs: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Row accuracy, column accuracy (argmax on the diagonal) and MI lower bound.

    Accuracies are over all contributing rows/columns of the batch; the MI lower
    bound is the mean over queries of ``log n_b - loss_b`` where n_b is the number
    of contributing rows (C when unmasked).
    """
    with torch.no_grad():
        row_ce, col_ce, valid, x, mask = _masked_terms(logprobs, mask)
        C = x.shape[-1]
        xm = x.masked_fill(~mask, -math.inf)
        target = torch.arange(C, device=x.device)
        row_hit = (xm.argmax(dim=2) == target) & valid
        col_hit = (xm.argmax(dim=1) == target) & valid
        n = valid.sum(dim=1)
        per_query = 0.5 * (row_ce.sum(dim=1) + col_ce.sum(dim=1)) / n.clamp(min=1)
        has = n > 0
        total = valid.sum().clamp(min=1)
        return {
            "loss": per_query[has].mean(),
            "row_accuracy": row_hit.sum() / total,
            "column_accuracy": col_hit.sum() / total,
            "mi_lower_bound": (torch.log(n[has].to(x.dtype)) - per_query[has]).mean(),
        }


# ---------------------------------------------------------------- the original SAMI functions
# Transcribed from janphilippfranken/sami, src/sami/trainers/sami_trainer.py (the labels are
# made on the scores' device, so that they run on a GPU too); tests/test_reference.py checks
# the functions above against them, and the benchmarks time them.


def original_sami_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """The original trainer's loss of one (C, C) matrix."""
    logsumexp_row = torch.logsumexp(logprobs, dim=1, keepdim=True)
    logsumexp_col = torch.logsumexp(logprobs, dim=0, keepdim=True)
    logits_row = logprobs - logsumexp_row
    logits_col = logprobs - logsumexp_col
    labels_row = torch.arange(logits_row.shape[0], dtype=torch.long, device=logprobs.device)
    labels_col = torch.arange(logits_col.shape[0], dtype=torch.long, device=logprobs.device)
    loss_row = F.cross_entropy(logits_row, labels_row, reduction="mean")
    loss_col = F.cross_entropy(logits_col.t(), labels_col, reduction="mean")
    return (loss_col + loss_row) / 2


def original_batched_sami_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """The original composition over (B, C, C) at once: the mean of the per-query losses."""
    B, C, _ = logprobs.shape
    labels = torch.arange(C, device=logprobs.device).expand(B, C)
    logits_row = logprobs - torch.logsumexp(logprobs, dim=2, keepdim=True)
    logits_col = logprobs - torch.logsumexp(logprobs, dim=1, keepdim=True)
    # cross_entropy takes classes on dim 1: rows score responses j, columns constitutions k.
    loss_row = F.cross_entropy(logits_row.transpose(1, 2), labels)
    loss_col = F.cross_entropy(logits_col, labels)
    return (loss_col + loss_row) / 2


def original_get_batch_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_idx: int = -100) -> torch.Tensor:
    """The original trainer's ``get_batch_logprobs`` (NaN for a sequence with no scored token)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1]
    loss_mask = labels == ignore_idx
    per_token_logprobs = -F.cross_entropy(
        input=logits.reshape(-1, logits.size(-1)), target=labels.reshape(-1), reduction="none"
    ).reshape(labels.shape)
    per_token_logprobs[loss_mask] = 0
    return per_token_logprobs.sum(dim=-1) / torch.logical_not(loss_mask).sum(dim=1)


# ---------------------------------------------------------------- the semantics sami_fast implements


def get_batch_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_idx: int = -100) -> torch.Tensor:
    """Mean log-prob of ``labels[:, 1:]`` under ``logits[:, :-1]`` over non-ignored positions.

    Exactly the original SAMI trainer's semantics (a sequence with no scored token
    divides by zero there and here).
    """
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1]
    loss_mask = labels == ignore_idx
    per_token = -F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1).masked_fill(loss_mask.reshape(-1), 0),
        reduction="none",
    ).reshape(labels.shape)
    per_token = per_token.masked_fill(loss_mask, 0.0)
    return per_token.sum(dim=-1) / (~loss_mask).sum(dim=1)


def shifted_rows(hidden, labels, ignore_index=-100, shift=True, cu_seqlens=None):
    """Flatten to aligned rows: (rows (N, D), targets (N,), segment id (N,), n_segments).

    Row i of the result predicts ``targets[i]``. With ``shift=True`` a position
    predicts the next label of its own sequence; the last position of every
    sequence (or packed segment) predicts nothing (``ignore_index``).
    """
    if cu_seqlens is None:
        B, T, D = hidden.shape
        if shift:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
            T = T - 1
        segment = torch.arange(B, device=hidden.device).repeat_interleave(T)
        return hidden.reshape(B * T, D), labels.reshape(B * T), segment, B
    # One sequence at a time (a formulation of its own, not the implementation's vectorised one).
    offsets = [int(o) for o in cu_seqlens]
    targets, segment = [], []
    for b, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        sequence = labels[start:end]
        if shift and end > start:
            sequence = torch.cat([sequence[1:], sequence.new_full((1,), ignore_index)])
        targets.append(sequence)
        segment.append(torch.full((end - start,), b, dtype=torch.long, device=hidden.device))
    return hidden, torch.cat(targets), torch.cat(segment), len(offsets) - 1


def token_logprobs(rows, weight, targets, ignore_index=-100, bias=None, softcap=None, temperature=1.0):
    """Per-row log p(target) under ``softcap·tanh((rows·Wᵀ + b)/softcap) / temperature``; 0 where ignored."""
    logits = rows @ weight.t()
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    ignored = targets == ignore_index
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(1, targets.masked_fill(ignored, 0).unsqueeze(1)).squeeze(1)
    return picked.masked_fill(ignored, 0.0)


def sequence_logprobs(
    hidden, weight, labels, *, ignore_index=-100, reduction="mean", shift=True,
    bias=None, softcap=None, temperature=1.0, cu_seqlens=None,
):
    """Per-sequence log-probs of ``labels`` from final hidden states and the LM head.

    ``reduction``: "mean" (B,) over scored tokens (the SAMI score), "sum" (B,),
    or "none": per-position log-probs, 0 where nothing is scored; shape (B, T-1)
    for padded input with ``shift=True``, (B, T) without, (N,) for packed input.
    """
    rows, targets, segment, n_seq = shifted_rows(hidden, labels, ignore_index, shift, cu_seqlens)
    per_row = token_logprobs(rows, weight, targets, ignore_index, bias, softcap, temperature)
    if reduction == "none":
        if cu_seqlens is not None:
            return per_row
        return per_row.reshape(hidden.shape[0], -1)
    total = torch.zeros(n_seq, dtype=per_row.dtype, device=per_row.device).index_add(0, segment, per_row)
    if reduction == "sum":
        return total
    count = torch.zeros(n_seq, dtype=per_row.dtype, device=per_row.device).index_add(
        0, segment, (targets != ignore_index).to(per_row.dtype)
    )
    return total / count
