"""logprob_matrix / sami_backward on tiny random HF models vs the full-sequence computation, in fp32 and in fp64."""

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM, CohereConfig, Gemma2Config, GPT2Config, GraniteConfig, LlamaConfig, LlamaModel,
)

import sami_fast.hf
import sami_fast.prefix
from oracle import (K_MODEL_GRADS, assert_grads_oracle_close, assert_matrix_oracle_close,
                    assert_model_grads_oracle_close, assert_stats_oracle_close, fp64_twin, full_sequence_grads,
                    grads_after, oracle_excess, parameter_grads, streamed_full_sequence_grads)
from sami_fast import logprob_matrix, reference, sami_backward

VOCAB = 1000


def tiny_llama(attn="sdpa", dropout=0.0):
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, attention_dropout=dropout,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def tiny_gpt2(attn="sdpa", dropout=0.0):
    # Fused c_attn Conv1D projections, absolute position embeddings, tied head.
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def tiny_gemma2():
    # Final-logit softcapping and (alternating) sliding-window layers.
    config = Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
        sliding_window=32, final_logit_softcapping=3.0,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
_LLAMA = tiny_llama()  # shared by the tests that only read it
_LLAMA64 = fp64_twin(_LLAMA)  # its float64 twin: the ground truth


def random_problem(generator, B, C, R, prompt_len=(2, 9), response_len=(1, 7)):
    def ids(lo, hi):
        n = int(torch.randint(lo, hi, (), generator=generator))
        return torch.randint(0, VOCAB, (n,), generator=generator)

    prompts = [[ids(*prompt_len) for _ in range(C)] for _ in range(B)]
    responses = [[ids(*response_len) for _ in range(R)] for _ in range(B)]
    return prompts, responses


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matrix_and_grads_match_full_sequence(arch, attn):
    model = MODELS[arch](attn)
    prompts, responses = random_problem(torch.Generator().manual_seed(1), B=2, C=3, R=2)  # rectangular
    weights = torch.randn(2, 3, 2)
    twin = fp64_twin(model)
    matrix = logprob_matrix(model, prompts, responses)
    assert matrix.shape == (2, 3, 2)
    assert_matrix_oracle_close(matrix, model, prompts, responses, twin=twin)
    got = parameter_grads(model, lambda: (logprob_matrix(model, prompts, responses) * weights).sum())
    assert_model_grads_oracle_close(got, model, lambda m: (m * weights).sum(), prompts, responses, twin=twin)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), C=st.integers(1, 3), R=st.integers(1, 3))
def test_matrix_matches_full_sequence_random_shapes(seed, B, C, R):
    model = _LLAMA
    prompts, responses = random_problem(torch.Generator().manual_seed(seed), B, C, R)
    with torch.no_grad():
        assert_matrix_oracle_close(logprob_matrix(model, prompts, responses), model, prompts, responses, twin=_LLAMA64)


def test_single_token_responses_use_only_the_prompt_state():
    prompts, _ = random_problem(torch.Generator().manual_seed(2), B=2, C=2, R=3)
    responses = [[torch.tensor([t]) for t in (5, 77, 999)] for _ in range(2)]
    with torch.no_grad():
        assert_matrix_oracle_close(logprob_matrix(_LLAMA, prompts, responses), _LLAMA, prompts, responses,
                                   twin=_LLAMA64)


def test_softcapped_sliding_window_model():
    model = tiny_gemma2()
    prompts, responses = random_problem(torch.Generator().manual_seed(3), B=1, C=2, R=2)
    weights = torch.randn(1, 2, 2)
    twin = fp64_twin(model)
    assert_matrix_oracle_close(logprob_matrix(model, prompts, responses), model, prompts, responses, twin=twin)
    got = parameter_grads(model, lambda: (logprob_matrix(model, prompts, responses) * weights).sum())
    assert_model_grads_oracle_close(got, model, lambda m: (m * weights).sum(), prompts, responses, twin=twin)
    long_prompt = [[torch.randint(0, VOCAB, (30,)), prompts[0][1]]]
    with pytest.raises(ValueError, match="sliding window"):
        logprob_matrix(model, long_prompt, [[torch.arange(5), torch.arange(3)]])


@pytest.mark.parametrize("config", [
    GraniteConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, logits_scaling=4.0),
    CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, logit_scale=0.25),
], ids=["granite_logits_scaling", "cohere_logit_scale"])
def test_models_that_rescale_their_logits(config):
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    prompts, responses = random_problem(torch.Generator().manual_seed(7), B=1, C=2, R=2)
    with torch.no_grad():
        assert_matrix_oracle_close(logprob_matrix(model, prompts, responses), model, prompts, responses)


