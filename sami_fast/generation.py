"""Response generation for SAMI: prompts in, response texts out.

SAMI generates response j of a query under constitution j with the current
policy, then scores every response under every constitution. This module is the
generation step, behind one small seam:

    ResponseGenerator = callable(list[Prompt]) -> list[Generation | str]

``Prompt.ids`` are exactly the token ids SAMI scores the response after;
``Prompt.text`` is the same prompt rendered as text. ``HFGenerator`` implements
the seam for a transformers causal LM (all prompts in one left-padded batched
``generate`` call, greedy or sampled). Any other engine plugs in as a plain
function; returning ``str`` means "finished unknown" (``finished=False``)::

    import requests
    from sami_fast.generation import Generation

    def vllm_generator(prompts):
        # An OpenAI-compatible completions server (vLLM: ``vllm serve DIR``, DIR the policy
        # being trained, e.g. the Hugging Face directory the previous iteration saved).
        # Token ids as the prompt, so the server conditions on exactly the ids SAMI scores;
        # send [p.text for p in prompts] instead for servers that only take text.
        reply = requests.post("http://localhost:8000/v1/completions", json={
            "model": "policy", "prompt": [p.ids.tolist() for p in prompts],
            "max_tokens": 128, "temperature": 0.0, "stop": ["\\nUser:"],
        }).json()
        choices = sorted(reply["choices"], key=lambda choice: choice["index"])
        # finish_reason "stop": EOS or a stop string; "length": cut by max_tokens.
        return [Generation(c["text"], finished=c["finish_reason"] == "stop") for c in choices]

Pass ``vllm_generator`` wherever an ``HFGenerator`` is taken. ``run_generator``
calls any generator and checks and normalises what it returns;
``drop_reason`` says why a query's responses cannot train (an empty response,
or two identical ones).
"""

import numbers
from dataclasses import dataclass
from typing import Protocol

import torch

from sami_fast.validation import check_positive


@dataclass(frozen=True, eq=False)  # eq=False: a tensor field has no single truth value to compare
class Prompt:
    """One prompt to generate a response from.

    Arguments:
        text: the rendered prompt text (constitution and query, template applied).
        ids: (T,) int64 tensor, T >= 1: exactly the token ids SAMI scores the response after.
    """

    text: str
    ids: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise TypeError(f"Prompt.text must be a str, got {type(self.text).__name__}")
        if not isinstance(self.ids, torch.Tensor):
            raise TypeError(f"Prompt.ids must be a torch.Tensor, got {type(self.ids).__name__}")
        if self.ids.dim() != 1 or self.ids.dtype != torch.long or self.ids.numel() == 0:
            raise ValueError(f"Prompt.ids must be a non-empty 1-D int64 tensor, got shape {tuple(self.ids.shape)} "
                             f"and dtype {self.ids.dtype}")


@dataclass(frozen=True)
class Generation:
    """One generated response.

    Arguments:
        text: the response text (special tokens removed, cut before a stop string).
        finished: True when it ended by EOS or a stop string, False when cut by the token limit (or unknown).
    """

    text: str
    finished: bool

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise TypeError(f"Generation.text must be a str, got {type(self.text).__name__}")
        if not isinstance(self.finished, bool):
            raise TypeError(f"Generation.finished must be a bool, got {type(self.finished).__name__}")


class ResponseGenerator(Protocol):
    """The seam: one response per prompt, in order; a plain ``str`` counts as ``Generation(text, finished=False)``."""

    def __call__(self, prompts: list[Prompt]) -> list[Generation | str]: ...


