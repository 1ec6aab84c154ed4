"""A thin SAMI trainer: text -> token ids (``encode_sami_batch``) and one optimiser step (``SAMITrainer``).

``encode_sami_batch`` turns B queries, each with C constitutions and R
responses, into the token-id lists ``logprob_matrix`` and ``sami_backward``
take (``encode_prompts`` alone gives the prompts to generate the responses from). ``SAMITrainer.step`` is one SAMI update with gradient caching: memory is
bounded by one micro-batch of (prompt, response) pairs, whatever C*R is.
"""

import math

import torch

from sami_fast.prefix import sami_backward

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


def encode_prompts(tokenizer, constitutions, queries, *, template=None):
    """``prompts[b][k]`` (1-D LongTensor): constitution k + query b, ending where the assistant's answer starts.

    ``constitutions``: B lists of C strings; ``queries``: B strings.
    ``template``: ``None`` picks ``"chat"`` when the tokenizer has a chat
    template, else ``PLAIN_TEMPLATE``. ``"chat"``: the constitution is the system
    message, the query the user message, with the generation prompt; the rendered
    text is tokenized with ``add_special_tokens=False`` (the template writes BOS
    itself where the model wants one). Any other string is a format template with
    ``{constitution}`` and ``{query}`` fields, tokenized with the special tokens
    the tokenizer adds (its BOS, if any).
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


def encode_sami_batch(tokenizer, constitutions, queries, responses, *, template=None, append_eos=False):
    """Token ids for a SAMI batch: ``(prompts, responses_ids)`` as ``logprob_matrix`` takes them.

    ``constitutions``: B lists of C strings; ``queries``: B strings;
    ``responses``: B lists of R strings (R == C for training; ``responses[b][j]``
    was generated under ``constitutions[b][j]``). ``prompts`` is
    ``encode_prompts(tokenizer, constitutions, queries, template=template)``;
    ``responses_ids[b][j]`` (1-D LongTensor) = response j's ids.

    Responses are tokenized without special tokens, so SAMI scores exactly the
    response's own tokens. ``append_eos=True`` appends ``tokenizer.eos_token_id``
    (for responses known to be complete: the score then also rewards stopping
    there); leave it off for responses cut at a token limit. Prompt ++ response
    equals the tokenization of the concatenated text whenever the tokenizer does
    not merge tokens across the boundary (for chat templates: a prefix of the
    templated conversation with the response as the assistant message).
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


class SAMITrainer:
    """One SAMI optimiser step per call: gradient-cached backward, optional clipping, update.

    ``micro_batch_size``: (prompt, response) pairs per chunk of ``sami_backward``
    (bounds peak memory). ``max_grad_norm``: clip the global gradient norm to it
    (a non-finite norm raises instead of updating). The model's train/eval mode
    is left to the caller.
    """

    def __init__(self, model, optimizer, *, micro_batch_size, max_grad_norm=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a causal LM), got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive int (pairs per chunk), got {micro_batch_size!r}")
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool)
            or not isinstance(max_grad_norm, (int, float))
            or not math.isfinite(max_grad_norm)
            or max_grad_norm <= 0
        ):
            raise ValueError(f"max_grad_norm must be None or a positive finite number, got {max_grad_norm!r}")
        self.model = model
        self.optimizer = optimizer
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm

    def step(self, prompts, responses, mask=None) -> dict:
        """One update on a batch (as ``sami_backward`` takes it); returns floats from before the update.

        ``loss``, ``mi_lower_bound`` (log C - loss, averaged over queries),
        ``row_accuracy``, ``column_accuracy``, and ``grad_norm`` (the norm before
        clipping) when ``max_grad_norm`` is set.
        """
        # Gradients left by anything else would be added to this batch's: start from none.
        self.model.zero_grad(set_to_none=True)
        loss, stats = sami_backward(
            self.model, prompts, responses, micro_batch_size=self.micro_batch_size, mask=mask
        )
        result = {"loss": float(loss), **{name: float(value) for name, value in stats.items()}}
        if self.max_grad_norm is not None:
            with_grad = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(with_grad, self.max_grad_norm, error_if_nonfinite=True)
            result["grad_norm"] = float(norm)
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)  # frees the gradients between steps
        return result
