"""Data parallel (DDP) and sharded (FSDP2) SAMI training on 2 CPU processes (gloo) against the one-process run.

One torchrun launch (tests/distributed_job.py) computes every distributed result;
the tests compare them with one-process runs. Bounds follow tests/oracle.py: a
gradient or a first step's loss is compared with the fp64 model's, within k times
the plain fp32 computation's error. Trained weights (no fp64 trainer run exists)
are compared with the one-process run on the same global batch, within k times
the difference between two one-process fp32 runs that differ only in summation
order (the step's queries in one batch vs accumulated one by one): the fp32 noise
of the run, measured here, over the whole model (AdamW turns the noise of
near-zero gradient entries into a few large weight differences: a per-tensor
maximum of them is too erratic a yardstick, the model's is not).
"""

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distributed_job import GRADIENT_CHUNK, GRADIENT_PROBLEM, gradient_model
from oracle import assert_grads_oracle_close, assert_oracle_close, grads_after, parameter_grads
from sami_fast import logprob_matrix, sami_backward, sami_loss
from sami_fast.distributed import resolve_mode
from sami_fast.hf import causal_lm_parts, run_prompts, score_responses
from sami_fast.training import TrainConfig, Trainer
from test_hf import random_problem, tiny_llama
from test_training import _config
from tiny_lm import bpe_tokenizer, tiny_causal_lm

TESTS = Path(__file__).resolve().parent
MODEL_SEED = 7
STEPS = 2
# 3 queries per optimiser step: over 2 ranks an uneven share (2 and 1); clipping active (norms are ~1).
RUN = dict(steps_per_iteration=STEPS, save_steps=1, save_total_limit=STEPS, micro_batch_size=3, max_grad_norm=0.5,
           do_sample=False)
BATCHED = dict(batch_size=3, gradient_accumulation_steps=1)
ACCUMULATED = dict(batch_size=1, gradient_accumulation_steps=3)


def _options(out: Path, **options) -> dict:
    return dataclasses.asdict(_config(out.parent, **{**RUN, **options}, out=str(out)))


def _single(out: Path, resume=False, **options) -> dict:
    """A one-process run; returns its final weights."""
    tokenizer = bpe_tokenizer()
    config = TrainConfig(**_options(out, **options))
    trainer = Trainer(config, model=tiny_causal_lm(tokenizer, seed=MODEL_SEED), tokenizer=tokenizer, resume=resume)
    return AutoModelForCausalLM.from_pretrained(trainer.train()).state_dict()


def _resumable_copy(source: Path, target: Path) -> Path:
    """``source``'s outputs with its last checkpoint removed: a run interrupted after step STEPS - 1."""
    shutil.copytree(source, target)
    checkpoints = sorted((target / "checkpoints").iterdir())
    assert checkpoints[-1].name.endswith(f"step-{STEPS:07d}"), checkpoints
    shutil.rmtree(checkpoints[-1])
    return target


def _free_torchrun(script: Path, spec: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               str(script), str(spec)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    outs = {name: root / name for name in ("batched", "accumulated", "ddp", "fsdp", "fsdp_resumed")}
    weights = {"batched": _single(outs["batched"], **BATCHED),
               "accumulated": _single(outs["accumulated"], **ACCUMULATED)}
    _resumable_copy(outs["batched"], outs["fsdp_resumed"])
    spec = {
        "gradients": {mode: str(root / f"grads-{mode}.pt") for mode in ("ddp", "fsdp")},
        "runs": [
            {"config": _options(outs["ddp"], distributed="ddp", **ACCUMULATED), "model_seed": MODEL_SEED},
            {"config": _options(outs["fsdp"], distributed="fsdp", **ACCUMULATED), "model_seed": MODEL_SEED},
            {"config": _options(outs["fsdp_resumed"], distributed="fsdp", **BATCHED), "model_seed": MODEL_SEED,
             "resume": True},
        ],
        "refused": {"path": str(root / "refused.txt"),
                    "options": _options(root / "refused", distributed="ddp", batch_size=1)},
    }
    (root / "spec.json").write_text(json.dumps(spec))
    job = _free_torchrun(TESTS / "distributed_job.py", root / "spec.json")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-6000:]
    for name in ("ddp", "fsdp", "fsdp_resumed"):
        weights[name] = AutoModelForCausalLM.from_pretrained(outs[name] / "policy").state_dict()
    return {"root": root, "outs": outs, "weights": weights, "spec": spec,
            "first_loss_fp64": _first_step_loss_fp64(outs["batched"])}