@pytest.mark.parametrize("micro_batch_size", [1, 4, 7])
def test_micro_batches_match_full_sequences(micro_batch_size):
    prompts, responses = random_problem(torch.Generator().manual_seed(4), B=2, C=3, R=3)
    weights = torch.randn(2, 3, 3)
    with torch.no_grad():
        chunked = logprob_matrix(_LLAMA, prompts, responses, micro_batch_size=micro_batch_size)
    assert_matrix_oracle_close(chunked, _LLAMA, prompts, responses, twin=_LLAMA64)
    parts = parameter_grads(
        _LLAMA,
        lambda: (logprob_matrix(_LLAMA, prompts, responses, micro_batch_size=micro_batch_size) * weights).sum(),
    )
    assert_model_grads_oracle_close(parts, _LLAMA, lambda m: (m * weights).sum(), prompts, responses, twin=_LLAMA64)


def test_pad_token_does_not_change_scores():
    prompts, responses = random_problem(torch.Generator().manual_seed(5), B=2, C=2, R=2)
    with torch.no_grad():
        for pad_token_id in (7, 998):
            assert_matrix_oracle_close(logprob_matrix(_LLAMA, prompts, responses, pad_token_id=pad_token_id),
                                       _LLAMA, prompts, responses, twin=_LLAMA64, what=f"pad {pad_token_id}")


def test_invalid_pad_token_in_the_config_falls_back():
    # Old Llama configs carry pad_token_id = -1; padding is masked, so any valid id serves.
    model = tiny_llama()
    prompts, responses = random_problem(torch.Generator().manual_seed(5), B=2, C=2, R=2)
    with torch.no_grad():
        model.config.pad_token_id = -1
        assert_matrix_oracle_close(logprob_matrix(model, prompts, responses), model, prompts, responses)
        sami_backward(model, prompts, responses, micro_batch_size=2)


def _decoder_batches(model, run):
    """The batch sizes (sequences, tokens) of every decoder forward that ``run()`` makes."""
    calls = []
    handle = model.base_model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        run()
    finally:
        handle.remove()
    return calls


