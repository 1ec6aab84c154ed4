"""Suite ``step``: one SAMI training step (matrix + loss + backward), original style vs shared prefix.

Candidates, on the same model and data:

* ``original`` (original-style): all C*R sequences ``prompt_k ++ response_j`` in one right-padded
  forward, full fp32 logits, the original ``get_batch_logprobs`` (mean over the
  response tokens) and ``sami_loss`` from ``sami_fast.reference``, backward;
* ``sami_fast``: ``sami_loss(logprob_matrix(...))`` and backward (each prompt
  runs once, the LM head only at response positions, no logits tensor);
* ``sami_fast_gradcache``: ``sami_backward`` with one prompt's R responses per
  chunk (``micro_batch_size = R``): peak memory independent of C.

Sizes: on CPU "full" is the real SmolLM2-135M-Instruct (fp32), prompts ~256 and
responses ~48 tokens, C = R in {2, 4, 8} (and 16 for the gradient cache);
"quick" keeps SmolLM2's widths and vocabulary but 2 random-weight layers,
prompts ~128 and responses ~24 tokens, C = R in {2, 4}: quick enough for CPU ("quick").
On CUDA "full" is C = R in {2, 8}, prompts ~512 and responses ~128 tokens (the
original-style step at C = R = 8 is a row saying how much memory it would need).
No other library implements this step, so the suite has no peer. The gate checks the
loss and the gradients of the final norm, the last layer's MLP output projection and the
(tied) embedding against the float64 twin of the model running the plain full-sequence
computation (``tests/oracle.py``), with the same computation in the model's dtype as plain.
On CUDA the model is Llama-3-8B's architecture in bf16 with random weights
(all 32 layers for "full", 2 for "quick"): real shapes without a download.
Each case's name states the ideal speed-up, the token-count ratio
C*R*(Lp+Lr) / (C*Lp + C*R*Lr) that sharing the prompts can at most give.
"""

import functools

import torch

from benchmarks.runner import Candidate, Case, CaseSkipped, available_memory_bytes, sami_fast_backends, with_backend
from sami_fast import logprob_matrix, reference, sami_backward, sami_loss
from sami_fast.hf import load_smollm2

SIZES = {
    # size: (Cs, gradcache Cs, prompt length, response length, B)
    "quick": ((2, 4), (4,), 128, 24, 1),
    "full": ((2, 4, 8), (4, 16), 256, 48, 1),
}
# On CUDA, in place of SIZES: Llama-3-8B at SAMI's shapes.
CUDA_SIZES = {"full": ((2, 8), (8,), 512, 128, 1)}


# Llama-3-8B's architecture; GPU runs use it with random weights (no download there).
_LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
)
# SmolLM2-135M's architecture.
_SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
)


def _random_llama(shape: dict, layers: int, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**{**shape, "num_hidden_layers": layers})
    with torch.device(device):  # initialise on the target device: an 8B model inits in seconds there
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@functools.lru_cache(maxsize=2)
def _model(size: str, device: str):
    """CPU: SmolLM2-135M (real weights, fp32) or 2 of its layers. CUDA: Llama-3-8B (random, bf16) or 2 layers."""
    if device == "cuda":
        layers = _LLAMA3_8B["num_hidden_layers"] if size == "full" else 2
        model = _random_llama(_LLAMA3_8B, layers, torch.bfloat16, device)
    elif size == "full":
        model, _ = load_smollm2(torch.float32)
    else:
        model = _random_llama(_SMOLLM2, 2, torch.float32, device)
    return model.to(device).eval()


def _data(B: int, C: int, prompt_length: int, response_length: int, vocab: int, device: str):
    """Ragged token ids: prompts in [0.9 Lp, Lp], responses in [0.75 Lr, Lr] (seeded)."""
    generator = torch.Generator().manual_seed(C)

    def ids(low, high):
        n = int(torch.randint(low, high + 1, (), generator=generator))
        return torch.randint(0, vocab, (n,), generator=generator).to(device)

    prompts = [[ids(int(0.9 * prompt_length), prompt_length) for _ in range(C)] for _ in range(B)]
    responses = [[ids(int(0.75 * response_length), response_length) for _ in range(C)] for _ in range(B)]
    return prompts, responses


def _original_batch(prompts, responses, pad_id: int):
    """All C*R concatenations right-padded; labels are -100 except on response tokens."""
    sequences, labels = [], []
    for group_prompts, group_responses in zip(prompts, responses):
        for prompt in group_prompts:
            for response in group_responses:
                sequences.append(torch.cat([prompt, response]))
                labels.append(torch.cat([torch.full_like(prompt, -100), response]))
    width = max(len(s) for s in sequences)
    device = sequences[0].device
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    label_ids = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for row, (s, y) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(s)], label_ids[row, : len(s)], attention_mask[row, : len(s)] = s, y, 1
    return input_ids, attention_mask, label_ids


# Peak memory of the original-style step over its fp32 logits alone, measured on CPU at
# C = R = 2 and 4 (benchmarks/results/sami_step_cpu.md): logits, their float copy, the
# log-softmax, their gradients and the activations of C*R full sequences.
_ORIGINAL_PEAK_OVER_LOGITS = 10


