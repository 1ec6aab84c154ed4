"""sami_fast.generation on tiny random causal LMs: batched generation vs one prompt at a time,
sampling, stops, errors."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from oracle import K_DEFAULT, ulp_floor
from sami_fast.generation import (Generation, GenerationConfig, HFGenerator, Prompt, as_generation, drop_reason,
                                  generate_in_batches, run_generator)
from tiny_lm import bpe_tokenizer, tiny_causal_lm

TOKENIZER = bpe_tokenizer()
LLAMA = tiny_causal_lm(TOKENIZER, seed=0)  # shared by the tests that leave it as they found it
TEXTS = [
    "Hi",
    "Be concise: answer in one short sentence.",
    "What causes rain?",
    "Be verbose and detailed: explain at length, step by step. How do I boil an egg? Put it in boiling water.",
    "User: 0 1 2 3 4 5 6 7 8 9\nAssistant:",
    "Answer in a formal, academic tone. Answer playfully, with jokes! The assistant is helpful.",
    "Why?",
]


def prompts_of(texts):
    return [Prompt(text, torch.tensor(TOKENIZER(text).input_ids)) for text in texts]


def tiny_gpt2(tokenizer):
    """Absolute position embeddings: left padding goes wrong here unless positions follow the attention mask."""
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tokenizer), n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


def generate_with_tokens(generator, prompts):
    """(generations, the generated token ids of each row) from one generator call."""
    rows = []
    decode = generator.decode
    generator.decode = lambda tokens: (rows.append(tokens), decode(tokens))[1]
    try:
        generations = generator(prompts)
    finally:
        del generator.decode
    return generations, rows


def assert_same_greedy_tokens(model, prompts, rows, expected_rows, eos_ids):
    """Every row equals its expected row, or first differs where the two tokens' fp64 logits tie within fp32 noise.

    Two fp32 computations of one next-token distribution (padded and unpadded) may pick
    different argmaxes only when the two top logits are closer than their rounding errors:
    the allowance is K_DEFAULT times twice the plain fp32 forward's error against the
    same model in fp64. Returns the number of rows that diverged.
    """
    def through_eos(tokens):
        ends = [i for i, token in enumerate(tokens) if token in eos_ids]
        return tokens[:ends[0] + 1] if ends else tokens

    diverged = 0
    for i, (prompt, row, expected) in enumerate(zip(prompts, rows, expected_rows)):
        row, expected = through_eos(row), through_eos(expected)
        if row == expected:
            continue
        diverged += 1
        step = next(t for t, (a, b) in enumerate(zip(row, expected)) if a != b)
        prefix = torch.cat([prompt.ids, torch.tensor(row[:step], dtype=torch.long)])[None]
        with torch.no_grad():
            logits = model(prefix).logits[0, -1]
            truth = copy.deepcopy(model).double()(prefix).logits[0, -1]
        noise = float((logits.double() - truth).abs().max())
        margin = float((truth[row[step]] - truth[expected[step]]).abs())
        allowed = K_DEFAULT * 2 * noise + ulp_floor(truth, torch.float32)
        assert margin <= allowed, (f"prompt {i}: tokens differ at step {step} ({row[step]} vs {expected[step]}) "
                                   f"where their fp64 logits differ by {margin:.3e}, beyond fp32 noise {allowed:.3e}")
    return diverged


@pytest.mark.parametrize("make_model", [lambda: LLAMA, lambda: tiny_gpt2(TOKENIZER)], ids=["llama", "gpt2"])
def test_batched_greedy_equals_one_prompt_at_a_time(make_model, monkeypatch):
    model = make_model()
    prompts = prompts_of(TEXTS)
    assert len({len(prompt.ids) for prompt in prompts}) == len(prompts)  # every row padded differently
    generator = HFGenerator(model, TOKENIZER, GenerationConfig(max_new_tokens=12))
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate",
                        lambda **kwargs: (calls.append(kwargs["input_ids"].shape), generate(**kwargs))[1])

    batched, rows = generate_with_tokens(generator, prompts)
    assert calls == [(len(prompts), max(len(prompt.ids) for prompt in prompts))]  # one left-padded call for all
    single, single_rows = zip(*(generate_with_tokens(generator, [prompt]) for prompt in prompts))
    single, single_rows = [g for [g] in single], [r for [r] in single_rows]
    diverged = assert_same_greedy_tokens(model, prompts, rows, single_rows, generator.eos_ids)
    assert [g for g, r, s in zip(batched, rows, single_rows) if r == s] == \
           [g for g, r, s in zip(single, rows, single_rows) if r == s]
    assert diverged <= 1, f"{diverged} of {len(prompts)} rows diverged at near-ties: not a rare rounding event"
    assert all(len(g.text) > 0 for g in batched)


def test_batch_size_splits_the_calls_with_the_same_responses(monkeypatch):
    prompts = prompts_of(TEXTS)
    whole, whole_rows = generate_with_tokens(HFGenerator(LLAMA, TOKENIZER, GenerationConfig(max_new_tokens=8)), prompts)
    calls = []
    generate = LLAMA.generate
    monkeypatch.setattr(LLAMA, "generate",
                        lambda **kwargs: (calls.append(len(kwargs["input_ids"])), generate(**kwargs))[1])
    split = HFGenerator(LLAMA, TOKENIZER, GenerationConfig(max_new_tokens=8, batch_size=3))
    parts, part_rows = generate_with_tokens(split, prompts)
    assert calls == [3, 3, 1]
    assert_same_greedy_tokens(LLAMA, prompts, part_rows, whole_rows, split.eos_ids)
    assert len(parts) == len(prompts)


def test_no_prompts_no_generate_call(monkeypatch):
    monkeypatch.setattr(LLAMA, "generate", lambda **kwargs: pytest.fail("generate called for no prompts"))
    assert HFGenerator(LLAMA, TOKENIZER, GenerationConfig())([]) == []


@pytest.mark.parametrize("batch_size", [None, 2])
def test_generate_in_batches_calls_per_batch_and_none_for_no_prompts(batch_size):
    calls = []

    def echo(prompts):
        calls.append(len(prompts))
        return [f"r{len(calls)}"] * len(prompts)

    assert generate_in_batches(echo, [], batch_size) == [] and calls == []
    generations = generate_in_batches(echo, prompts_of(["a", "b", "c"]), batch_size)
    assert calls == ([3] if batch_size is None else [2, 1])
    assert [g.text for g in generations] == (["r1"] * 3 if batch_size is None else ["r1", "r1", "r2"])


def test_sampling_is_reproducible_under_a_seed():
    generator = HFGenerator(LLAMA, TOKENIZER, GenerationConfig(max_new_tokens=10, do_sample=True, temperature=0.7,
                                                              top_p=0.9))
    prompts = prompts_of(TEXTS[:4])
    torch.manual_seed(11)
    first = generator(prompts)
    torch.manual_seed(11)
    assert generator(prompts) == first
    torch.manual_seed(12)
    assert generator(prompts) != first
    greedy = HFGenerator(LLAMA, TOKENIZER, GenerationConfig(max_new_tokens=10))(prompts)
    assert greedy != first


def first_step_probabilities(prompt, temperature=1.0):
    with torch.no_grad():
        return torch.softmax(LLAMA(prompt.ids[None]).logits[0, -1].double() / temperature, dim=-1)


def first_tokens(config, prompt, copies=200):
    """The first sampled token of ``copies`` copies of ``prompt``."""
    _, rows = generate_with_tokens(HFGenerator(LLAMA, TOKENIZER, config), [prompt] * copies)
    return {row[0] for row in rows}


def test_sampling_draws_from_the_whole_vocabulary():
    # generate's default top_k of 50 must not apply: the random model's next-token
    # distribution is nearly flat over its 384 tokens, so 200 draws meet far more than 50.
    [prompt] = prompts_of(TEXTS[1:2])
    assert first_step_probabilities(prompt).max() < 0.02
    assert len(first_tokens(GenerationConfig(max_new_tokens=1, do_sample=True), prompt)) > 100


def test_top_p_keeps_only_the_nucleus():
    [prompt] = prompts_of(TEXTS[1:2])
    temperature, top_p = 0.05, 0.5  # sharpened so the nucleus is a handful of tokens
    probabilities, order = first_step_probabilities(prompt, temperature).sort(descending=True)
    nucleus_size = int((probabilities.cumsum(0) < top_p).sum()) + 1
    nucleus = set(order[:nucleus_size + 1].tolist())  # + 1: a token at the rounding edge of the cut
    drawn = first_tokens(GenerationConfig(max_new_tokens=1, do_sample=True, temperature=temperature, top_p=top_p),
                         prompt)
    assert 1 < len(drawn) and drawn <= nucleus and len(nucleus) < 20


def test_the_models_own_generation_defaults_do_not_apply():
    prompts = prompts_of(TEXTS[:3])
    config = GenerationConfig(max_new_tokens=10)
    expected, rows = generate_with_tokens(HFGenerator(LLAMA, TOKENIZER, config), prompts)
    defaults = LLAMA.generation_config
    saved = defaults.to_dict()
    try:
        # Each of these would change the greedy responses if generate applied it.
        defaults.update(suppress_tokens=sorted({row[0] for row in rows}), repetition_penalty=50.0, min_new_tokens=10)
        assert HFGenerator(LLAMA, TOKENIZER, config)(prompts) == expected
        assert LLAMA.generation_config is defaults
    finally:
        LLAMA.generation_config = type(defaults).from_dict(saved)


def test_stop_strings_cut_the_text_and_stop_early():
    prompts = prompts_of(TEXTS[:4])
    full = HFGenerator(LLAMA, TOKENIZER, GenerationConfig(max_new_tokens=24))(prompts)
    text = full[1].text
    # A short ASCII stop string that first occurs a few characters into response 1.
    at = next(i for i in range(4, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].strip()
              and text.find(text[i:i + 2]) == i)
    stop = text[at:at + 2]
    config = GenerationConfig(max_new_tokens=24, stop_strings=("never in any response \u2603", stop))
    stopped = HFGenerator(LLAMA, TOKENIZER, config)(prompts)
    assert stopped[1] == Generation(text[:at], finished=True)
    for before, after in zip(full, stopped):
        cut = before.text.find(stop)
        assert after == (before if cut < 0 else Generation(before.text[:cut], finished=True))
        assert stop not in after.text

    forwards = []
    hook = LLAMA.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        assert HFGenerator(LLAMA, TOKENIZER, config)(prompts[1:2]) == [stopped[1]]
    finally:
        hook.remove()
    assert len(forwards) < 24  # stopped when the stop string appeared, not at max_new_tokens


def test_finished_by_eos_or_cut_by_length():
    # EOS is whatever the generation config says: make it the token prompt 0 greedily generates at step 3.
    prompts = prompts_of(TEXTS[:3])
    generator = HFGenerator(LLAMA, TOKENIZER, GenerationConfig(max_new_tokens=10))
    plain, rows = generate_with_tokens(generator, prompts)
    eos = rows[0][3]
    assert eos not in rows[0][:3] and eos not in rows[1] and TOKENIZER.eos_token_id not in rows[0] + rows[1]
    assert [g.finished for g in plain] == [False] * 3
    saved = LLAMA.generation_config.eos_token_id
    LLAMA.generation_config.eos_token_id = [TOKENIZER.eos_token_id, eos]
    try:
        ending = HFGenerator(LLAMA, TOKENIZER, GenerationConfig(max_new_tokens=10))
        assert ending.eos_ids == [TOKENIZER.eos_token_id, eos]
        generations, ending_rows = generate_with_tokens(ending, prompts)
    finally:
        LLAMA.generation_config.eos_token_id = saved
    assert generations[0] == Generation(TOKENIZER.decode(rows[0][:3], skip_special_tokens=True), finished=True)
    assert ending_rows[0][4:] == [TOKENIZER.pad_token_id] * 6  # the batch ran on; that row was padded
    assert generations[1] == plain[1]


def test_eos_and_pad_fallbacks():
    tokenizer = bpe_tokenizer()
    tokenizer.pad_token = None
    model = tiny_causal_lm(tokenizer, seed=0)
    model.generation_config.eos_token_id = None
    generator = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=4))
    assert generator.eos_ids == [tokenizer.eos_token_id] and generator.pad_id == tokenizer.eos_token_id
    prompts = prompts_of(TEXTS[:3])
    _, rows = generate_with_tokens(generator, prompts)
    _, expected_rows = generate_with_tokens(HFGenerator(LLAMA, TOKENIZER, GenerationConfig(max_new_tokens=4)), prompts)
    assert_same_greedy_tokens(model, prompts, rows, expected_rows, generator.eos_ids)


def test_prompt_beyond_the_models_positions_is_an_error():
    model = tiny_causal_lm(TOKENIZER, seed=0, max_positions=16)
    prompts = [Prompt("a", torch.arange(5, 11)), Prompt("b", torch.arange(5, 12))]  # 6 and 7 tokens
    generator = HFGenerator(model, TOKENIZER, GenerationConfig(max_new_tokens=10))
    assert len(generator(prompts[:1])) == 1  # 6 + 10 = 16 positions fit
    with pytest.raises(ValueError, match=r"prompts\[1\] has 7 tokens: with max_new_tokens=10 it needs 17 positions, "
                                         r"but the model has 16"):
        generator(prompts)


def test_mode_restored_and_generation_in_eval_without_grad(monkeypatch):
    model = tiny_causal_lm(TOKENIZER, seed=0).train()
    model.model.layers[0].eval()  # a mixed state must come back as it was, module by module
    modes = {name: module.training for name, module in model.named_modules()}
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((module.training, torch.is_grad_enabled())))
    HFGenerator(model, TOKENIZER, GenerationConfig(max_new_tokens=3))(prompts_of(TEXTS[:2]))
    assert seen and set(seen) == {(False, False)}
    assert {name: module.training for name, module in model.named_modules()} == modes

    def fail(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        HFGenerator(model, TOKENIZER, GenerationConfig(max_new_tokens=3))(prompts_of(TEXTS[:2]))
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_bad_prompts_are_errors_naming_them():
    generator = HFGenerator(LLAMA, TOKENIZER, GenerationConfig(max_new_tokens=3))
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a sami_fast.generation.Prompt, got str"):
        generator([Prompt("a", torch.tensor([5])), "b"])
    with pytest.raises(ValueError, match=r"prompts\[0\].ids must lie in \[0, 384\)"):
        generator([Prompt("a", torch.tensor([5, 384]))])
    with pytest.raises(TypeError, match="prompts must be a list"):
        generator(Prompt("a", torch.tensor([5])))
    with pytest.raises(TypeError, match="config must be"):
        HFGenerator(LLAMA, TOKENIZER, {"max_new_tokens": 3})
    for ids, message in [(torch.tensor([[5]]), "1-D"), (torch.tensor([5], dtype=torch.int32), "int64"),
                         (torch.tensor([], dtype=torch.long), "non-empty"), ([5], "torch.Tensor")]:
        with pytest.raises((TypeError, ValueError), match=f"Prompt.ids must .*{message}"):
            Prompt("a", ids)
    with pytest.raises(TypeError, match="Prompt.text must be a str"):
        Prompt(None, torch.tensor([5]))


@pytest.mark.parametrize("field, value, error", [
    ("max_new_tokens", 0, ValueError), ("max_new_tokens", 2.0, TypeError), ("max_new_tokens", True, TypeError),
    ("do_sample", 1, TypeError), ("temperature", 0.0, ValueError), ("temperature", float("nan"), ValueError),
    ("temperature", "1", TypeError), ("top_p", 0.0, ValueError), ("top_p", 1.5, ValueError),
    ("top_p", None, TypeError), ("stop_strings", "\n", TypeError), ("stop_strings", ("",), ValueError),
    ("stop_strings", (3,), ValueError), ("batch_size", 0, ValueError), ("batch_size", 1.5, TypeError),
])
def test_bad_generation_config_names_the_field(field, value, error):
    with pytest.raises(error, match=field):
        GenerationConfig(**{field: value})


def test_generation_config_accepts_a_list_of_stop_strings():
    assert GenerationConfig(stop_strings=["\n", "User:"]).stop_strings == ("\n", "User:")


def test_drop_reason():
    assert drop_reason(["short.", "A longer answer.", "short. "]) is None  # compared exactly as given
    assert drop_reason(["a", " \n\t", "b"]) == "response 1 is empty"
    assert drop_reason(["a", "b", "a", "b"]) == "responses 0 and 2 are identical"
    assert drop_reason(["a", "a", ""]) == "response 2 is empty"
    with pytest.raises(TypeError, match=r"responses\[1\] must be a str"):
        drop_reason(["a", None])
    with pytest.raises(TypeError, match="responses must be a list"):
        drop_reason("ab")


def test_as_generation():
    generation = Generation("text", finished=True)
    assert as_generation(generation) is generation
    assert as_generation("text") == Generation("text", finished=False)
    with pytest.raises(TypeError, match="response must be a str or .*Generation, got int"):
        as_generation(3)
    with pytest.raises(TypeError, match="Generation.finished must be a bool"):
        Generation("text", finished=1)


def test_a_plain_function_plugs_into_the_seam():
    def shouting_engine(prompts):
        return [prompt.text.upper() if i % 2 else Generation(prompt.text, finished=True)
                for i, prompt in enumerate(prompts)]

    prompts = prompts_of(TEXTS[:3])
    assert run_generator(shouting_engine, prompts) == [
        Generation(TEXTS[0], True), Generation(TEXTS[1].upper(), False), Generation(TEXTS[2], True)]
    assert run_generator(HFGenerator(LLAMA, TOKENIZER, GenerationConfig(max_new_tokens=3)), prompts[:1])[0].text
    with pytest.raises(ValueError, match="returned 2 responses for 3 prompts"):
        run_generator(lambda prompts: ["a", "b"], prompts)
    with pytest.raises(TypeError, match="must return a list, got generator"):
        run_generator(lambda prompts: (p.text for p in prompts), prompts)
    with pytest.raises(TypeError, match="response 1 of the generator must be a str or .*, got NoneType"):
        run_generator(lambda prompts: ["a", None, "c"], prompts)