def test_one_forward_for_all_prompts_and_one_row_of_responses_per_prompt():
    B, C, R = 2, 3, 2
    prompts, responses = random_problem(torch.Generator().manual_seed(9), B, C, R)
    calls = _decoder_batches(_LLAMA, lambda: logprob_matrix(_LLAMA, prompts, responses))
    longest_prompt = max(len(p) for group in prompts for p in group)
    # Each response runs without its last token (it predicts nothing), after the others of its prompt in one row.
    row_width = max(sum(len(r) - 1 for r in group) for group in responses)
    assert row_width <= longest_prompt  # a row holds up to the prompt width: here all R responses
    assert calls == [(B * C, longest_prompt), (B * C, row_width)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_responses_beyond_a_row_continue_in_further_rows(attn):
    # Rows hold up to max(prompt width, longest fed response) tokens: 3 responses of 4 fed tokens after prompts of
    # at most 5 take one row each, a shorter one shares a row; scores and gradients stay exact.
    model = tiny_llama(attn)
    generator = torch.Generator().manual_seed(12)
    prompts = [[torch.randint(0, VOCAB, (n,), generator=generator) for n in (3, 5)]]
    responses = [[torch.randint(0, VOCAB, (n,), generator=generator) for n in (5, 5, 2, 5)]]
    weights = torch.randn(1, 2, 4)
    calls = _decoder_batches(model, lambda: logprob_matrix(model, prompts, responses))
    assert calls == [(2, 5), (2 * 3, 5)]  # per prompt: [r0], [r1 r2], [r3]
    twin = fp64_twin(model)
    got = parameter_grads(model, lambda: (logprob_matrix(model, prompts, responses) * weights).sum())
    assert_model_grads_oracle_close(got, model, lambda m: (m * weights).sum(), prompts, responses, twin=twin)


@pytest.mark.parametrize("micro_batch_size", [2, 3])
def test_sami_backward_never_runs_more_than_a_chunk(micro_batch_size, monkeypatch):
    # Constant memory: every forward of the gradient cache holds at most one chunk of pairs
    # (and the prompts that chunk needs), however large C*R is.
    B, C = 1, 4
    prompts, responses = random_problem(torch.Generator().manual_seed(10), B, C, C)
    scored = []
    score = sami_fast.prefix.score_responses
    monkeypatch.setattr(sami_fast.prefix, "score_responses",
                        lambda parts, states, pair_prompt, *args, **kwargs: scored.append(len(pair_prompt))
                        or score(parts, states, pair_prompt, *args, **kwargs))
    calls = _decoder_batches(
        _LLAMA, lambda: sami_backward(_LLAMA, prompts, responses, micro_batch_size=micro_batch_size)
    )
    assert calls and max(sequences for sequences, _ in calls) <= micro_batch_size
    assert max(scored) <= micro_batch_size
    assert sum(scored) == 2 * B * C * C  # every pair once without a graph and once with


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("micro_batch_size", [1, 5, 18])
def test_sami_backward_matches_full_backward(arch, micro_batch_size):
    model = MODELS[arch]()
    twin = fp64_twin(model)
    prompts, responses = random_problem(torch.Generator().manual_seed(6), B=2, C=3, R=3)
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    mask[1, 0, 2] = mask[0, 1, 1] = False
    result = {}

    def run():
        result["loss"], result["stats"] = sami_backward(
            model, prompts, responses, micro_batch_size=micro_batch_size, mask=mask
        )

    got = grads_after(model, run)
    plain, plain_matrix = full_sequence_grads(model, lambda m: reference.sami_loss(m, mask), prompts, responses)
    truth, truth_matrix = full_sequence_grads(twin, lambda m: reference.sami_loss(m, mask), prompts, responses)
    assert_grads_oracle_close(got, plain, truth, k=K_MODEL_GRADS)
    assert not result["loss"].requires_grad
    assert_stats_oracle_close(result["loss"], result["stats"], plain_matrix, truth_matrix, mask)


def test_streamed_full_sequence_grads_equal_one_backward():
    # The benchmarks' float64 truth for models too large for C*R graphs at once: the same gradients.
    model = tiny_llama()
    twin = fp64_twin(model)
    prompts, responses = random_problem(torch.Generator().manual_seed(14), B=2, C=3, R=3)
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    mask[0, 1, 2] = False

    def loss(m):
        return reference.sami_loss(m, mask)

    streamed, streamed_matrix = streamed_full_sequence_grads(model, loss, prompts, responses)
    plain, plain_matrix = full_sequence_grads(model, loss, prompts, responses)
    truth, truth_matrix = full_sequence_grads(twin, loss, prompts, responses)
    assert_grads_oracle_close(streamed, plain, truth, k=K_MODEL_GRADS)
    assert torch.equal(streamed_matrix, plain_matrix)


def test_sami_backward_accumulates_into_existing_grads():
    prompts, responses = random_problem(torch.Generator().manual_seed(7), B=1, C=2, R=2)

    def twice():
        sami_backward(_LLAMA, prompts, responses, micro_batch_size=3)
        sami_backward(_LLAMA, prompts, responses, micro_batch_size=3)  # on top of the grads the first left

    assert_model_grads_oracle_close(grads_after(_LLAMA, twice), _LLAMA, lambda m: 2 * reference.sami_loss(m),
                                    prompts, responses, twin=_LLAMA64)


def test_dropout_masks_replayed_between_passes():
    # With one chunk, sami_backward draws its dropout masks exactly as logprob_matrix does, provided
    # the recomputation replays the RNG state of the no-grad pass (otherwise the masks differ).
    # The masks depend on the batch layout, so the plain computation here is one logprob_matrix
    # batch (in fp32, and in fp64 for the truth: dropout draws the same masks in either dtype).
    model = tiny_gpt2(dropout=0.3).train()
    twin = fp64_twin(model)
    prompts, responses = random_problem(torch.Generator().manual_seed(8), B=1, C=2, R=2)

    def one_batch(m, seed):
        torch.manual_seed(seed)
        return parameter_grads(m, lambda: reference.sami_loss(logprob_matrix(m, prompts, responses)))

    plain, truth = one_batch(model, 123), one_batch(twin, 123)
    torch.manual_seed(123)
    got = grads_after(model, lambda: sami_backward(model, prompts, responses, micro_batch_size=4))
    assert_grads_oracle_close(got, plain, truth, k=K_MODEL_GRADS)
    other = one_batch(model, 124)  # a different draw is far outside the bound: the check above can fail
    name = "transformer.h.0.mlp.c_fc.weight"
    error, allowed = oracle_excess(other[name], plain[name], truth[name], k=K_MODEL_GRADS)
    assert error > 100 * allowed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing(arch):
    model = MODELS[arch]()
    twin = fp64_twin(model)
    prompts, responses = random_problem(torch.Generator().manual_seed(9), B=2, C=2, R=2)
    weights = torch.randn(2, 2, 2)
    losses = {"weighted": lambda m: (m * weights).sum(), "sami": reference.sami_loss}
    plain = {name: full_sequence_grads(model, loss, prompts, responses)[0] for name, loss in losses.items()}
    truth = {name: full_sequence_grads(twin, loss, prompts, responses)[0] for name, loss in losses.items()}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # HF checkpoints (and drops the KV cache) only in training mode; dropout is 0
    got = parameter_grads(
        model, lambda: (logprob_matrix(model, prompts, responses, micro_batch_size=3) * weights).sum()
    )
    assert_grads_oracle_close(got, plain["weighted"], truth["weighted"], k=K_MODEL_GRADS)
    got_sami = grads_after(model, lambda: sami_backward(model, prompts, responses, micro_batch_size=3))
    assert_grads_oracle_close(got_sami, plain["sami"], truth["sami"], k=K_MODEL_GRADS)
    assert all(m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing"))


def test_cache_keyword_detection():
    class OldDecoder(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    assert sami_fast.hf.cache_keyword(OldDecoder()) == "past_key_values"
    new_api = int(transformers.__version__.split(".")[0]) >= 5
    assert sami_fast.hf.cache_keyword(_LLAMA.base_model) == ("cache" if new_api else "past_key_values")


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_both_cache_keywords(keyword, monkeypatch):
    import inspect

    if keyword not in inspect.signature(_LLAMA.base_model.forward).parameters and keyword == "cache":
        pytest.skip("transformers < 5 has no `cache=` keyword")  # 4.x: only past_key_values exists
    monkeypatch.setattr(sami_fast.hf, "cache_keyword", lambda decoder: keyword)
    prompts, responses = random_problem(torch.Generator().manual_seed(10), B=1, C=2, R=2)
    # A keyword the model ignored would leave the responses without their prompt: far off.
    with torch.no_grad():
        assert_matrix_oracle_close(logprob_matrix(_LLAMA, prompts, responses), _LLAMA, prompts, responses,
                                   twin=_LLAMA64)


def _ok():
    return random_problem(torch.Generator().manual_seed(11), B=2, C=2, R=2)


def _set(groups, b, i, value):
    groups = [list(g) for g in groups]
    groups[b][i] = value
    return groups


BAD_INPUTS = {
    "empty prompt": (lambda p, r: (_set(p, 1, 0, torch.tensor([], dtype=torch.long)), r),
                     r"prompts\[1\]\[0\] is empty"),
    "empty response": (lambda p, r: (p, _set(r, 0, 1, torch.tensor([], dtype=torch.long))),
                       r"responses\[0\]\[1\] is empty"),
    "C = 0": (lambda p, r: ([[], []], r), r"prompts\[0\] must be a non-empty list"),
    "R = 0": (lambda p, r: (p, [[], []]), r"responses\[0\] must be a non-empty list"),
    "B = 0": (lambda p, r: ([], []), r"prompts must be a non-empty list"),
    "id >= vocab": (lambda p, r: (p, _set(r, 1, 1, torch.tensor([3, VOCAB]))),
                    rf"responses\[1\]\[1\] holds token id {VOCAB}"),
    "negative id": (lambda p, r: (_set(p, 0, 1, torch.tensor([1, -2])), r), r"prompts\[0\]\[1\] holds token id -2"),
    "too long": (lambda p, r: (_set(p, 0, 0, torch.zeros(64, dtype=torch.long)), r),
                 r"prompts\[0\] \+ responses\[0\].*max positions 64"),
    "B mismatch": (lambda p, r: (p, r[:1]), r"responses has 1 queries but prompts has 2"),
    "C mismatch": (lambda p, r: ([p[0], p[1][:1]], r), r"prompts\[1\] has 1 entries but prompts\[0\] has 2"),
    "R mismatch": (lambda p, r: (p, [r[0] + r[0], r[1]]), r"responses\[1\] has 2 entries but responses\[0\] has 4"),
    "2-D ids": (lambda p, r: (_set(p, 0, 0, torch.zeros(1, 3, dtype=torch.long)), r),
                r"prompts\[0\]\[0\] must have 1 dimensions"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_the_argument(case):
    mutate, message = BAD_INPUTS[case]
    prompts, responses = mutate(*_ok())
    with pytest.raises(ValueError, match=message):
        logprob_matrix(_LLAMA, prompts, responses)
    with pytest.raises(ValueError, match=message):
        sami_backward(_LLAMA, prompts, responses, micro_batch_size=2)


def test_bad_arguments():
    prompts, responses = _ok()
    with pytest.raises(TypeError, match=r"prompts\[0\]\[0\] must have dtype"):
        logprob_matrix(_LLAMA, _set(prompts, 0, 0, prompts[0][0].float()), responses)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive int"):
        logprob_matrix(_LLAMA, prompts, responses, micro_batch_size=0)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive int"):
        sami_backward(_LLAMA, prompts, responses, micro_batch_size=None)
    with pytest.raises(ValueError, match="pad_token_id"):
        logprob_matrix(_LLAMA, prompts, responses, pad_token_id=VOCAB)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 2, 2\)"):
        sami_backward(_LLAMA, prompts, responses, micro_batch_size=2, mask=torch.ones(2, 2, 3, dtype=torch.bool))


def test_sami_backward_rejects_rectangular_matrices():
    prompts, responses = random_problem(torch.Generator().manual_seed(12), B=1, C=2, R=3)
    assert logprob_matrix(_LLAMA, prompts, responses).shape == (1, 2, 3)
    with pytest.raises(ValueError, match=r"C == R.*C=2, R=3"):
        sami_backward(_LLAMA, prompts, responses, micro_batch_size=2)


def test_model_without_output_embedding():
    prompts, responses = _ok()
    with pytest.raises(ValueError, match="no output embedding"):
        logprob_matrix(LlamaModel(_LLAMA.config), prompts, responses)
    with pytest.raises(TypeError, match="model must be a transformers causal LM"):
        logprob_matrix(object(), prompts, responses)


def test_matrix_and_grads_on_both_backends(backend):
    # The fused head runs through Triton (interpreted here) or PyTorch per SAMI_FAST_BACKEND.
    prompts, responses = random_problem(torch.Generator().manual_seed(13), B=1, C=2, R=2, response_len=(1, 4))
    weights = torch.randn(1, 2, 2)
    assert_matrix_oracle_close(logprob_matrix(_LLAMA, prompts, responses), _LLAMA, prompts, responses, twin=_LLAMA64)
    got = parameter_grads(_LLAMA, lambda: (logprob_matrix(_LLAMA, prompts, responses) * weights).sum())
    assert_model_grads_oracle_close(got, _LLAMA, lambda m: (m * weights).sum(), prompts, responses, twin=_LLAMA64)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_held_head_logits_keep_the_gradients_exact(arch, checkpointing, head_tiles):
    """logits_budget: the backward reads the LM head's logits the forward kept (no tile is
    recomputed with W) and the parameter gradients still obey the oracle rule."""
    model = tiny_gemma2() if arch == "gemma2" else tiny_llama()
    twin = fp64_twin(model)
    prompts, responses = random_problem(torch.Generator().manual_seed(10), B=1, C=2, R=2)
    weights = torch.randn(1, 2, 2)
    plain = full_sequence_grads(model, lambda m: (m * weights).sum(), prompts, responses)[0]
    truth = full_sequence_grads(twin, lambda m: (m * weights).sum(), prompts, responses)[0]
    sami_plain = full_sequence_grads(model, reference.sami_loss, prompts, responses)[0]
    sami_truth = full_sequence_grads(twin, reference.sami_loss, prompts, responses)[0]
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    head_tiles.clear()  # count the scoring's tiles only
    got = parameter_grads(model, lambda: (logprob_matrix(model, prompts, responses, micro_batch_size=3,
                                                         logits_budget=2**24, backend="torch") * weights).sum())
    assert_grads_oracle_close(got, plain, truth, k=K_MODEL_GRADS)
    forward_tiles = 2 * (1 + checkpointing)  # one per chunk of 3 and 1 pairs, again in the recomputation
    assert len(head_tiles) == forward_tiles
    head_tiles.clear()
    got = grads_after(model, lambda: sami_backward(model, prompts, responses, micro_batch_size=3,
                                                   logits_budget=2**24, backend="torch"))
    assert_grads_oracle_close(got, sami_plain, sami_truth, k=K_MODEL_GRADS)
    assert len(head_tiles) == 4  # two chunks without a graph, two with; none recomputed