def _check_count(name: str, value, *, allow_none: bool = False) -> None:
    """A positive int (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


@dataclass
class GenerationConfig:
    """How ``HFGenerator`` generates.

    Arguments:
        max_new_tokens: the most tokens a response may have (a response cut there has ``finished=False``).
        do_sample: False: greedy; True: sample with ``temperature`` and ``top_p`` from torch's global RNG.
        temperature: softmax temperature when sampling (> 0).
        top_p: nucleus sampling mass in (0, 1]; 1 keeps the whole distribution.
        stop_strings: a response ends before the first of these it contains (non-empty strings).
        batch_size: prompts per ``generate`` call; None: all prompts in one call.

    Only these settings apply: the model's own ``generation_config`` (its top_k,
    repetition penalty, ...) is not used, except for its EOS ids.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    batch_size: int | None = None

    def __post_init__(self):
        _check_count("max_new_tokens", self.max_new_tokens)
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {type(self.do_sample).__name__}")
        check_positive("temperature", self.temperature)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, numbers.Real):
            raise TypeError(f"top_p must be a number, got {type(self.top_p).__name__}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not isinstance(self.stop_strings, (tuple, list)):
            raise TypeError(f"stop_strings must be a tuple of strings, got {type(self.stop_strings).__name__}")
        for i, stop in enumerate(self.stop_strings):
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop_strings[{i}] must be a non-empty str, got {stop!r}")
        self.stop_strings = tuple(self.stop_strings)
        _check_count("batch_size", self.batch_size, allow_none=True)


def _stop_position(text: str, stop_strings) -> int | None:
    """Where the earliest stop string in ``text`` starts, or None."""
    found = [text.find(stop) for stop in stop_strings]
    found = [position for position in found if position >= 0]
    return min(found) if found else None


class HFGenerator:
    """``ResponseGenerator`` for a transformers causal LM.

    Each call runs the prompts (``config.batch_size`` at a time, default all) in one
    left-padded batched ``model.generate`` each, with an attention mask; the model is in
    eval mode under ``torch.no_grad()`` meanwhile and every module's train/eval mode is
    restored afterwards. Greedy batched generation gives the responses one-at-a-time
    generation gives (up to fp rounding at a near-tie of the top two logits); sampling
    draws from torch's global RNG (seed it for reproducible responses; the draws depend
    on the batch composition).

    Arguments:
        model: a transformers causal LM (``generate``, ``config``, ``generation_config``).
        tokenizer: its tokenizer, used to decode the responses; padding uses its
            ``pad_token_id``, else the EOS id.
        config: a ``GenerationConfig``.

    EOS ids: ``model.generation_config.eos_token_id`` (an id or a list), else ``tokenizer.eos_token_id``.

    Raises:
        TypeError: ``config`` is not a ``GenerationConfig``.
        ValueError: the tokenizer has neither a ``pad_token_id`` nor an EOS id to pad with.
    """

    def __init__(self, model, tokenizer, config: GenerationConfig):
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a sami_fast.generation.GenerationConfig, got {type(config).__name__}")
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [None])[0]
        if pad is None:
            raise ValueError("tokenizer has neither a pad_token_id nor an EOS id to pad prompts with")
        self.model, self.tokenizer, self.config, self.pad_id = model, tokenizer, config, int(pad)

    def __call__(self, prompts: list[Prompt]) -> list[Generation]:
        """Generate a response to each prompt.

        Args:
            prompts: a list (or tuple) of ``Prompt``.

        Returns:
            one ``Generation`` per prompt, in order; ``[]`` for no prompts.

        Raises:
            TypeError: ``prompts`` is not a list or tuple, or an entry is not a ``Prompt``.
            ValueError: a prompt's ids outside the model's vocabulary, or a prompt too long
                for ``max_new_tokens`` more tokens within the model's
                ``max_position_embeddings``.
        """
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of Prompt, got {type(prompts).__name__}")
        self._check_prompts(prompts)
        if not prompts:
            return []
        size = self.config.batch_size or len(prompts)
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                return [generation for start in range(0, len(prompts), size)
                        for generation in self._generate(prompts[start:start + size])]
        finally:
            for module, training in modes.items():
                module.training = training

    def _check_prompts(self, prompts) -> None:
        vocab = self.model.get_input_embeddings().num_embeddings
        positions = getattr(self.model.config, "max_position_embeddings", None)
        limit = self.config.max_new_tokens
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, Prompt):
                raise TypeError(f"prompts[{i}] must be a sami_fast.generation.Prompt, got {type(prompt).__name__}")
            if int(prompt.ids.min()) < 0 or int(prompt.ids.max()) >= vocab:
                raise ValueError(f"prompts[{i}].ids must lie in [0, {vocab}) (the model's vocabulary)")
            if positions is not None and len(prompt.ids) + limit > positions:
                raise ValueError(
                    f"prompts[{i}] has {len(prompt.ids)} tokens: with max_new_tokens={limit} it needs "
                    f"{len(prompt.ids) + limit} positions, but the model has {positions} (max_position_embeddings)")

    def _generate(self, prompts) -> list[Generation]:
        """One left-padded ``generate`` call for ``prompts``."""
        from transformers import GenerationConfig as HFGenerationConfig
        from transformers import StoppingCriteriaList

        device = self.model.device
        width = max(len(prompt.ids) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt.ids):] = prompt.ids.to(device)
            attention_mask[row, width - len(prompt.ids):] = 1
        settings = dict(max_new_tokens=self.config.max_new_tokens, do_sample=self.config.do_sample,
                        eos_token_id=self.eos_ids or None, pad_token_id=self.pad_id)
        if self.config.do_sample:
            # top_k=0: off (generate would otherwise fill in its default of 50).
            settings.update(temperature=self.config.temperature, top_p=self.config.top_p, top_k=0)
        stopping = StoppingCriteriaList([_StopStrings(self, width)] if self.config.stop_strings else [])
        # generate fills every setting left unset from model.generation_config: a fresh one
        # for the call keeps a checkpoint's sampling defaults (top_k, repetition penalty, ...) out.
        model_defaults = self.model.generation_config
        self.model.generation_config = HFGenerationConfig()
        try:
            sequences = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                            generation_config=HFGenerationConfig(**settings),
                                            stopping_criteria=stopping)
        finally:
            self.model.generation_config = model_defaults
        return [self.decode(tokens) for tokens in sequences[:, width:].tolist()]

    def decode(self, new_tokens: list[int]) -> Generation:
        """The ``Generation`` of a row of generated token ids: text before the first EOS, cut before a stop string.

        Args:
            new_tokens: the ids generated after the prompt.

        Returns:
            the text decoded without special tokens, ``finished`` when an EOS id or a stop
            string ended it.
        """
        eos_at = next((i for i, token in enumerate(new_tokens) if token in self.eos_ids), None)
        text = self.tokenizer.decode(new_tokens[:eos_at], skip_special_tokens=True)
        stop_at = _stop_position(text, self.config.stop_strings)
        return Generation(text[:stop_at], finished=eos_at is not None or stop_at is not None)


