"""torch.compile(fullgraph=True) over a function calling sami_loss and sequence_logprobs.

Each public op is one custom op under the compiler (``torch.ops.sami_fast.*``), so the
graph has no break and the compiled function computes what eager does, bit for bit:
values and gradients.
"""

import pytest
import torch

from sami_fast import sami_loss, sequence_logprobs

IGNORE = -100


def sami_step(hidden, weight, labels):
    """(loss, row accuracy) of the (C, C) matrix of mean log-probs of C * C sequences."""
    scores = sequence_logprobs(hidden, weight, labels)
    C = int(len(scores) ** 0.5)
    loss, stats = sami_loss(scores.view(C, C), return_stats=True)
    return loss, stats["row_accuracy"]


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 6, 8, generator=gen)
    weight = torch.randn(11, 8, generator=gen)
    labels = torch.randint(0, 11, (4, 6), generator=gen)
    labels[:, :2] = IGNORE  # a prompt
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def test_compiled_with_fullgraph_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(sami_step, fullgraph=True, backend="inductor")
    hidden, weight, labels = inputs()
    loss, accuracy = compiled(hidden, weight, labels)
    loss.backward()
    grads = hidden.grad, weight.grad

    hidden, weight, labels = inputs()
    eager_loss, eager_accuracy = sami_step(hidden, weight, labels)
    eager_loss.backward()
    assert torch.equal(loss, eager_loss) and torch.equal(accuracy, eager_accuracy)
    assert torch.equal(grads[0], hidden.grad) and torch.equal(grads[1], weight.grad)


def test_checks_still_run_under_compile():
    """Bad labels still raise their ValueError: the checks run inside the custom op."""
    torch._dynamo.reset()
    compiled = torch.compile(sami_step, fullgraph=True, backend="inductor")
    hidden, weight, labels = inputs()
    labels[0, 3] = 11  # outside the vocabulary
    with pytest.raises(ValueError, match="labels"):
        compiled(hidden, weight, labels)
