"""A thin SAMI trainer: text -> token ids (``encode_sami_batch``) and one optimiser step (``SAMITrainer``).

``encode_sami_batch`` turns B queries, each with C constitutions and R
responses, into the token-id lists ``logprob_matrix`` and ``sami_backward``
take (``encode_prompts`` alone gives the prompts to generate the responses from).
``SAMITrainer.step`` is one SAMI update with gradient caching: memory is bounded by one
micro-batch of (prompt, response) pairs, whatever C*R is.
"""

import math
import warnings
from collections.abc import Sequence

import torch

from sami_fast.backend import Backend, check_backend
from sami_fast.distributed import all_ranks_agree, gradient_norm
from sami_fast.prefix import PairScorer, sami_backward
from sami_fast.validation import check_positive, check_positive_int

PLAIN_TEMPLATE = "{constitution}\n\nUser: {query}\nAssistant:"


def _check_strings(name: str, values, count=None) -> int:
    """``values`` is a list of non-empty strings (of ``count`` entries when given); returns its length."""
    if not isinstance(values, (list, tuple)) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty list of strings")
    if count is not None and len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but must have {count}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{name}[{i}] is empty (or only whitespace)")
    return len(values)


def _check_groups(name: str, groups, B: int) -> None:
    """``groups`` is B lists of non-empty strings, all of the same length."""
    if not isinstance(groups, (list, tuple)) or len(groups) != B:
        got = len(groups) if isinstance(groups, (list, tuple)) else type(groups).__name__
        raise ValueError(f"{name} must be a list with one list of strings per query ({B}), got {got}")
    width = _check_strings(f"{name}[0]", groups[0])
    for b in range(1, B):
        _check_strings(f"{name}[{b}]", groups[b], width)


def _prompt_text(tokenizer, constitution: str, query: str, template) -> tuple:
    """(text, add_special_tokens): the rendered prompt, ending where the assistant's answer starts."""
    if template == "chat":
        messages = [{"role": "system", "content": constitution}, {"role": "user", "content": query}]
        # A chat template writes its own BOS/special tokens: tokenizing its text must not add them again.
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    return template.format(constitution=constitution, query=query), True