class _StopStrings:
    """Stops a row of ``generate`` once its response text holds a stop string (the text is cut later, in ``decode``)."""

    def __init__(self, generator: HFGenerator, prompt_width: int):
        self.generator, self.prompt_width = generator, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        rows = input_ids[:, self.prompt_width:].tolist()
        return torch.tensor([self.generator.decode(tokens).finished for tokens in rows], device=input_ids.device)


def as_generation(item: Generation | str, name: str = "response") -> Generation:
    """``item`` as a ``Generation``: a ``Generation`` as is, a ``str`` as ``Generation(item, finished=False)``.

    Args:
        item: a ``Generation`` or a str.
        name: what ``item`` is, named in the error.

    Returns:
        the ``Generation``.

    Raises:
        TypeError: ``item`` is anything else (naming ``name``).
    """
    if isinstance(item, Generation):
        return item
    if isinstance(item, str):
        return Generation(item, finished=False)
    raise TypeError(f"{name} must be a str or a sami_fast.generation.Generation, got {type(item).__name__}")


def run_generator(generator: ResponseGenerator, prompts: list[Prompt]) -> list[Generation]:
    """Call ``generator`` on ``prompts``; check it gave one response per prompt and normalise them.

    Args:
        generator: a ``ResponseGenerator``.
        prompts: the prompts to pass it.

    Returns:
        one ``Generation`` per prompt, in order (a str returned as ``Generation(text, finished=False)``).

    Raises:
        TypeError: ``generator`` returned no list or tuple, or an entry neither a ``Generation`` nor a str.
        ValueError: ``generator`` returned another number of responses than prompts.
    """
    responses = generator(prompts)
    if not isinstance(responses, (list, tuple)):
        raise TypeError(f"the response generator must return a list, got {type(responses).__name__}")
    if len(responses) != len(prompts):
        raise ValueError(f"the response generator returned {len(responses)} responses for {len(prompts)} prompts")
    return [as_generation(response, f"response {i} of the generator") for i, response in enumerate(responses)]


def generate_in_batches(generator: ResponseGenerator, prompts: list[Prompt], batch_size: int | None = None,
                        bar=None) -> list[Generation]:
    """``run_generator`` on ``batch_size`` prompts per call (None: all in one call), advancing the
    tqdm ``bar`` (closed at the end) when one is given.

    Args:
        generator: a ``ResponseGenerator``.
        prompts: the prompts, in order.
        batch_size: prompts per ``generator`` call; None (default): all in one call.
        bar: None (default) or a tqdm progress bar, advanced by the prompts of each call.

    Returns:
        one ``Generation`` per prompt, in order (none for no prompts).

    Raises:
        TypeError, ValueError: as ``run_generator``.
    """
    size = batch_size or max(1, len(prompts))  # no prompts: no call
    generations = []
    for start in range(0, len(prompts), size):
        generations += run_generator(generator, prompts[start : start + size])
        if bar is not None:
            bar.update(len(prompts[start : start + size]))
    if bar is not None:
        bar.close()
    return generations


def drop_reason(responses: list[str]) -> str | None:
    """Why one query's responses cannot train, or None when they can.

    A response that is empty after stripping has nothing to score; two identical
    responses make two columns of the SAMI matrix equal, so neither can be told
    apart. Strings are compared exactly as given: pass the texts that are scored.

    Args:
        responses: one query's response texts.

    Returns:
        ``"response j is empty"``, ``"responses i and j are identical"`` (the first such case,
        indices from 0), or None.

    Raises:
        TypeError: ``responses`` is not a list or tuple, or holds a non-str before any empty response.
    """
    if not isinstance(responses, (list, tuple)):
        raise TypeError(f"responses must be a list of str, got {type(responses).__name__}")
    for j, response in enumerate(responses):
        if not isinstance(response, str):
            raise TypeError(f"responses[{j}] must be a str, got {type(response).__name__}")
        if not response.strip():
            return f"response {j} is empty"
    first_index = {}
    for j, response in enumerate(responses):
        if response in first_index:
            return f"responses {first_index[response]} and {j} are identical"
        first_index[response] = j
    return None
