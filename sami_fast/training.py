"""SAMI end to end: principles -> constitutions -> self-generated responses -> MI training -> iterations.

For iteration n = 1..N (as in the paper and its reference code):

1. for every training query, C constitutions (``sami_fast.data.ConstitutionSampler``);
2. response j is generated under constitution j by the policy of iteration n-1
   (iteration 1: the base model), all prompts in batched calls of a
   ``ResponseGenerator`` (the seam where another engine plugs in);
3. training starts again from the base model, on those (query, C constitutions,
   C responses) examples, with the SAMI loss on the (B, C, C) matrix, for
   ``steps_per_iteration`` optimiser steps (``SAMITrainer``: gradient caching,
   accumulation, clipping, skipping non-finite steps);
4. the iteration's policy is saved; it generates the data of iteration n+1.

``Trainer(TrainConfig(...)).train()`` runs it; ``sami-fast train`` is the same
from the command line. Everything lands in ``config.out`` (see ``Trainer``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sami_fast import data as sami_data
from sami_fast.distributed import MODES as DISTRIBUTED_MODES
from sami_fast.distributed import Parallel, resolve_mode
from sami_fast.generation import GenerationConfig, HFGenerator, Prompt, drop_reason, generate_in_batches
from sami_fast.models import DTYPES, load_causal_lm
from sami_fast.trainer import MasterWeights, SAMITrainer, _check_template, _prompt_text
from sami_fast.validation import check_positive_int

OPTIMIZERS = ("adamw", "rmsprop", "sgd")
# The embedded data's first queries train (a default run fits in minutes on a CPU); the rest are held out.
EMBEDDED_TRAINING_QUERIES = 12
TRAIN_CONFIG_FILE = "train_config.json"  # the options of a run, written into its output directory
SCHEDULES = ("constant", "linear", "cosine")
METRIC_COLUMNS = (
    "iteration", "step", "loss", "mi_lower_bound", "row_accuracy", "column_accuracy", "grad_norm", "lr",
    "tokens_per_s", "queries", "skipped", "skipped_steps", "seconds",
)


class ConfigFile:
    """``from_file`` / ``from_dict`` for an options dataclass (``TrainConfig``, ``EvalConfig``)."""

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: object) -> ConfigFile:
        """A config from a YAML (``.yaml``/``.yml``) or JSON file; unknown keys are an error naming them.

        Args:
            path: the file (``read_file``).
            **overrides: options that replace the file's.

        Returns:
            an instance of the class it is called on.

        Raises:
            FileNotFoundError, ValueError: as ``read_file`` and ``from_dict`` (``where`` is ``path``).
        """
        return cls.from_dict({**cls.read_file(path), **overrides}, where=str(path))

    @staticmethod
    def read_file(path: str | os.PathLike) -> dict:
        """The option mapping a YAML or JSON config file holds.

        Args:
            path: a ``.yaml``/``.yml`` file (read as YAML; an empty one holds no option) or any
                other file (read as JSON).

        Returns:
            the mapping of option names to values, unchecked.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: not valid YAML/JSON (the parser's message says where), or not a mapping.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config: no file at {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as error:  # the parsers' own errors say where
            kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
            raise ValueError(f"{path}: not valid {kind}: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path}: must hold a mapping of option names to values")
        return values

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> ConfigFile:
        """A config from a mapping of option names to values.

        Args:
            values: option name -> value; options left out keep their defaults.
            where: where ``values`` came from, named in the unknown-option error.

        Returns:
            an instance of the class it is called on.

        Raises:
            ValueError: an unknown option (naming them all, after ``where``), or a bad value
                (the class's own checks, naming the option).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}")
        return cls(**values)

    # Checks for __post_init__; each error names the option.

    def _positive_int(self, name, allow_none=False, allow_zero=False):
        check_positive_int(name, getattr(self, name), allow_none=allow_none, allow_zero=allow_zero)

    def _number(self, name, low, allow_none=False, inclusive=False):
        value = getattr(self, name)
        if value is None and allow_none:
            return
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or (value < low if inclusive else value <= low):
            raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low}, got {value!r}")

    def _choice(self, name, choices):
        if getattr(self, name) not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")


@dataclass
class TrainConfig(ConfigFile):
    """Everything a SAMI run needs; ``TrainConfig.from_file`` reads it from YAML or JSON.

    Every option is checked on construction.

    Attributes:
        model: the base model: a model directory, cached hub name or ``.gguf`` file; None
            (default): SmolLM2-135M-Instruct.
        out: the output directory (default ``"sami-out"``; see ``Trainer``).
        queries: the training queries: JSONL ``{"query": ...}`` or text, one per line;
            None (default): the embedded example data.
        principles: a principle file, ready constitution list, or the reference code's
            directory of positive/negative pairs; None (default): the embedded example data.
        train_data: the reference code's pre-generated training JSON instead (no
            generation; one iteration: ``iterations`` must be 1); default None.
        max_queries: the first N queries only; None (default): all of them (embedded data:
            the first ``EMBEDDED_TRAINING_QUERIES``).
        num_constitutions: C, constitutions per query, at least 2 (default 4).
        principles_per_constitution: principles drawn per constitution from a principle
            file (ready constitutions are used as they are); None: the whole pool; default 2.
        template: None (default): the tokenizer's chat template if it has one, else a plain
            template (``sami_fast.trainer.PLAIN_TEMPLATE``); ``"chat"``; or a format string
            with ``{constitution}`` and ``{query}`` (as in ``encode_prompts``).
        max_new_tokens: the most tokens a generated response may have (default 32).
        do_sample: sample (the default) or decode greedily: greedy decoding often writes the
            same response under different constitutions, and a query whose responses repeat
            cannot train (it is dropped).
        temperature: the sampling temperature, > 0 (default 0.7).
        top_p: the nucleus sampling mass, in (0, 1] (default 0.9).
        stop_strings: a response ends before the first of these it contains (non-empty
            strings; default none).
        generation_batch_size: prompts per generate call; None (default): all in one call.
        score_reduction: ``"mean"`` (default, the reference code's) or ``"sum"`` of the
            response-token log-probs.
        score_eos: score a finished response with its EOS token (default False; the
            reference code never does).
        iterations: N, the SAMI iterations (default 2).
        steps_per_iteration: optimiser steps per iteration; None (default): one pass over
            the iteration's examples.
        batch_size: queries per micro-step (default 2).
        gradient_accumulation_steps: micro-steps per optimiser step (default 1).
        micro_batch_size: (prompt, response) pairs per gradient-caching chunk (default 16).
        logits_budget_mb: MiB of LM-head logits each chunk may keep for its backward instead
            of recomputing them (the PyTorch path, e.g. on CPU; ``SAMITrainer``'s
            ``logits_budget``); 0 (default) keeps none.
        optimizer: ``"adamw"`` (default), ``"rmsprop"`` or ``"sgd"`` (``build_optimizer``).
        lr: the learning rate, > 0; the default 1e-4 suits the default run (SmolLM2-135M, a
            dozen steps); larger models want 1e-6..1e-5.
        weight_decay: >= 0 (default 0.0).
        lr_schedule: ``"constant"`` (default), ``"linear"`` or ``"cosine"`` (``build_schedule``).
        warmup_steps: linear warm-up steps, a non-negative int (default 0).
        max_grad_norm: clip the global gradient norm to this (> 0); None: no clipping;
            default 1.0.
        dtype: the weights' dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``.
        master_weights: an fp32 master copy for low-precision weights (``MasterWeights``);
            None (default): on unless ``dtype`` is float32.
        seed: an int (default 0); seeds constitutions, generation, batches and dropout.
        distributed: ``"auto"`` (default): ddp when torchrun started more than one process,
            else none; ``"none"``: one process; ``"ddp"``: data parallel; ``"fsdp"``:
            FSDP2-sharded. batch_size x gradient_accumulation_steps queries per optimiser
            step in total, whatever the number of processes (each takes its share).
        save_steps: a checkpoint every N optimiser steps (and always at an iteration's end);
            None (default): only at an iteration's end.
        save_total_limit: checkpoints kept (default 2).
        quiet: no progress bars or printed reports (default False).

    Raises:
        ValueError: a bad option value, naming the option.
    """

    model: str | None = None  # model directory, cached hub name, .gguf file; None: SmolLM2-135M-Instruct
    out: str = "sami-out"
    queries: str | None = None
    principles: str | None = None
    train_data: str | None = None
    max_queries: int | None = None  # the first N queries only (embedded data: EMBEDDED_TRAINING_QUERIES)
    # constitutions and prompts
    num_constitutions: int = 4
    principles_per_constitution: int | None = 2
    template: str | None = None  # None: the tokenizer's chat template if it has one, else a plain template
    # generation
    max_new_tokens: int = 32
    # Sampled by default: greedy decoding often writes the same response under different
    # constitutions, and a query whose responses repeat cannot train (it is dropped).
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    stop_strings: list = field(default_factory=list)
    generation_batch_size: int | None = None  # prompts per generate call; None: all in one call
    # scoring
    score_reduction: str = "mean"  # mean (the reference code's) or sum of response-token log-probs
    score_eos: bool = False  # score a finished response with its EOS token (the reference code never does)
    # optimisation
    iterations: int = 2
    steps_per_iteration: int | None = None  # None: one pass over the iteration's examples
    batch_size: int = 2  # queries per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimiser step
    micro_batch_size: int = 16  # (prompt, response) pairs per gradient-caching chunk
    logits_budget_mb: int = 0  # MiB of LM-head logits a chunk may keep for its backward (no recompute)
    optimizer: str = "adamw"
    lr: float = 1e-4  # suits the default run (SmolLM2-135M, a dozen steps); larger models want 1e-6..1e-5
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    dtype: str = "float32"  # the weights' dtype: float32, bfloat16, float16
    master_weights: bool | None = None  # fp32 master copy for low-precision weights; None: on unless float32
    seed: int = 0
    # auto: ddp when torchrun started more than one process, else none; none: one process; ddp:
    # data parallel; fsdp: FSDP2-sharded. batch_size x gradient_accumulation_steps queries per
    # optimiser step in total, whatever the number of processes (each takes its share).
    distributed: str = "auto"
    # outputs
    save_steps: int | None = None  # a checkpoint every N optimiser steps (and always at an iteration's end)
    save_total_limit: int = 2  # checkpoints kept
    quiet: bool = False

    def __post_init__(self):
        positive_int, number, choice = self._positive_int, self._number, self._choice
        for name in ("num_constitutions", "max_new_tokens", "iterations", "batch_size",
                     "gradient_accumulation_steps", "micro_batch_size", "save_total_limit"):
            positive_int(name)
        for name in ("max_queries", "principles_per_constitution", "generation_batch_size", "steps_per_iteration",
                     "save_steps"):
            positive_int(name, allow_none=True)
        positive_int("logits_budget_mb", allow_zero=True)
        if self.num_constitutions < 2:
            raise ValueError(
                f"num_constitutions must be at least 2 (SAMI contrasts constitutions), got {self.num_constitutions}")
        number("lr", 0)
        number("temperature", 0)
        number("top_p", 0)
        if self.top_p > 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        number("weight_decay", 0, inclusive=True)
        number("max_grad_norm", 0, allow_none=True)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {self.warmup_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        choice("optimizer", OPTIMIZERS)
        choice("lr_schedule", SCHEDULES)
        choice("score_reduction", ("mean", "sum"))
        choice("dtype", tuple(DTYPES))
        choice("distributed", DISTRIBUTED_MODES)
        if (not isinstance(self.stop_strings, (list, tuple))
                or not all(isinstance(s, str) and s for s in self.stop_strings)):
            raise ValueError(f"stop_strings must be a list of non-empty strings, got {self.stop_strings!r}")
        self.stop_strings = list(self.stop_strings)
        for name in ("model", "queries", "principles", "train_data", "template"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string (a path) or None, got {value!r}")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a directory path, got {self.out!r}")
        if self.train_data is not None and self.iterations != 1:
            raise ValueError("train_data trains on pre-generated responses: iterations must be 1 with it")

    @property
    def uses_master_weights(self) -> bool:
        """Whether the optimizer steps fp32 master copies: ``master_weights``, or when None, dtype not float32."""
        return self.dtype != "float32" if self.master_weights is None else self.master_weights


@dataclass
class Example:
    """One training query: its C prompts (prompt k under constitution k) and C responses
    (response j under constitution j).

    Attributes:
        example_id: the query's id (its index among the queries, or the pre-generated data's key).
        query: the query text; None for pre-generated data (its prompts are already rendered).
        constitutions: the C constitution texts (empty for pre-generated data).
        prompts: C ``Prompt`` (text and ids).
        responses: C response texts.
        finished: C bools: ended by EOS or a stop string.
        fields: the query's other fields in a JSONL query file (default empty).
    """

    example_id: str
    query: str | None
    constitutions: list
    prompts: list  # C Prompt (text and ids)
    responses: list  # C response texts
    finished: list  # C bools: ended by EOS or a stop string
    fields: dict = field(default_factory=dict)


def constitution_sampler(config: ConfigFile,
                         source: sami_data.ConstitutionSource | None = None) -> sami_data.ConstitutionSampler:
    """The sampler of ``config``'s constitutions.

    Args:
        config: a ``TrainConfig`` or ``EvalConfig``: its ``principles`` (None: the embedded
            principle file), ``num_constitutions``, ``principles_per_constitution`` (applied
            to principle files only; ready constitutions are used as they are) and ``seed``.
        source: a ``ConstitutionSource`` already read, used instead of ``config.principles``.

    Returns:
        a ``sami_fast.data.ConstitutionSampler``.

    Raises:
        sami_fast.data.DataError: a bad principles file, or ``num_constitutions`` /
            ``principles_per_constitution`` the source cannot satisfy.
    """
    if source is None:
        source = sami_data.load_constitution_source(config.principles or sami_data.embedded_principles_path())
    # principles_per_constitution applies to principle files; ready constitutions are used as they are.
    per_constitution = config.principles_per_constitution if source.principles is not None else None
    return sami_data.ConstitutionSampler(source, num_constitutions=config.num_constitutions,
                                         principles_per_constitution=per_constitution, seed=config.seed)


def build_prompt(tokenizer, constitution: str, query: str, template: str) -> Prompt:
    """The generation prompt of ``query`` under ``constitution``, as ``encode_prompts`` renders it.

    Args:
        tokenizer: a Hugging Face tokenizer.
        constitution: the constitution text.
        query: the query text.
        template: ``"chat"`` or a format string with ``{constitution}`` and ``{query}`` (not
            None: the effective template, as ``Trainer.template``).

    Returns:
        a ``Prompt``: the rendered text and its token ids.

    Raises:
        ValueError: the text tokenizes to no tokens.
        KeyError: a format ``template`` with a named field other than those two.
    """
    text, add_special_tokens = _prompt_text(tokenizer, constitution, query, template)
    ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    return Prompt(text=text, ids=torch.tensor(ids, dtype=torch.long))


def build_optimizer(config: TrainConfig, parameters: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """AdamW, RMSprop (the reference code's; torch's has no bias correction) or SGD over ``parameters``.

    Args:
        config: its ``optimizer``, ``lr`` and ``weight_decay``.
        parameters: the tensors to step (the model's trainable parameters or fp32 master copies).

    Returns:
        the optimizer, torch's defaults for every other setting.

    Raises:
        ValueError: ``parameters`` is empty (torch's check).
    """
    parameters = list(parameters)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, weight_decay=config.weight_decay)


def build_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant, linear decay to 0, or cosine decay to 0
    at ``total_steps``.

    Step s (0-based) scales the learning rate by ``(s + 1) / (warmup_steps + 1)`` during the
    warm-up; after it, by 1 (``"constant"``), ``1 - progress`` (``"linear"``) or
    ``(1 + cos(pi * progress)) / 2`` (``"cosine"``), where ``progress`` rises from 0 at the
    warm-up's end to 1 at ``total_steps`` (and stays 1 after).

    Args:
        config: its ``warmup_steps`` and ``lr_schedule``.
        optimizer: the optimizer whose learning rate the schedule scales.
        total_steps: the optimiser steps of the run (of one iteration, in ``Trainer``).

    Returns:
        a ``LambdaLR``; step it once per applied optimiser step.
    """
    warmup, kind = config.warmup_steps, config.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _write_atomically(path: Path, write) -> None:
    """``write(tmp_path)`` then rename: a reader never sees a partly written ``path``."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    write(tmp)
    _fsync(tmp)
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    paths = sorted(path.rglob("*")) + [path] if path.is_dir() else [path]
    for item in paths:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _rng_states() -> dict:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


def _phase_seed(seed: int, iteration: int, phase: int) -> int:
    """A seed per (iteration, phase): each phase starts from a known RNG state, so a resumed run draws the same."""
    return (seed * 1_000_003 + iteration * 101 + phase) % (2**63)


class Trainer:
    """Runs SAMI iterations (module docstring) and writes into ``config.out``:

    - ``iteration-N/data.jsonl``: the generated examples (query, constitutions,
      responses, finished flags) and the dropped queries with the reason;
    - ``iteration-N/policy/``: the iteration's policy as a Hugging Face model
      directory (safetensors, config, tokenizer); ``policy/`` is the last one;
    - ``metrics.jsonl`` and ``metrics.csv``: one row per optimiser step;
      ``training.png``: loss and MI lower bound per step, one line per iteration;
    - ``checkpoints/iteration-N-step-S/``: model, optimizer, scheduler, master
      weights, RNG states, iteration and step, written atomically; ``resume=True``
      continues from the latest one, bit-identically to an uninterrupted run.

    Args:
        config: the run's options.
        model, tokenizer: an already loaded base model and its tokenizer, both or neither
            (default: ``config.model`` is loaded); moved to the run's device and
            ``config.dtype``.
        make_generator: ``make_generator(model, tokenizer, config)`` -> the response
            generator for the current policy (default ``HFGenerator`` with the config's
            generation options): the seam for another engine.
        resume: continue from the latest checkpoint in ``config.out`` (default False).

    Raises:
        TypeError: ``config`` is not a ``TrainConfig``.
        ValueError: only one of ``model`` and ``tokenizer``; a ``distributed`` mode the
            launch does not allow, or fewer queries per optimiser step than processes; a
            bad ``template`` for the tokenizer; no query to train on;
            ``sami_fast.data.DataError`` for a bad queries or principles file.
        FileNotFoundError: ``config.model`` names no model that can be loaded.
    """

    def __init__(self, config: TrainConfig, *, model: torch.nn.Module | None = None, tokenizer=None,
                 make_generator: Callable | None = None, resume: bool = False):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither (then config.model is loaded)")
        self.config = config
        self.out = Path(config.out)
        self.resume = resume
        self.parallel = Parallel(resolve_mode(config.distributed))
        self.parallel.check_step_size(config.batch_size * config.gradient_accumulation_steps)
        self.device = self.parallel.device
        dtype = DTYPES[config.dtype]
        if config.quiet:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # loading and GGUF-conversion bars too
        if model is None:
            model, tokenizer = load_causal_lm(config.model, dtype)
        self.model = model.to(self.device, dtype)
        # Every forward runs through the scorer (DDP's reducer and FSDP's hooks see it); under FSDP
        # the model's parameters are shards from here on, and so is base_state.
        self.scorer = self.parallel.wrap(self.model)
        self.tokenizer = tokenizer
        self.template = _check_template(tokenizer, config.template)
        self.make_generator = make_generator or (lambda model, tokenizer, cfg: HFGenerator(
            model, tokenizer, GenerationConfig(
                max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, temperature=cfg.temperature,
                top_p=cfg.top_p, stop_strings=tuple(cfg.stop_strings))))
        # Each iteration restarts from the base weights.
        self.base_state = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        self.queries = None if config.train_data else self._load_queries()
        self.sampler = None if self.queries is None else constitution_sampler(config)
        self.skipped_steps = 0

    # ------------------------------------------------------------------ data

    def _load_queries(self) -> list:
        queries = sami_data.load_queries(self.config.queries or sami_data.embedded_queries_path())
        limit = self.config.max_queries
        if limit is None and self.config.queries is None:
            limit = EMBEDDED_TRAINING_QUERIES
        if limit is not None:
            queries = queries[:limit]
        if not queries:
            raise ValueError(f"{self.config.queries or 'the embedded queries'}: no query to train on")
        return queries

    def _prompt(self, constitution: str, query: str) -> Prompt:
        return build_prompt(self.tokenizer, constitution, query, self.template)

    def _check_prompt_room(self, prompt: Prompt, where: str) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        needed = len(prompt.ids) + self.config.max_new_tokens
        if limit is not None and needed > limit:
            raise ValueError(
                f"{where}: prompt of {len(prompt.ids)} tokens + max_new_tokens {self.config.max_new_tokens} = {needed} "
                f"exceeds the model's {limit} positions"
            )

    def generate_examples(self, iteration: int) -> tuple[list[Example], list[tuple[Example, str]]]:
        """(examples, dropped): C prompts per query and the current policy's response under each.

        Each query gets C constitutions from the sampler; the generator (``make_generator``
        on the current model) writes response j under constitution j, with torch's RNG
        seeded from ``config.seed`` and ``iteration``. With several processes each
        generates for its share of the queries and every one gets all the generations.
        Not for a ``train_data`` run (there are no queries).

        Args:
            iteration: the iteration (from 1) the examples are for.

        Returns:
            ``(examples, dropped)``: the ``Example`` of each query that can train, and
            ``(example, reason)`` for each that cannot (``drop_reason``: an empty response,
            or two identical ones).

        Raises:
            ValueError: a prompt that tokenizes to no tokens; a prompt whose tokens plus
                ``max_new_tokens`` exceed the model's positions (naming the query's file and line).
            TypeError, ValueError: a generator that does not return one ``Generation`` or
                str per prompt (``run_generator``).
        """
        C = self.config.num_constitutions
        plans = []
        for index, query in enumerate(self.queries):
            constitutions = self.sampler.for_query(index)
            prompts = [self._prompt(c, query.text) for c in constitutions]
            for prompt in prompts:
                self._check_prompt_room(prompt, query.where)
            plans.append((index, query, constitutions, prompts))
        flat = [prompt for _, _, _, prompts in plans for prompt in prompts]
        torch.manual_seed(_phase_seed(self.config.seed, iteration, 0))
        generator = self.make_generator(self.model, self.tokenizer, self.config)
        # Each process generates for its share of the queries; every one gets all the generations.
        generations = self.parallel.generate(
            self.scorer, lambda prompts: self._generate_in_batches(generator, prompts, iteration), flat, group=C)
        examples, dropped = [], []
        for n, (index, query, constitutions, prompts) in enumerate(plans):
            own = generations[n * C : (n + 1) * C]
            example = Example(
                example_id=str(index), query=query.text, constitutions=constitutions, prompts=prompts,
                responses=[g.text for g in own], finished=[g.finished for g in own], fields=query.fields,
            )
            reason = drop_reason(example.responses)
            (dropped if reason else examples).append((example, reason) if reason else example)
        return examples, dropped

    def _generate_in_batches(self, generator, prompts: list, iteration: int) -> list:
        """``generation_batch_size`` prompts per generator call, with a progress bar."""
        bar = self._bar(total=len(prompts), unit="prompt", desc=f"generate {iteration}/{self.config.iterations}")
        return generate_in_batches(generator, prompts, self.config.generation_batch_size, bar)

    def _raw_prompt(self, text: str) -> Prompt:
        """A prompt already rendered (the reference code's training data): tokenized with the tokenizer's own BOS."""
        return Prompt(text=text, ids=torch.tensor(self.tokenizer(text).input_ids, dtype=torch.long))

    def pregenerated_examples(self) -> tuple[list[Example], list[tuple[Example, str]]]:
        """The examples of ``config.train_data`` (the reference code's pre-generated training format).

        The prompts are the data's rendered texts, tokenized with the tokenizer's own BOS;
        no response counts as finished.

        Returns:
            ``(examples, dropped)``: an ``Example`` (``query`` None, no constitutions) per
            usable example, and ``(example, reason)`` per example ``load_training_data``
            left out, the example holding only its ``example_id``.

        Raises:
            sami_fast.data.DataError: a bad training data file (as ``load_training_data``).
        """
        loaded, skipped = sami_data.load_training_data(self.config.train_data)
        examples = [Example(example_id=item.example_id, query=None, constitutions=[],
                            prompts=[self._raw_prompt(text) for text in item.prompts],
                            responses=list(item.responses), finished=[False] * len(item.prompts))
                    for item in loaded]
        dropped = [(Example(example_id=i, query=None, constitutions=[], prompts=[], responses=[], finished=[]), why)
                   for i, why in skipped]
        return examples, dropped

    def _save_examples(self, path: Path, examples: list, dropped: list) -> None:
        if not self.parallel.is_main:
            return

        def write(tmp: Path):
            with open(tmp, "w", encoding="utf-8") as f:
                for example in examples:
                    f.write(json.dumps(self._example_record(example, None)) + "\n")
                for example, reason in dropped:
                    f.write(json.dumps(self._example_record(example, reason)) + "\n")

        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, write)

    @staticmethod
    def _example_record(example: Example, dropped_reason) -> dict:
        return {
            "example_id": example.example_id, "query": example.query, "constitutions": example.constitutions,
            "prompts": [p.text for p in example.prompts], "responses": example.responses,
            "finished": example.finished, "dropped": dropped_reason,
            **({"fields": example.fields} if example.fields else {}),
        }

    def _load_examples(self, path: Path) -> list:
        """The examples ``_save_examples`` wrote (a resumed iteration trains on exactly the data it generated)."""
        examples = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record["dropped"]:
                    continue
                if record["query"] is None:
                    prompts = [self._raw_prompt(text) for text in record["prompts"]]
                else:
                    prompts = [self._prompt(c, record["query"]) for c in record["constitutions"]]
                examples.append(Example(example_id=record["example_id"], query=record["query"],
                                        constitutions=record["constitutions"], prompts=prompts,
                                        responses=record["responses"], finished=record["finished"],
                                        fields=record.get("fields", {})))
        return examples

    def _response_ids(self, example: Example) -> list:
        eos = self.tokenizer.eos_token_id
        ids = []
        for text, finished in zip(example.responses, example.finished):
            tokens = self.tokenizer(text, add_special_tokens=False).input_ids
            if self.config.score_eos and finished and eos is not None:
                tokens = tokens + [eos]
            if not tokens:
                raise ValueError(f"example {example.example_id}: a response tokenizes to no tokens")
            ids.append(torch.tensor(tokens, dtype=torch.long))
        return ids

    # ------------------------------------------------------------------ training

    def _fresh_state(self):
        """Base weights, a new optimizer (over fp32 master copies for low-precision weights)."""
        self.model.load_state_dict(self.base_state)
        master = MasterWeights(self.model) if self.config.uses_master_weights else None
        parameters = master.parameters() if master else [p for p in self.model.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.config, parameters)
        return master, optimizer

    def _steps(self, n_examples: int) -> int:
        per_step = self.config.batch_size * self.config.gradient_accumulation_steps
        return self.config.steps_per_iteration or max(1, math.ceil(n_examples / per_step))

    def _step_examples(self, examples: list, iteration: int, step: int) -> list:
        """The queries of optimiser step ``step`` (0-based): epochs of seeded permutations, so the
        position is the step."""
        per_step = self.config.batch_size * self.config.gradient_accumulation_steps
        chosen = []
        for position in range(step * per_step, (step + 1) * per_step):
            epoch, offset = divmod(position, len(examples))
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(
                _phase_seed(self.config.seed, iteration, 2 + epoch)))
            chosen.append(examples[int(order[offset])])
        return chosen

    def _micro_batches(self, examples: list) -> list:
        """``examples`` in micro-batches of ``batch_size``, each split into groups of equal C (one SAMI matrix each)."""
        size = self.config.batch_size
        micro_batches = [examples[i : i + size] for i in range(0, len(examples), size)]
        # Pre-generated examples may have different C: one SAMI matrix per group of equal C.
        return [[e for e in batch if len(e.prompts) == c] for batch in micro_batches
                for c in sorted({len(e.prompts) for e in batch})]

    def _accumulation_calls(self, chosen: list) -> list:
        """(batch, min_chunks) per accumulate call of this process: its share of ``chosen`` in micro-batches.

        Under FSDP2 the calls are padded to the schedule every rank follows
        (``Parallel.lockstep``); a call with batch None is one this rank makes with zero weight.
        """
        pairs_per_chunk = self.config.micro_batch_size
        share = lambda rank: self._micro_batches(self.parallel.share(chosen, rank))
        mine = share(self.parallel.rank)
        schedule = self.parallel.lockstep(
            lambda rank: [-(-sum(len(e.prompts) ** 2 for e in batch) // pairs_per_chunk) for batch in share(rank)])
        if schedule is None:
            return [(batch, None) for batch in mine]
        return [(mine[call] if call < len(mine) else None, chunks) for call, chunks in enumerate(schedule)]

    def _train_step(self, trainer: SAMITrainer, chosen: list) -> dict:
        """One optimiser step on ``chosen``; with several processes each takes its share (``Parallel.share``)."""
        start = time.perf_counter()
        tokens = 0
        totals = {}
        calls = self._accumulation_calls(chosen)
        for index, (batch, min_chunks) in enumerate(calls):
            last = index == len(calls) - 1
            if batch is None:
                # The 2 x 2 corner of one of this rank's queries: no more chunks than any real call.
                example = calls[0][0][0]
                trainer.accumulate([[p.ids for p in example.prompts[:2]]], [self._response_ids(example)[:2]],
                                   weight=0.0, sync_gradients=last, min_chunks=min_chunks)
                continue
            prompts = [[p.ids for p in example.prompts] for example in batch]
            responses = [self._response_ids(example) for example in batch]
            # The ranks' gradients are averaged: scaled by the world size, the average is the whole step's gradient.
            weight = len(batch) * self.parallel.gradient_scale() / len(chosen)
            result = trainer.accumulate(prompts, responses, weight=weight, sync_gradients=last, min_chunks=min_chunks)
            for name, value in result.items():
                totals[name] = totals.get(name, 0.0) + value * len(batch) / len(chosen)
            C = len(prompts[0])
            tokens += sum(len(p) for row in prompts for p in row) + C * sum(len(r) for row in responses for r in row)
        applied = trainer.apply()
        totals = self.parallel.sum({**totals, "tokens": tokens})
        tokens = totals.pop("tokens")
        seconds = time.perf_counter() - start
        return {**totals, **applied, "tokens_per_s": tokens / seconds, "queries": len(chosen), "seconds": seconds}

    def train(self) -> Path:
        """Run every iteration; returns the directory of the last policy.

        On the main process, a fresh run (no checkpoint resumed) removes ``metrics.jsonl``
        and ``metrics.csv`` from ``config.out`` and writes the run's options to
        ``train_config.json`` (``TRAIN_CONFIG_FILE``). With ``resume`` the run continues
        from the latest checkpoint; without one it starts from the beginning, with a warning.

        Returns:
            ``config.out / "policy"``: a copy of the last iteration's policy (every process
            returns once the outputs exist).

        Raises:
            ValueError: ``resume`` from a checkpoint written with other options (all but
                ``out``, ``quiet``, ``save_steps``, ``save_total_limit`` and ``distributed``
                must match), naming them; as ``generate_examples`` and
                ``pregenerated_examples``.
            RuntimeError: an iteration where every query was dropped (nothing to train on).

        Warns:
            UserWarning: ``resume`` but no checkpoint in ``config.out / "checkpoints"``.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint = self._latest_checkpoint() if self.resume else None
        if checkpoint is not None:
            self._check_same_options(checkpoint["config"])
        if self.resume and checkpoint is None:
            warnings.warn(f"resume: no checkpoint in {self.out / 'checkpoints'}; starting from the beginning",
                          stacklevel=2)
        if checkpoint is None and self.parallel.is_main:
            for name in ("metrics.jsonl", "metrics.csv"):
                (self.out / name).unlink(missing_ok=True)
            # The run's options, for `sami-fast eval` (its default base is the model trained from).
            (self.out / TRAIN_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        first_iteration = 1 if checkpoint is None else checkpoint["iteration"]
        for iteration in range(first_iteration, self.config.iterations + 1):
            resuming = checkpoint if checkpoint is not None and checkpoint["iteration"] == iteration else None
            if resuming is not None and resuming["step"] == resuming["total_steps"]:
                self._load_model_weights(resuming)  # the finished iteration's policy generates the next data
                checkpoint = None
                continue
            self._run_iteration(iteration, resuming)
            checkpoint = None
        policy = self.out / f"iteration-{self.config.iterations}" / "policy"
        final = self.out / "policy"
        if self.parallel.is_main:
            self._write_plot()
            _write_atomically(final, lambda tmp: shutil.copytree(policy, tmp))
        self.parallel.barrier()  # every process returns once the outputs exist
        return final

    def _run_iteration(self, iteration: int, checkpoint) -> None:
        config = self.config
        data_path = self.out / f"iteration-{iteration}" / "data.jsonl"
        if checkpoint is not None and data_path.is_file():
            examples = self._load_examples(data_path)
        else:
            if config.train_data:
                examples, dropped = self.pregenerated_examples()
            else:
                examples, dropped = self.generate_examples(iteration)
            self._save_examples(data_path, examples, dropped)
            self._report(f"iteration {iteration}: {len(examples)} examples, {len(dropped)} queries dropped"
                         + "".join(f"\n  dropped {e.example_id}: {why}" for e, why in dropped[:5]))
        if not examples:
            raise RuntimeError(f"iteration {iteration}: every query was dropped (see {data_path}); nothing to train on")
        master, optimizer = self._fresh_state()
        total_steps = self._steps(len(examples))
        schedule = build_schedule(config, optimizer, total_steps)
        trainer = SAMITrainer(self.model, optimizer, micro_batch_size=config.micro_batch_size,
                              max_grad_norm=config.max_grad_norm, master_weights=master,
                              reduction=config.score_reduction, scorer=self.scorer,
                              logits_budget=config.logits_budget_mb * 2**20)
        first_step = 0
        torch.manual_seed(_phase_seed(config.seed, iteration, 1))
        if checkpoint is not None:
            first_step = self._restore(checkpoint, optimizer, schedule, master)
        self.model.train()
        bar = self._bar(total=total_steps, initial=first_step, desc=f"train {iteration}/{config.iterations}")
        for step in range(first_step, total_steps):
            row = self._train_step(trainer, self._step_examples(examples, iteration, step))
            if row["skipped"]:
                self.skipped_steps += 1
            else:
                schedule.step()
            row = {"iteration": iteration, "step": step + 1, "lr": optimizer.param_groups[0]["lr"],
                   "skipped_steps": self.skipped_steps, **row}
            self._log(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", mi=f"{row['mi_lower_bound']:.4f}",
                                tok_s=f"{row['tokens_per_s']:.0f}")
            done = step + 1 == total_steps
            if done:
                self.model.eval()
                self._save_policy(iteration)
            if done or (config.save_steps and (step + 1) % config.save_steps == 0):
                self._save_checkpoint(iteration, step + 1, total_steps, optimizer, schedule, master)
        if bar is not None:
            bar.close()
        self.model.eval()

    def _bar(self, **kwargs):
        if self.config.quiet or not self.parallel.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(**{"unit": "step", **kwargs})

    def _report(self, text: str) -> None:
        if not self.config.quiet and self.parallel.is_main:
            print(text, flush=True)

    # ------------------------------------------------------------------ outputs

    def _log(self, row: dict) -> None:
        if not self.parallel.is_main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        path = self.out / "metrics.csv"
        new = not path.is_file()
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _save_policy(self, iteration: int) -> None:
        # Under FSDP the weights are gathered (every process takes part); the model's own state dict otherwise.
        state = self.parallel.model_state(self.model) if self.parallel.mode == "fsdp" else None
        if not self.parallel.is_main:
            return

        def write(tmp: Path):
            self.model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
            self.tokenizer.save_pretrained(tmp)

        _write_atomically(self.out / f"iteration-{iteration}" / "policy", write)

    def _write_plot(self) -> None:
        rows = [json.loads(line) for line in open(self.out / "metrics.jsonl", encoding="utf-8")]
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, 2, figsize=(10, 4))
        for iteration in sorted({r["iteration"] for r in rows}):
            mine = [r for r in rows if r["iteration"] == iteration]
            for axis, key in zip(axes, ("loss", "mi_lower_bound")):
                axis.plot([r["step"] for r in mine], [r[key] for r in mine], marker="o", label=f"iteration {iteration}")
        for axis, title in zip(axes, ("SAMI loss", "MI lower bound (log C - loss)")):
            axis.set_title(title)
            axis.set_xlabel("optimiser step")
            axis.legend()
        figure.tight_layout()
        figure.savefig(self.out / "training.png", dpi=100)
        plt.close(figure)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def _save_checkpoint(self, iteration, step, total_steps, optimizer, schedule, master) -> None:
        # Full tensors in the single-process format (gathered under FSDP): any number of processes
        # loads them. Every process takes part in gathering; rank 0 writes.
        model_state = self.parallel.model_state(self.model)
        rng = _rng_states()
        state = {
            "iteration": iteration, "step": step, "total_steps": total_steps, "skipped_steps": self.skipped_steps,
            "optimizer": self.parallel.optimizer_state(optimizer), "schedule": schedule.state_dict(),
            "master": self.parallel.master_state(master), "rng": rng, "rank_rng": self.parallel.rng_states(rng),
            "config": dataclasses.asdict(self.config),
        }
        if not self.parallel.is_main:
            self.parallel.barrier()
            return

        def write(tmp: Path):
            tmp.mkdir(parents=True)
            torch.save(model_state, tmp / "model.pt")
            torch.save(state, tmp / "state.pt")

        directory = self._checkpoint_dir() / f"iteration-{iteration:03d}-step-{step:07d}"
        directory.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(directory, write)
        kept = sorted(p for p in self._checkpoint_dir().iterdir() if p.name.startswith("iteration-"))
        for old in kept[: -self.config.save_total_limit]:
            shutil.rmtree(old)
        self.parallel.barrier()  # the checkpoint exists for every process

    def _latest_checkpoint(self):
        directory = self._checkpoint_dir()
        if not directory.is_dir():
            return None
        complete = sorted(p for p in directory.iterdir() if p.name.startswith("iteration-"))
        if not complete:
            return None
        latest = complete[-1]
        state = torch.load(latest / "state.pt", weights_only=False)
        state["path"] = latest
        return state

    def _check_same_options(self, saved: dict) -> None:
        """A resumed run must train as the interrupted one did (only the output options may differ)."""
        # distributed: how many processes run it, not what it trains (checkpoints load in any mode).
        free = {"out", "quiet", "save_steps", "save_total_limit", "distributed"}
        current = dataclasses.asdict(self.config)
        differ = sorted(k for k in current if k not in free and saved.get(k) != current[k])
        if differ:
            raise ValueError(
                "resume: the checkpoint was written with other options: "
                + ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {current[k]!r})" for k in differ)
            )

    def _load_model_weights(self, checkpoint) -> None:
        self.parallel.load_model_state(self.model, torch.load(checkpoint["path"] / "model.pt", weights_only=True))
        self.skipped_steps = checkpoint["skipped_steps"]
        self._keep_metrics_until(checkpoint["iteration"], checkpoint["step"])

    def _restore(self, checkpoint, optimizer, schedule, master) -> int:
        self._load_model_weights(checkpoint)
        self.parallel.load_optimizer_state(optimizer, checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        if master is not None:
            self.parallel.load_master_state(master, checkpoint["master"])
        _set_rng_states(self.parallel.own_rng_states(checkpoint))
        return checkpoint["step"]

    def _keep_metrics_until(self, iteration: int, step: int) -> None:
        """Drop metric rows written after the checkpoint (they are computed again)."""
        if not self.parallel.is_main:
            return
        path = self.out / "metrics.jsonl"
        rows = [json.loads(line) for line in open(path, encoding="utf-8")] if path.is_file() else []
        rows = [r for r in rows if (r["iteration"], r["step"]) <= (iteration, step)]
        for name in ("metrics.jsonl", "metrics.csv"):
            (self.out / name).unlink(missing_ok=True)
        for row in rows:
            self._log(row)