def _original_step(model, prompts, responses):
    """The original trainer's step: every prompt ++ response sequence right-padded in one batch."""
    B, C = len(prompts), len(prompts[0])
    input_ids, attention_mask, labels = _original_batch(prompts, responses, pad_id=0)
    device = input_ids.device.type
    estimate = _ORIGINAL_PEAK_OVER_LOGITS * input_ids.numel() * model.config.vocab_size * 4
    if estimate > available_memory_bytes(device):
        raise CaseSkipped(
            f"needs ~{estimate / 2**30:.0f} GiB ({_ORIGINAL_PEAK_OVER_LOGITS}x its fp32 logits), "
            f"{available_memory_bytes(device) / 2**30:.0f} GiB available"
        )

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        matrix = reference.get_batch_logprobs(logits, labels).reshape(B, C, C)
        loss = reference.sami_loss(matrix)
        loss.backward()
        return loss

    return run


def _fast_step(model, prompts, responses, logits_budget=0):
    """sami_fast: each prompt once, its keys/values shared by the responses, no logits tensor."""

    def run():
        model.zero_grad(set_to_none=True)
        loss = sami_loss(logprob_matrix(model, prompts, responses, logits_budget=logits_budget))
        loss.backward()
        return loss

    return run


def _gradcache_step(model, prompts, responses, micro_batch_size=None, logits_budget=0):
    """sami_fast's gradient cache: ``micro_batch_size`` pairs per chunk (None: one prompt's R responses)."""

    def run():
        model.zero_grad(set_to_none=True)
        return sami_backward(model, prompts, responses, micro_batch_size=micro_batch_size or len(responses[0]),
                             logits_budget=logits_budget)[0]

    return run


def _checked_parameters(model) -> list[str]:
    """The parameters whose gradients the gate compares: the first (the embedding, tied to the
    head on SmolLM2), one in the middle and the last."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]]))


def _candidate(name, role, step, size, device, C, backend=None, unavailable=None):
    def setup():
        model = _model(size, device)
        prompts, responses = _data(*_problem(size, device, C), model.config.vocab_size, device)
        run_step = step(model, prompts, responses)
        parameters = dict(model.named_parameters())
        checked = _checked_parameters(model)

        def run():
            loss = with_backend(backend, run_step) if backend else run_step()
            results = (loss.detach(), *(parameters[n].grad for n in checked))
            model.zero_grad(set_to_none=True)  # the caller holds the checked ones: a run's peak includes them
            return results

        return run

    return Candidate(name, role, None if unavailable else setup, unavailable)


def _sizes(size: str, device: str) -> tuple:
    """(Cs, gradient-cache Cs, prompt length, response length, B) of ``size`` on ``device``."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    return CUDA_SIZES.get(size, SIZES[size]) if device == "cuda" else SIZES[size]


def _problem(size, device, C):
    _, _, prompt_length, response_length, B = _sizes(size, device)
    return B, C, prompt_length, response_length


def _reference(size, device, C):
    def compute():
        from tests.oracle import fp64_twin, streamed_full_sequence_grads

        model = _model(size, device)
        B, _, Lp, Lr = _problem(size, device, C)
        checked = _checked_parameters(model)
        # The float64 twin's weights and the checked parameters' gradients, then one sequence at a
        # time: its logits, log-softmax and their gradients (4 vocabulary-sized values a token) and,
        # roughly, its activations (16 hidden-sized values a token and layer).
        config = model.config
        parameters = dict(model.named_parameters())
        weights = sum(p.numel() for p in parameters.values()) + sum(parameters[n].numel() for n in checked)
        estimate = 8 * (weights + (Lp + Lr) * (4 * config.vocab_size
                                               + 16 * config.num_hidden_layers * config.hidden_size))
        if estimate > available_memory_bytes(device):
            raise CaseSkipped(f"the float64 reference needs ~{estimate / 2**30:.0f} GiB")
        prompts, responses = _data(B, C, Lp, Lr, config.vocab_size, device)
        out = []
        for twin in (fp64_twin(model), model):
            grads, matrix = streamed_full_sequence_grads(twin, reference.sami_loss, prompts, responses, checked)
            out.append((reference.sami_loss(matrix), *(grads[n] for n in checked)))
            twin.zero_grad(set_to_none=True)
        return out[0], out[1], (None,) * len(out[0])

    return compute


def cases(device: str, size: str) -> list[Case]:
    Cs, gradcache_Cs = _sizes(size, device)[:2]
    backends = sami_fast_backends(device)
    out = []
    for C in sorted(set(Cs) | set(gradcache_Cs)):
        _, _, Lp, Lr = _problem(size, device, C)
        ideal = C * C * (Lp + Lr) / (C * Lp + C * C * Lr)
        candidates = [_candidate("original", "original", _original_step, size, device, C)] if C in Cs else []
        for backend, reason in backends.items():
            if C in Cs:
                candidates.append(_candidate(f"sami_fast[{backend}]", "sami_fast", _fast_step, size, device, C,
                                             backend, reason))
            if C in gradcache_Cs:
                candidates.append(_candidate(f"sami_backward[{backend}]", "sami_fast", _gradcache_step, size,
                                             device, C, backend, reason))
        out.append(Case("step", "sami_step", f"C=R={C} Lp={Lp} Lr={Lr} ideal x{ideal:.2f}", candidates,
                        _reference(size, device, C), params={"C": C},
                        result_names=("loss", "grad (embedding)", "grad (middle)", "grad (last)")))
    return out
