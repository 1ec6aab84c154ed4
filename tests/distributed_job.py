"""The work tests/test_distributed.py runs under torchrun (2 processes, gloo): ``python -m torch.distributed.run
--nproc-per-node 2 --standalone tests/distributed_job.py SPEC.json``.

SPEC holds ``gradients`` (where rank 0 writes the all-reduced gradients of one accumulated step, per mode),
``runs`` (Trainer runs: mode, config options, model seed, resume), and ``refused`` (where rank 0 writes the
error a too small step gets). One launch does all of it: starting processes costs more than the work.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402

from sami_fast import logprob_matrix  # noqa: E402
from sami_fast.distributed import Parallel  # noqa: E402
from sami_fast.trainer import SAMITrainer  # noqa: E402
from sami_fast.training import TrainConfig, Trainer  # noqa: E402
from test_hf import random_problem, tiny_llama  # noqa: E402
from tiny_lm import bpe_tokenizer, tiny_causal_lm  # noqa: E402

# One accumulated step: 3 queries over 2 ranks (2 and 1), one query per micro-batch, 3 pairs per chunk.
GRADIENT_PROBLEM = dict(seed=11, B=3, C=2, R=2)
GRADIENT_CHUNK = 3


def count_reductions(ddp) -> list:
    """A list that gets one entry per bucket DDP all-reduces (DDP's own all-reduce, counted)."""
    reductions = []

    def hook(state, bucket):
        reductions.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    return reductions


def gradient_model():
    with torch.random.fork_rng():
        torch.manual_seed(5)
        return tiny_llama()


def gradients(mode: str, path: str) -> None:
    """This mode's gradient of the whole problem's SAMI loss, each rank doing its share; rank 0 saves it."""
    parallel = Parallel(mode)
    model = gradient_model()
    scorer = parallel.wrap(model)
    trainer = SAMITrainer(model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=GRADIENT_CHUNK,
                          scorer=scorer)
    problem = dict(GRADIENT_PROBLEM)
    prompts, responses = random_problem(torch.Generator().manual_seed(problem.pop("seed")), **problem)
    everyone = list(range(len(prompts)))
    queries = parallel.share(everyone)
    reductions = count_reductions(scorer) if mode == "ddp" else []
    # One call per query; under FSDP2 rank 1 makes a zero-weight second call, as the Trainer does.
    chunks = -(-problem["C"] * problem["R"] // GRADIENT_CHUNK)
    schedule = parallel.lockstep(lambda rank: [chunks] * len(parallel.share(everyone, rank)))
    calls = [(b, None) for b in queries] if schedule is None else [
        (queries[i] if i < len(queries) else None, n) for i, n in enumerate(schedule)]
    for index, (b, min_chunks) in enumerate(calls):
        weight = 0.0 if b is None else parallel.gradient_scale() / len(prompts)
        b = queries[0] if b is None else b
        trainer.accumulate(prompts[b : b + 1], responses[b : b + 1], weight=weight,
                           sync_gradients=index == len(calls) - 1, min_chunks=min_chunks)
    from torch.distributed.tensor import DTensor

    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
             for name, p in model.named_parameters()}
    result = {"grads": grads, "bucket_reductions": len(reductions)}
    if mode == "fsdp":
        # The whole matrix through the sharded root (every rank the same problem), and the sharded
        # model itself refused: outside the root's forward its head weight is a shard.
        with torch.no_grad():
            result["matrix"] = logprob_matrix(scorer, prompts, responses, micro_batch_size=GRADIENT_CHUNK)
        try:
            logprob_matrix(model, prompts, responses)
        except ValueError as error:
            result["refused"] = str(error)
    if parallel.is_main:
        torch.save(result, path)


def run(spec: dict) -> None:
    """One Trainer run; every rank writes the examples it ended with, DDP counts its gradient reductions."""
    tokenizer = bpe_tokenizer()
    config = TrainConfig(**spec["config"])
    trainer = Trainer(config, model=tiny_causal_lm(tokenizer, seed=spec["model_seed"]), tokenizer=tokenizer,
                      resume=spec.get("resume", False))
    rank = trainer.parallel.rank
    seen = []
    generate = trainer.generate_examples

    def recording(iteration):
        examples, dropped = generate(iteration)
        seen.append([[e.example_id, e.responses] for e in examples])
        return examples, dropped

    trainer.generate_examples = recording
    reductions = count_reductions(trainer.scorer) if config.distributed == "ddp" else []
    trainer.train()
    out = Path(config.out)
    (out / f"rank-{rank}.json").write_text(json.dumps({"examples": seen, "bucket_reductions": len(reductions)}))


def refused(path: str, options: dict) -> None:
    tokenizer = bpe_tokenizer()
    try:
        Trainer(TrainConfig(**options), model=tiny_causal_lm(tokenizer), tokenizer=tokenizer)
    except ValueError as error:
        if dist.get_rank() == 0:
            Path(path).write_text(str(error))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    for mode, path in spec["gradients"].items():
        gradients(mode, path)
    for item in spec["runs"]:
        run(item)
    refused(**spec["refused"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
