"""Exact or refused: every Hugging Face architecture is scored exactly (fp64-oracle rule) or refused clearly.

The verified list (``sami_fast.hf.VERIFIED_MODEL_TYPES``) is tested here with tiny
random configs, one model per type built with a fixed seed: ``logprob_matrix``
on prompts and responses of different lengths against the same model's plain
full-sequence computation, scores and the parameter gradients of ``sami_loss``.
Then the self-check for unlisted types, the refusals, and non-finite results.
"""

import copy

import pytest
import torch
from transformers import (
    AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Llama4ForCausalLM,
)
from transformers.masking_utils import eager_mask
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.llama.modeling_llama import eager_attention_forward

import sami_fast.hf
from oracle import assert_grads_oracle_close, assert_oracle_close, full_sequence_matrix, oracle_excess
from sami_fast import logprob_matrix, sami_backward, sami_loss
from sami_fast.hf import UnsupportedArchitectureError, architecture_status, trust_architecture
from test_hf import VOCAB

# Gradients: where the plain computation happens to round well, a parameter's error reaches 2.7x plain over this
# list (4.1x with eager attention: a summed bias); a real error (a shifted position, a lost multiplier) is orders of
# magnitude more.
GRADIENT_K = 8

SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
           num_key_value_heads=4)

# case -> (model_type, config overrides). Head rescalings are set away from 1 so that a lost one would show.
ARCHITECTURES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "mixtral": ("mixtral", MOE),
    "qwen2": ("qwen2", {}),
    "qwen2_moe": ("qwen2_moe", {**MOE, "shared_expert_intermediate_size": 32}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "qwen3_moe": ("qwen3_moe", {**MOE, "head_dim": 16}),
    "phi": ("phi", {}),
    "phi3": ("phi3", {}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 32, "final_logit_softcapping": 3.0}),
    "gemma3_text": ("gemma3_text", {"head_dim": 16, "sliding_window": 32, "final_logit_softcapping": 3.0}),
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("gpt_neox", {}),
    "gptj": ("gptj", {"rotary_dim": 8}),
    "gpt_bigcode": ("gpt_bigcode", {}),
    "opt": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "falcon": ("falcon", {}),
    "falcon-alibi": ("falcon", {"alibi": True}),
    "bloom": ("bloom", {}),
    "mpt": ("mpt", {"max_seq_len": 64}),  # ALiBi on the key index
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "olmoe": ("olmoe", MOE),
    "stablelm": ("stablelm", {}),
    "cohere": ("cohere", {"logit_scale": 0.25}),
    "granite": ("granite", {"logits_scaling": 4.0}),
    "granitemoe": ("granitemoe", {**MOE, "logits_scaling": 4.0}),
    "hyperclovax": ("hyperclovax", {"logits_scaling": 4.0}),  # multiplies by logits_scaling
    "smollm3": ("smollm3", {}),
    "starcoder2": ("starcoder2", {}),
    "deepseek_v3": ("deepseek_v3", {**MOE, **MLA, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
                                    "first_k_dense_replace": 1}),
    "minicpm3": ("minicpm3", {**MLA, "dim_model_base": 16}),  # hidden states / (hidden_size / dim_model_base)
    "glm4": ("glm4", {"head_dim": 16}),
    "exaone4": ("exaone4", {"head_dim": 16}),
    "helium": ("helium", {"head_dim": 16}),
    "nemotron": ("nemotron", {"head_dim": 16}),
    "ernie4_5": ("ernie4_5", {"head_dim": 16}),
    "llama4_text": ("llama4_text", {"head_dim": 16, "num_local_experts": 2, "intermediate_size_mlp": 128,
                                    "no_rope_layers": [1, 0]}),  # a NoPE layer with attention temperature tuning
    # Shared-KV layers have no cache: they read what their producer layer computes in the same forward.
    "gemma3n_text": ("gemma3n_text", {"head_dim": 16, "num_hidden_layers": 4, "num_kv_shared_layers": 2,
                                      "layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": 32,
                                      "activation_sparsity_pattern": [0.0] * 4, "hidden_size_per_layer_input": 8,
                                      "vocab_size_per_layer_input": VOCAB, "laurel_rank": 8, "altup_num_inputs": 2}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: a second thread only adds synchronisation (and spinning, on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(model_type, **overrides):
    """A tiny random causal LM of ``model_type``, the same weights for the same arguments (eval mode).

    The model's default attention (sdpa where it has it); eager experts: torch's grouped matmul has no float64
    kernel for the oracle.
    """
    config = CONFIG_MAPPING[model_type](**{**SMALL, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    return model.eval()


def uneven_problem(seed=0, prompt_lengths=(3, 8), response_lengths=(2, 6)):
    """One query, two prompts and two responses of different lengths (the shorter prompt is offset by padding)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [[torch.randint(3, VOCAB, (n,), generator=generator) for n in prompt_lengths]]
    responses = [[torch.randint(3, VOCAB, (n,), generator=generator) for n in response_lengths]]
    return prompts, responses


def scores_and_grads(model, matrix_fn):
    """``matrix_fn()`` (detached) and the parameter gradients of its sami_loss, from zero; zeros where no
    gradient arrives (an expert no token was routed to)."""
    model.zero_grad(set_to_none=True)
    matrix = matrix_fn()
    sami_loss(matrix).backward()
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return matrix.detach(), grads


def assert_exact(model, prompts, responses):
    """Scores and sami_loss gradients of ``logprob_matrix`` under the fp64-oracle rule (truth: ``model.double()``)."""
    model64 = copy.deepcopy(model).double()
    ours, got = scores_and_grads(model, lambda: logprob_matrix(model, prompts, responses))
    plain, plain_grads = scores_and_grads(model, lambda: full_sequence_matrix(model, prompts, responses))
    truth, truth_grads = scores_and_grads(model64, lambda: full_sequence_matrix(model64, prompts, responses))
    assert_oracle_close(ours, plain, truth, what="scores")
    reached = [name for name, grad in truth_grads.items() if grad.abs().max() > 0]
    assert len(reached) >= len(truth_grads) // 2, "most parameters must receive a gradient"
    for name in set(truth_grads) - set(reached):
        assert not got[name].any(), f"{name}: gradient where the reference has none"
    assert_grads_oracle_close(*({name: grads[name] for name in reached} for grads in (got, plain_grads, truth_grads)),
                              k=GRADIENT_K)


@pytest.mark.parametrize("case", ARCHITECTURES)
def test_verified_architecture_is_exact(case):
    model_type, overrides = ARCHITECTURES[case]
    model = tiny_model(model_type, **overrides)
    assert architecture_status(model) == "verified"
    assert_exact(model, *uneven_problem())


def test_the_verified_list_is_what_is_tested():
    assert {model_type for model_type, _ in ARCHITECTURES.values()} == sami_fast.hf.VERIFIED_MODEL_TYPES


# --- The self-check: architectures outside the list are checked on their own batch on first use ---------------

def _absolute_key_bias_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Llama's eager attention plus a bias on the key's absolute cache index: wrong under shared prompts."""
    key_index = torch.arange(key.shape[-2], device=key.device, dtype=query.dtype)
    return eager_attention_forward(module, query, key, value, attention_mask + torch.cos(key_index), scaling,
                                   dropout, **kwargs)


AttentionInterface.register("absolute_key_bias", _absolute_key_bias_attention)
AttentionMaskInterface.register("absolute_key_bias", eager_mask)


class CustomLlama(LlamaForCausalLM):
    """A causal LM class of the user's own (a subclass may change anything): not verified, self-checked."""


def custom_llama(attn="eager"):
    config = LlamaConfig(**SMALL)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return CustomLlama._from_config(config, attn_implementation=attn).eval()


def _count_self_checks(monkeypatch):
    calls = []
    check = sami_fast.hf.self_check
    monkeypatch.setattr(sami_fast.hf, "self_check", lambda *args: calls.append(1) or check(*args))
    return calls


def test_self_check_accepts_an_exact_unlisted_model_once(monkeypatch):
    model = custom_llama()
    calls = _count_self_checks(monkeypatch)
    prompts, responses = uneven_problem()
    assert architecture_status(model) == "unchecked"
    assert_exact(model, prompts, responses)
    sami_backward(model, prompts, responses, micro_batch_size=2)
    assert architecture_status(model) == "self-checked" and len(calls) == 1  # cached per model


def test_self_check_refuses_attention_on_the_absolute_key_index(monkeypatch):
    model = custom_llama("absolute_key_bias")
    prompts, responses = uneven_problem()
    # Not vacuous: without the check the scores are far off the oracle.
    ours = logprob_matrix(model, prompts, responses, self_check=False)
    with torch.no_grad():
        truth = full_sequence_matrix(copy.deepcopy(model).double(), prompts, responses)
        error, allowed = oracle_excess(ours, full_sequence_matrix(model, prompts, responses), truth)
    assert error > 100 * allowed
    calls = _count_self_checks(monkeypatch)
    refused = r"CustomLlama \(model_type 'llama'\).*failed the self-check"
    with pytest.raises(UnsupportedArchitectureError, match=refused):
        logprob_matrix(model, prompts, responses)
    with pytest.raises(UnsupportedArchitectureError, match="failed the self-check"):
        sami_backward(model, prompts, responses, micro_batch_size=2)
    with pytest.raises(UnsupportedArchitectureError, match="failed the self-check"):
        architecture_status(model)
    assert len(calls) == 1  # the refusal is cached too


def test_self_check_sees_a_padding_offset_when_all_prompts_have_one_length():
    prompts, responses = uneven_problem(prompt_lengths=(6, 6))
    with pytest.raises(UnsupportedArchitectureError, match="failed the self-check"):
        logprob_matrix(custom_llama("absolute_key_bias"), prompts, responses)


def test_trusted_model_skips_the_self_check(monkeypatch):
    model = custom_llama("absolute_key_bias")
    calls = _count_self_checks(monkeypatch)
    trust_architecture(model)
    assert architecture_status(model) == "trusted"
    logprob_matrix(model, *uneven_problem())
    assert calls == []


def test_self_check_refuses_a_model_that_cannot_run_it():
    model = custom_llama()
    model.forward = lambda *args, **kwargs: None  # full sequences cannot be scored through it
    with pytest.raises(UnsupportedArchitectureError, match=r"CustomLlama.*self-check failed with AttributeError"):
        logprob_matrix(model, *uneven_problem())


def test_self_check_restores_modes_and_rng():
    model = custom_llama()
    model.train()
    model.model.layers[0].eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        logprob_matrix(model, *uneven_problem())
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


# --- Refused before any work ------------------------------------------------------------------------------------

NON_KV_CACHES = {
    "falcon_h1": {"head_dim": 16, "lm_head_multiplier": 0.25},  # attention + Mamba in every layer
    "jamba": {"num_experts": 2, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1},
    "bamba": {},
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "qwen3_next": {"head_dim": 16},
    "granitemoehybrid": {},
    "nemotron_h": {},
    "mamba": {},
}


def _assert_refused_before_any_work(model, message, prompts=None, responses=None):
    decoder_calls = []
    handle = model.base_model.register_forward_pre_hook(lambda *args: decoder_calls.append(1))
    try:
        if prompts is None:
            prompts, responses = uneven_problem()
        with pytest.raises(UnsupportedArchitectureError, match=message):
            logprob_matrix(model, prompts, responses)
        with pytest.raises(UnsupportedArchitectureError, match=message):
            sami_backward(model, prompts, responses, micro_batch_size=2)
    finally:
        handle.remove()
    assert decoder_calls == []


@pytest.mark.parametrize("model_type", NON_KV_CACHES)
def test_cache_layers_beyond_keys_and_values_are_refused(model_type):
    model = tiny_model(model_type, **NON_KV_CACHES[model_type])
    message = rf"\(model_type '{model_type}'\): cache layer \d+ is a \w+, which holds state other than per-token keys"
    _assert_refused_before_any_work(model, message)
    with pytest.raises(UnsupportedArchitectureError, match=message):
        architecture_status(model)


def test_unreachable_decoder_is_refused():
    class HiddenDecoderLlama4(Llama4ForCausalLM):
        """Llama 4 (base_model is the causal LM itself) with its decoder under a name the scorer does not know."""

        def get_input_embeddings(self):
            return self.stack.embed_tokens

    model_type, overrides = ARCHITECTURES["llama4_text"]
    model = tiny_model(model_type, **overrides)
    model.stack = model.model
    del model.model
    model.__class__ = HiddenDecoderLlama4
    with pytest.raises(UnsupportedArchitectureError, match=r"HiddenDecoderLlama4.*decoder stack cannot be reached"):
        logprob_matrix(model, *uneven_problem())


def test_llama4_temperature_tuning_is_refused_beyond_floor_scale():
    model_type, overrides = ARCHITECTURES["llama4_text"]
    model = tiny_model(model_type, **{**overrides, "floor_scale": 8})
    assert_exact(model, *uneven_problem(prompt_lengths=(2, 4), response_lengths=(1, 3)))  # length 7 = floor_scale - 1
    _assert_refused_before_any_work(model, r"Llama4ForCausalLM.*length 14 exceeds floor_scale - 1 = 7")


def test_llama4_chunked_attention_is_refused_beyond_a_chunk():
    model_type, overrides = ARCHITECTURES["llama4_text"]
    model = tiny_model(model_type, **{**overrides, "attention_chunk_size": 10})
    _assert_refused_before_any_work(model, "length 14 exceeds the model's attention chunk size 10")


# --- Non-finite results and frozen models -----------------------------------------------------------------------

BAD_TOKEN = 999


def _problem_with_bad_token():
    """Two prompts, two responses; only responses[0][1] holds BAD_TOKEN."""
    prompts, responses = uneven_problem()
    responses[0][1] = torch.cat([responses[0][1][:2], torch.tensor([BAD_TOKEN]), responses[0][1][2:]])
    assert all(BAD_TOKEN not in ids for ids in prompts[0] + responses[0][:1])
    return prompts, responses


@pytest.mark.parametrize("entry", ["logprob_matrix", "sami_backward"])
def test_non_finite_weight_is_named(entry):
    model = custom_llama()
    trust_architecture(model)
    with torch.no_grad():
        model.model.embed_tokens.weight[BAD_TOKEN] = float("nan")
    prompts, responses = _problem_with_bad_token()
    message = (r"score \[0, 0, 1\] \(responses\[0\]\[1\] given prompts\[0\]\[0\]\) is nan: the model's weights are "
               r"non-finite \(model.embed_tokens.weight holds NaN or inf\)")
    with pytest.raises(FloatingPointError, match=message):
        if entry == "logprob_matrix":
            logprob_matrix(model, prompts, responses, micro_batch_size=3)
        else:
            sami_backward(model, prompts, responses, micro_batch_size=3)


def test_non_finite_hidden_states_are_named():
    model = custom_llama()
    trust_architecture(model)
    # An overflow: finite weights, an infinite activation on the sequences holding BAD_TOKEN.
    model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: out.masked_fill((args[0] == BAD_TOKEN)[..., None], float("inf")))
    with pytest.raises(FloatingPointError, match=r"score \[0, 0, 1\] .*hidden states are non-finite.*all weights "
                                                 "are finite"):
        logprob_matrix(model, *_problem_with_bad_token())


def test_sami_backward_on_a_frozen_model():
    model = custom_llama()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"sami_backward: no parameter of model \(CustomLlama\) requires grad"):
        sami_backward(model, *uneven_problem(), micro_batch_size=2)