def _ids(tokenizer, text: str, add_special_tokens: bool, where: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    if len(ids) == 0:
        raise ValueError(f"{where} tokenizes to no tokens")
    return torch.tensor(ids, dtype=torch.long)


def _check_template(tokenizer, template):
    """The effective template: ``"chat"`` or a format string (see ``encode_prompts``)."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template is None:
        return "chat" if has_chat else PLAIN_TEMPLATE
    if template == "chat":
        if not has_chat:
            raise ValueError("template='chat' but the tokenizer has no chat_template")
        return template
    if not isinstance(template, str) or "{constitution}" not in template or "{query}" not in template:
        raise ValueError(
            f"template must be None, 'chat' or a format string with {{constitution}} and {{query}}, got {template!r}"
        )
    return template


def encode_prompts(tokenizer, constitutions: Sequence[Sequence[str]], queries: Sequence[str], *,
                   template: str | None = None) -> list[list[torch.Tensor]]:
    """Token ids of the SAMI prompts: constitution k + query b, ending where the assistant's answer starts.

    Args:
        tokenizer: a Hugging Face tokenizer (called on the rendered text; its
            ``apply_chat_template`` for ``"chat"``).
        constitutions: B lists (or tuples) of C non-empty strings, the same C for every
            query: ``constitutions[b]`` are query b's.
        queries: B non-empty strings.
        template: ``None`` (default) picks ``"chat"`` when the tokenizer has a chat
            template, else ``PLAIN_TEMPLATE``. ``"chat"``: the constitution is the system
            message, the query the user message, with the generation prompt; the rendered
            text is tokenized with ``add_special_tokens=False`` (the template writes BOS
            itself where the model wants one). Any other string is a format template with
            ``{constitution}`` and ``{query}`` fields, tokenized with the special tokens
            the tokenizer adds (its BOS, if any).

    Returns:
        ``prompts``: B lists of C 1-D LongTensors, ``prompts[b][k]`` the ids of
        constitution k + query b.

    Raises:
        ValueError: ``queries`` or a ``constitutions[b]`` not a non-empty list or tuple;
            ``constitutions`` without one list per query, or a ``constitutions[b]`` of
            another length than ``constitutions[0]``; an empty (or whitespace-only) string;
            a ``template`` that is neither None, ``"chat"`` nor a format string with both
            fields, or ``"chat"`` for a tokenizer without a chat template; a prompt that
            tokenizes to no tokens.
        TypeError: an entry of ``queries`` or of a ``constitutions[b]`` that is not a str.
    """
    B = _check_strings("queries", queries)
    _check_groups("constitutions", constitutions, B)
    template = _check_template(tokenizer, template)
    prompts = []
    for b, query in enumerate(queries):
        row = []
        for k, constitution in enumerate(constitutions[b]):
            text, add_special_tokens = _prompt_text(tokenizer, constitution, query, template)
            row.append(_ids(tokenizer, text, add_special_tokens, f"prompt of constitutions[{b}][{k}]"))
        prompts.append(row)
    return prompts


def encode_sami_batch(tokenizer, constitutions: Sequence[Sequence[str]], queries: Sequence[str],
                      responses: Sequence[Sequence[str]], *, template: str | None = None,
                      append_eos: bool = False) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Token ids for a SAMI batch: ``(prompts, responses_ids)`` as ``logprob_matrix`` takes them.

    Responses are tokenized without special tokens, so SAMI scores exactly the
    response's own tokens. Prompt ++ response equals the tokenization of the
    concatenated text whenever the tokenizer does not merge tokens across the boundary
    (for chat templates: a prefix of the templated conversation with the response as
    the assistant message).

    Args:
        tokenizer, constitutions, queries, template: as in ``encode_prompts`` (B queries,
            C constitutions each).
        responses: B lists (or tuples) of R non-empty strings, the same R for every query
            (R == C for training; ``responses[b][j]`` was generated under
            ``constitutions[b][j]``).
        append_eos: True appends ``tokenizer.eos_token_id`` to every response (for
            responses known to be complete: the score then also rewards stopping there);
            leave it off (the default) for responses cut at a token limit.

    Returns:
        ``(prompts, responses_ids)``: ``prompts`` is
        ``encode_prompts(tokenizer, constitutions, queries, template=template)``;
        ``responses_ids`` is B lists of R 1-D LongTensors, ``responses_ids[b][j]`` =
        response j's ids (then EOS with ``append_eos``).

    Raises:
        ValueError: as ``encode_prompts``; ``responses`` without one list per query, a
            ``responses[b]`` not a non-empty list or tuple or of another length than
            ``responses[0]``, an empty (or whitespace-only) response, or one that tokenizes
            to no tokens; ``append_eos=True`` with a tokenizer that has no ``eos_token_id``.
        TypeError: as ``encode_prompts``; a response that is not a str.
    """
    prompts = encode_prompts(tokenizer, constitutions, queries, template=template)
    _check_groups("responses", responses, len(queries))
    eos = []
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no eos_token_id")
        eos = [tokenizer.eos_token_id]
    response_ids = [
        [
            torch.cat([_ids(tokenizer, text, False, f"responses[{b}][{j}]"), torch.tensor(eos, dtype=torch.long)])
            for j, text in enumerate(group)
        ]
        for b, group in enumerate(responses)
    ]
    return prompts, response_ids


class MasterWeights:
    """fp32 master copies of a low-precision model's trainable parameters.

    At a small learning rate most updates of a bf16 weight round to nothing
    (bf16 keeps 8 significant bits: an update below half a unit in the last place
    of the weight is lost). The optimizer steps these fp32 copies instead
    (build it over ``master.parameters()``); ``SAMITrainer`` moves the model's
    gradients onto them before the update and rounds the result back into the
    model after it.

    Args:
        model: the module whose parameters with ``requires_grad`` get fp32 copies.

    Attributes:
        model_parameters: the model's trainable parameters, in ``model.parameters()`` order.
        master: their fp32 copies (detached clones that require grad), in the same order.

    Raises:
        ValueError: no parameter of ``model`` requires grad.
    """

    def __init__(self, model: torch.nn.Module):
        self.model_parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.model_parameters:
            raise ValueError("MasterWeights: the model has no trainable parameter")
        self.master = [p.detach().float().clone().requires_grad_() for p in self.model_parameters]

    def parameters(self) -> list[torch.Tensor]:
        """The fp32 master copies (the list itself, not a copy): what the optimizer steps."""
        return self.master

    def gradients_to_master(self) -> None:
        """Set each master copy's ``.grad`` to its model parameter's gradient in fp32 (None where it has none)."""
        for master, param in zip(self.master, self.model_parameters):
            master.grad = None if param.grad is None else param.grad.float()

    def master_to_model(self) -> None:
        """Copy the master copies into the model's parameters, rounded to their dtype (outside autograd)."""
        with torch.no_grad():
            for master, param in zip(self.master, self.model_parameters):
                param.copy_(master)

    def zero_grad(self) -> None:
        """Drop the master copies' gradients (``.grad = None``)."""
        for master in self.master:
            master.grad = None

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        """``{"master": [...]}``: detached clones of the master copies, in order."""
        return {"master": [m.detach().clone() for m in self.master]}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        """Copy ``state["master"]`` (``state_dict``'s format) into the master copies, in place.

        Args:
            state: ``{"master": tensors}``, one tensor per master copy, in order.

        Raises:
            KeyError: ``state`` has no ``"master"``.
            ValueError: ``state["master"]`` holds another number of tensors than there are copies.
            RuntimeError: a saved tensor whose shape does not broadcast to its copy's (``copy_``).
        """
        with torch.no_grad():
            for master, saved in zip(self.master, state["master"], strict=True):
                master.copy_(saved)


def _check_optional_positive(name: str, value) -> None:
    """None or a positive finite number; every bad value is a ValueError here."""
    try:
        check_positive(name, value, allow_none=True)
    except TypeError as error:
        raise ValueError(f"{name} must be None or a positive finite number, got {value!r}") from error


class SAMITrainer:
    """SAMI optimiser steps: gradient-cached backward, a finiteness check, optional clipping, update.

    ``step`` is one update on one batch; ``accumulate`` then ``apply`` is the same
    over several batches (gradient accumulation: ``accumulate`` adds each batch's
    gradient with ``weight``, its share of the step's queries).

    A step whose loss or gradient norm is not finite (e.g. a too-large learning
    rate) is skipped with a warning: the weights and the optimizer state are left
    exactly as they were, and the result says ``skipped``. The model's
    train/eval mode is left to the caller.

    With a ``scorer`` in ``DistributedDataParallel`` or the FSDP2 root, every rank calls
    ``accumulate``/``apply`` in step: only the last ``accumulate`` of an optimiser step
    passes ``sync_gradients=True``; the gradients the ranks reduce are averaged, so
    weight each rank's batches by world size x their share of the step's queries;
    whether a step is skipped is decided by all ranks together. Under FSDP2 the ranks
    must also make the same calls with the same number of chunks (``min_chunks`` pads;
    ``sami_fast.distributed.Parallel.lockstep``).

    Args:
        model: the causal LM being trained (a ``torch.nn.Module``).
        optimizer: a ``torch.optim.Optimizer`` over the model's trainable parameters, or
            over ``master_weights.parameters()``.
        micro_batch_size: (prompt, response) pairs per chunk of ``sami_backward``
            (bounds peak memory); a positive int.
        max_grad_norm: None (default: no clipping) or a positive finite number: clip the
            global gradient norm to it.
        master_weights: None (default), or a ``MasterWeights`` of the model when the
            optimizer steps fp32 master copies.
        reduction: ``"mean"`` (default) or ``"sum"``: mean or summed response log-probs
            (checked by ``sami_backward``, on the first ``accumulate``).
        scorer: None (default: forwards run on ``model``), or the module the model's
            forwards run through (``sami_fast.distributed``): a ``PairScorer`` of
            ``model``, possibly in ``DistributedDataParallel``, or the FSDP2 root (then
            ``model``'s parameters are shards and the optimizer steps them).
        backend: of the fused LM head and the loss, as in ``sami_fast.sequence_logprobs``.
        logits_budget: bytes of LM-head logits each chunk may keep for its backward
            instead of recomputing them (torch backend), as in ``sami_backward``; 0
            (default) keeps none.

    Raises:
        TypeError: ``model`` not a ``torch.nn.Module``, ``optimizer`` not a
            ``torch.optim.Optimizer``, ``master_weights`` neither None nor a ``MasterWeights``.
        ValueError: a bad ``micro_batch_size``, ``max_grad_norm``, ``backend`` or ``logits_budget``; a
            ``scorer`` that is not a ``PairScorer`` of ``model`` (possibly in
            ``DistributedDataParallel`` or sharded).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, micro_batch_size: int,
                 max_grad_norm: float | None = None, master_weights: MasterWeights | None = None,
                 reduction: str = "mean", scorer: torch.nn.Module | None = None, backend: Backend | None = None,
                 logits_budget: int = 0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a causal LM), got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_positive_int("micro_batch_size", micro_batch_size, meaning="pairs per chunk")
        _check_optional_positive("max_grad_norm", max_grad_norm)
        check_backend(backend)
        check_positive_int("logits_budget", logits_budget, allow_zero=True, meaning="bytes")
        self.backend = backend
        self.logits_budget = logits_budget
        if master_weights is not None and not isinstance(master_weights, MasterWeights):
            raise TypeError(f"master_weights must be None or a MasterWeights, got {type(master_weights).__name__}")
        inner = scorer.module if isinstance(scorer, torch.nn.parallel.DistributedDataParallel) else scorer
        if scorer is not None and not (isinstance(inner, PairScorer) and inner.model is model):
            raise ValueError("scorer must be a PairScorer of model (possibly in DistributedDataParallel or sharded)")
        self.scorer = scorer
        # A wrapped scorer reduces gradients across ranks; the ranks must then agree on skipping a step.
        self._distributed = scorer is not None and type(scorer) is not PairScorer
        self.model = model
        self.optimizer = optimizer
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.master_weights = master_weights
        self.reduction = reduction
        self._losses = []

    def accumulate(self, prompts: list[list[torch.Tensor]], responses: list[list[torch.Tensor]],
                   mask: torch.Tensor | None = None, *, weight: float = 1.0, sync_gradients: bool = True,
                   min_chunks: int | None = None) -> dict[str, float]:
        """Add ``weight`` times this batch's SAMI gradient to ``.grad``; returns its (unweighted) loss and stats.

        The loss is kept for the finiteness check of the next ``apply``.

        Args:
            prompts: B lists of C 1-D int64 tensors, as ``sami_backward`` takes them
                (e.g. from ``encode_sami_batch``).
            responses: B lists of C 1-D int64 tensors (R == C).
            mask: None or (B, C, C) bool, as in ``sami_loss``.
            weight: the gradient added is that of ``weight * loss`` (default 1.0; with
                accumulation, the batch's share of the step's queries).
            sync_gradients, min_chunks: as in ``sami_backward`` (for a distributed ``scorer``).

        Returns:
            floats: ``loss`` (unweighted) and ``sami_loss``'s stats (``mi_lower_bound``,
            ``row_accuracy``, ``column_accuracy``).

        Raises:
            TypeError, ValueError, FloatingPointError: as ``sami_backward`` (e.g. C != R, a
                bad ``reduction``, ``weight``, ``mask`` or ``min_chunks``, a NaN/inf score).
        """
        loss, stats = sami_backward(
            self.scorer or self.model, prompts, responses, micro_batch_size=self.micro_batch_size, mask=mask,
            reduction=self.reduction, loss_weight=weight, sync_gradients=sync_gradients, min_chunks=min_chunks,
            backend=self.backend, logits_budget=self.logits_budget,
        )
        self._losses.append(loss)
        return {"loss": float(loss), **{name: float(value) for name, value in stats.items()}}

    def _stepped_parameters(self) -> list:
        """The parameters the optimizer steps, with a gradient: the fp32 master copies when there are master weights."""
        if self.master_weights is not None:
            self.master_weights.gradients_to_master()
            return [p for p in self.master_weights.parameters() if p.grad is not None]
        return [p for p in self.model.parameters() if p.grad is not None]

    def apply(self) -> dict[str, float | bool]:
        """The update from the gradients accumulated since the last ``apply``; then drops them.

        With master weights the gradients move onto the fp32 copies first, and the
        updated copies are rounded back into the model afterwards. When a loss of this
        step's ``accumulate`` calls or the gradient norm is not finite, the update is
        skipped: the weights and the optimizer state are left as they were.

        Returns:
            ``grad_norm`` (float: the global norm before clipping; 0.0 when no parameter
            has a gradient) and ``skipped`` (bool).

        Warns:
            RuntimeWarning: the step was skipped.
        """
        stepped = self._stepped_parameters()
        losses_finite = all(bool(torch.isfinite(loss)) for loss in self._losses)
        if self._distributed:
            losses_finite = all_ranks_agree(losses_finite, next(self.model.parameters()).device)
        self._losses = []
        # One fused reduction over all gradients; a NaN or inf anywhere makes the norm non-finite.
        norm = gradient_norm([p.grad for p in stepped]) if stepped else 0.0
        if not (losses_finite and math.isfinite(norm)):
            warnings.warn(
                f"SAMI step skipped: the {'gradient norm' if losses_finite else 'loss'} is not finite "
                f"(grad norm {norm}); weights and optimizer state are unchanged",
                RuntimeWarning, stacklevel=2,
            )
            self._zero_grad()
            return {"grad_norm": norm, "skipped": True}
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(stepped, self.max_grad_norm, torch.tensor(norm), foreach=True)
        self.optimizer.step()
        if self.master_weights is not None:
            self.master_weights.master_to_model()
        self._zero_grad()  # frees the gradients between steps
        return {"grad_norm": norm, "skipped": False}

    def _zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)
        if self.master_weights is not None:
            self.master_weights.zero_grad()

    def step(self, prompts: list[list[torch.Tensor]], responses: list[list[torch.Tensor]],
             mask: torch.Tensor | None = None) -> dict[str, float | bool]:
        """One update on a batch (as ``sami_backward`` takes it); returns floats from before the update.

        Gradients left in ``.grad`` by anything else are dropped first.

        Args:
            prompts, responses, mask: as in ``accumulate``.

        Returns:
            ``loss``, ``mi_lower_bound`` (log C - loss, averaged over queries),
            ``row_accuracy``, ``column_accuracy``, ``grad_norm`` (the norm before
            clipping), all floats, and ``skipped`` (True when the step was not applied).

        Raises:
            TypeError, ValueError, FloatingPointError: as ``accumulate``.

        Warns:
            RuntimeWarning: the step was skipped (see ``apply``).
        """
        # Gradients left by anything else would be added to this batch's: start from none.
        self._zero_grad()
        self._losses = []
        result = self.accumulate(prompts, responses, mask)
        return {**result, **self.apply()}