def _flat(weights: dict) -> torch.Tensor:
    return torch.cat([weights[name].flatten() for name in sorted(weights)])


def _assert_same_run(ours: dict, batched: dict, accumulated: dict, what: str) -> None:
    """``ours`` within 4 x the one-process runs' summation-order difference of the batched run (whole model)."""
    assert ours.keys() == batched.keys()
    assert not torch.equal(_flat(batched), _flat(accumulated)), "the one-process runs agree bit for bit: no noise"
    assert_oracle_close(_flat(ours), _flat(accumulated), _flat(batched), what=what)


def _first_step_loss_fp64(out: Path) -> float:
    """The SAMI loss of optimiser step 1 (base weights) in fp64, on the examples the run trained on."""
    tokenizer = bpe_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=MODEL_SEED)
    trainer = Trainer(TrainConfig(**_options(out)), model=model, tokenizer=tokenizer)
    chosen = trainer._step_examples(trainer._load_examples(out / "iteration-1" / "data.jsonl"), 1, 0)
    model.double()
    with torch.no_grad():
        return float(sami_loss(logprob_matrix(model, [[p.ids for p in e.prompts] for e in chosen],
                                              [trainer._response_ids(e) for e in chosen])))


def test_ddp_and_fsdp_gradients_equal_the_one_process_gradient(runs):
    """The all-reduced (DDP) / reduce-scattered (FSDP2) gradient of an uneven 2 + 1 share is the whole batch's."""
    problem = dict(GRADIENT_PROBLEM)
    prompts, responses = random_problem(torch.Generator().manual_seed(problem.pop("seed")), **problem)
    model = gradient_model()
    plain = parameter_grads(model, lambda: sami_loss(logprob_matrix(model, prompts, responses)))
    fp64 = copy.deepcopy(model).double()
    truth = parameter_grads(fp64, lambda: sami_loss(logprob_matrix(fp64, prompts, responses)))
    for mode, path in runs["spec"]["gradients"].items():
        saved = torch.load(path, weights_only=True)
        assert_grads_oracle_close(saved["grads"], plain, truth, what=f"{mode} ")
    fsdp = torch.load(runs["spec"]["gradients"]["fsdp"], weights_only=True)
    with torch.no_grad():
        assert_oracle_close(fsdp["matrix"], logprob_matrix(model, prompts, responses),
                            logprob_matrix(fp64, prompts, responses), what="fsdp logprob_matrix")
    assert "its parameters are sharded (FSDP2); pass the PairScorer" in fsdp["refused"]
    ddp = torch.load(runs["spec"]["gradients"]["ddp"], weights_only=True)
    # Two accumulated queries on rank 0, several chunks each: one reduction of the (single) bucket in all.
    assert ddp["bucket_reductions"] == 1, ddp["bucket_reductions"]
    assert GRADIENT_CHUNK < 2 * 2  # C = R = 2: 4 pairs per query, so every query takes two chunks


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_run_equals_the_one_process_run(runs, mode):
    weights, outs = runs["weights"], runs["outs"]
    _assert_same_run(weights[mode], weights["batched"], weights["accumulated"], f"{mode} weights after {STEPS} steps")
    # Generation was split across the ranks and gathered: both hold the examples one process generates.
    ranks = [json.loads((outs[mode] / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["examples"] == ranks[1]["examples"]
    single = [json.loads(line) for line in open(outs["batched"] / "iteration-1" / "data.jsonl")]
    assert ranks[0]["examples"] == [[[r["example_id"], r["responses"]] for r in single if not r["dropped"]]]
    assert (outs[mode] / "iteration-1" / "data.jsonl").read_text() == (
        outs["batched"] / "iteration-1" / "data.jsonl").read_text()
    # Rank 0 alone wrote the metrics: one row per step, global losses as one process computes them.
    rows = {name: [json.loads(line) for line in open(outs[name] / "metrics.jsonl")] for name in (mode, "batched")}
    assert [r["step"] for r in rows[mode]] == list(range(1, STEPS + 1))
    assert all(r["queries"] == 3 for r in rows[mode])
    first = {name: torch.tensor(rows[name][0]["loss"]) for name in rows}
    assert_oracle_close(first[mode], first["batched"], torch.tensor(runs["first_loss_fp64"], dtype=torch.float64),
                        dtype=torch.float32, what=f"{mode} step 1 loss")
    if mode == "ddp":
        # Gradients all-reduced once per optimiser step (the tiny model is one bucket), whatever the
        # micro-batches and chunks: the others ran under no_sync().
        assert [r["bucket_reductions"] for r in ranks] == [STEPS, STEPS]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path, mode):
    resumed_out = _resumable_copy(runs["outs"][mode], tmp_path / "resumed")
    resumed = _single(resumed_out, resume=True, **ACCUMULATED)
    weights = runs["weights"]
    _assert_same_run(resumed, weights["batched"], weights["accumulated"], f"{mode} checkpoint resumed")
    rows = [json.loads(line) for line in open(resumed_out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def test_a_one_process_checkpoint_resumes_under_fsdp(runs):
    weights = runs["weights"]
    _assert_same_run(weights["fsdp_resumed"], weights["batched"], weights["accumulated"], "resumed under fsdp")


def test_too_few_queries_per_step_for_the_ranks_is_refused(runs):
    message = (runs["root"] / "refused.txt").read_text()
    assert "batch_size x gradient_accumulation_steps = 1 queries per optimiser step" in message
    assert "2 processes" in message


def test_the_mode_follows_torchrun_and_bad_modes_are_named(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert resolve_mode("auto") == "none"
    with pytest.raises(ValueError, match="distributed='ddp' needs the processes torchrun starts"):
        resolve_mode("ddp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert resolve_mode("auto") == "ddp"
    with pytest.raises(ValueError, match="distributed='none' but torchrun started WORLD_SIZE=2"):
        resolve_mode("none")
    with pytest.raises(ValueError, match="distributed must be one of auto, none, ddp, fsdp"):
        TrainConfig(distributed="mpi")


def test_padding_chunks_and_a_forced_decoder_call_change_nothing():
    """What keeps FSDP2 ranks in step adds exact zeros: the same scores and gradients, bit for bit."""
    torch.manual_seed(3)
    model = tiny_llama()
    prompts, responses = random_problem(torch.Generator().manual_seed(4), B=2, C=2, R=2)
    plain = grads_after(model, lambda: sami_backward(model, prompts, responses, micro_batch_size=3))
    padded = grads_after(model, lambda: sami_backward(model, prompts, responses, micro_batch_size=3, min_chunks=5))
    assert all(torch.equal(padded[name], plain[name]) for name in plain)

    parts = causal_lm_parts(model)
    one_token = [torch.tensor([5]), torch.tensor([9]), torch.tensor([5])]  # nothing to feed the decoder
    pair_prompt = torch.tensor([0, 1, 1])

    def scores(forced):
        states = run_prompts(parts, prompts[0], pad_id=0)
        return score_responses(parts, states, pair_prompt, one_token, 0, always_run_decoder=forced)

    weights = torch.tensor([0.3, -1.0, 2.0])
    assert torch.equal(scores(True), scores(False))
    forced = parameter_grads(model, lambda: (scores(True) * weights).sum())
    unforced = parameter_grads(model, lambda: (scores(False) * weights).sum())
    assert all(torch.equal(forced[name], unforced[name]) for name in unforced)
