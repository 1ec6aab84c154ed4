"""The SAMI trainer end to end on a tiny random model with an offline-trained tokenizer.

Accumulation, skipped non-finite steps, master weights, schedules, iterations
restarting from the base model, outputs, atomic checkpoints and bit-identical
resume, the CLI on the embedded data, and bad input.
"""

import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from oracle import assert_grads_oracle_close, parameter_grads
from sami_fast import SAMITrainer
from sami_fast.cli import main as cli_main
from sami_fast.trainer import MasterWeights
from sami_fast.training import TrainConfig, Trainer, build_optimizer, build_schedule
from test_hf import random_problem, tiny_llama
from tiny_lm import bpe_tokenizer, tiny_causal_lm

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def _config(tmp_path, **options) -> TrainConfig:
    defaults = dict(out=str(tmp_path / "out"), max_queries=4, num_constitutions=2, principles_per_constitution=1,
                    max_new_tokens=6, iterations=1, batch_size=2, micro_batch_size=8, lr=1e-3, max_grad_norm=None,
                    quiet=True)
    return TrainConfig(**{**defaults, **options})


def _trainer(tmp_path, tokenizer, seed=0, **options) -> Trainer:
    return Trainer(_config(tmp_path, **options), model=tiny_causal_lm(tokenizer, seed=seed), tokenizer=tokenizer)


def _reference_format(path: Path, examples) -> Path:
    """The reference code's pre-generated training JSON: {id: [{prompt, response, example_id}, ...]}."""
    path.write_text(json.dumps({
        str(i): [{"prompt": p, "response": r, "example_id": i} for p, r in zip(prompts, responses)]
        for i, (prompts, responses) in enumerate(examples)
    }))
    return path


FIXED = [
    (["Be concise: answer in one short sentence.\nUser: What causes rain?\nAssistant:",
      "Be verbose and detailed: explain at length.\nUser: What causes rain?\nAssistant:"],
     [" Clouds.", " Water vapour cools, condenses into droplets and falls from clouds, step by step."]),
    (["Answer playfully, with jokes!\nUser: How do I boil an egg?\nAssistant:",
      "Answer in a formal, academic tone.\nUser: How do I boil an egg?\nAssistant:"],
     [" Put it in boiling water, ha!", " Place the egg in boiling water for seven minutes, then cool it."]),
]


# ---------------------------------------------------------------- SAMITrainer pieces


def test_accumulated_micro_batches_equal_one_larger_batch():
    """k micro-batches weighted by their share give the gradient of one batch k times larger."""
    torch.manual_seed(0)
    model = tiny_llama()
    prompts, responses = random_problem(torch.Generator().manual_seed(11), B=3, C=2, R=2)
    trainer = SAMITrainer(model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=3)

    def accumulated():
        for b, share in ((slice(0, 1), 1 / 3), (slice(1, 3), 2 / 3)):  # unequal micro-batches
            trainer.accumulate(prompts[b], responses[b], weight=share)

    from sami_fast import logprob_matrix, sami_loss

    ours = parameter_grads(model, lambda: (accumulated(), torch.zeros((), requires_grad=True))[1])
    plain = parameter_grads(model, lambda: sami_loss(logprob_matrix(model, prompts, responses)))
    fp64 = copy.deepcopy(model).double()
    truth = parameter_grads(fp64, lambda: sami_loss(logprob_matrix(fp64, prompts, responses)))
    assert_grads_oracle_close(ours, plain, truth, what="accumulated ")


def test_non_finite_gradient_skips_the_step_bit_identically():
    torch.manual_seed(1)
    model = tiny_llama()
    prompts, responses = random_problem(torch.Generator().manual_seed(12), B=1, C=2, R=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = SAMITrainer(model, optimizer, micro_batch_size=4)
    assert trainer.step(prompts, responses)["skipped"] is False  # the optimizer now holds moments
    weights = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(optimizer.state_dict())
    poisoned = model.model.layers[0].mlp.up_proj.weight
    handle = poisoned.register_hook(lambda grad: grad * float("nan"))  # as from a too-large learning rate
    with pytest.warns(RuntimeWarning, match="SAMI step skipped"):
        result = trainer.step(prompts, responses)
    handle.remove()
    assert result["skipped"] is True and not math.isfinite(result["grad_norm"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    after = optimizer.state_dict()
    for index, state in moments["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), (index, key)
    assert all(p.grad is None for p in model.parameters())
    assert trainer.step(prompts, responses)["skipped"] is False  # training goes on


def test_bf16_updates_at_small_learning_rates_need_master_weights():
    """At lr 5e-7 AdamW moves each weight by about 5e-7: far below half a bf16 ulp of weights ~1e-2, so lost."""
    torch.manual_seed(2)
    prompts, responses = random_problem(torch.Generator().manual_seed(13), B=1, C=2, R=2)
    changed = {}
    for use_master in (False, True):
        model = tiny_llama().to(torch.bfloat16)
        model.model.embed_tokens.weight.requires_grad_(False)  # rows of unseen tokens get no gradient at all
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        master = MasterWeights(model) if use_master else None
        optimizer = torch.optim.AdamW(master.parameters() if master else model.parameters(), lr=5e-7)
        trainer = SAMITrainer(model, optimizer, micro_batch_size=4, master_weights=master)
        initial_master = [m.detach().clone() for m in master.parameters()] if master else None
        for _ in range(3):
            trainer.step(prompts, responses)
        total = sum(p.numel() for p in before)
        trained = [p for p in model.parameters() if p.requires_grad]
        changed[use_master] = sum(int((p != b).sum()) for p, b in zip(trained, before)) / total
        if master:
            moved = sum(int((m != i).sum()) for m, i in zip(master.parameters(), initial_master)) / total
            assert moved > 0.9  # the fp32 copy takes (almost) every update
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert changed[False] < 0.05, changed  # plain bf16: the updates round away
    assert changed[True] >= changed[False]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_follow_their_shape(schedule):
    config = TrainConfig(lr=1.0, warmup_steps=2, lr_schedule=schedule)
    optimizer = build_optimizer(config, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = build_schedule(config, optimizer, total_steps=6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    expected = {"constant": [1.0, 1.0, 1.0], "linear": [0.75, 0.5, 0.25],
                "cosine": [0.5 * (1 + math.cos(math.pi * p)) for p in (0.25, 0.5, 0.75)]}[schedule]
    assert rates[3:] == pytest.approx(expected)


def test_rmsprop_and_sgd_are_built():
    parameter = torch.nn.Parameter(torch.zeros(1))
    assert isinstance(build_optimizer(TrainConfig(optimizer="rmsprop"), [parameter]), torch.optim.RMSprop)
    assert isinstance(build_optimizer(TrainConfig(optimizer="sgd"), [parameter]), torch.optim.SGD)


# ---------------------------------------------------------------- the loop


def test_mi_lower_bound_rises_on_a_fixed_dataset(tmp_path, tokenizer):
    data = _reference_format(tmp_path / "train.json", FIXED)
    trainer = _trainer(tmp_path, tokenizer, train_data=str(data), steps_per_iteration=12, lr=3e-3)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))
    mi = [r["mi_lower_bound"] for r in rows]
    assert all(r["skipped"] is False for r in rows)
    assert mi[-1] > mi[0] + 0.1, mi
    assert all(abs(r["mi_lower_bound"] - (math.log(2) - r["loss"])) < 1e-5 for r in rows)


def test_pregenerated_data_of_mixed_sizes_trains_and_reports_skipped_examples(tmp_path, tokenizer):
    three = (["Be concise.\nUser: Hi?\nAssistant:", "Be verbose.\nUser: Hi?\nAssistant:",
              "Be playful!\nUser: Hi?\nAssistant:"], [" Hi.", " Hello there, how are you today?", " Hey hey!"])
    data = _reference_format(tmp_path / "train.json", FIXED + [three, (FIXED[0][0], [" Clouds.", ""])])
    trainer = _trainer(tmp_path, tokenizer, train_data=str(data), batch_size=3, steps_per_iteration=2)
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "out" / "iteration-1" / "data.jsonl")]
    assert {r["example_id"]: bool(r["dropped"]) for r in records} == {"0": False, "1": False, "2": False, "3": True}
    assert sorted(len(r["responses"]) for r in records if not r["dropped"]) == [2, 2, 3]
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(rows) == 2 and all(r["queries"] == 3 and math.isfinite(r["loss"]) for r in rows)


def test_reference_constitution_directory_gives_positive_and_negative(tmp_path, tokenizer):
    pairs = tmp_path / "constitutions"
    pairs.mkdir()
    for name, (positive, negative) in {"a.json": ("Be kind.", "Be rude."), "b.json": ("Be brief.", "Ramble.")}.items():
        (pairs / name).write_text(json.dumps({"positive": positive, "negative": negative}))
    trainer = _trainer(tmp_path, tokenizer, principles=str(pairs), steps_per_iteration=1)
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "out" / "iteration-1" / "data.jsonl")]
    assert all(r["constitutions"] in (["Be kind.", "Be rude."], ["Be brief.", "Ramble."]) for r in records)


@pytest.mark.parametrize("score_eos", [False, True])
def test_a_finished_response_is_scored_with_its_eos_only_when_asked(tmp_path, tokenizer, score_eos):
    from sami_fast.training import Example

    trainer = _trainer(tmp_path, tokenizer, score_eos=score_eos)
    example = Example(example_id="0", query="q", constitutions=["a", "b"], prompts=[], responses=[" done", " cut"],
                      finished=[True, False])
    finished, cut = trainer._response_ids(example)
    text_ids = tokenizer(" done", add_special_tokens=False).input_ids
    assert finished.tolist() == text_ids + ([tokenizer.eos_token_id] if score_eos else [])
    assert cut.tolist() == tokenizer(" cut", add_special_tokens=False).input_ids


def test_each_iteration_restarts_from_the_base_model_and_generates_with_the_last_policy(tmp_path, tokenizer):
    seen = []

    def make_generator(model, tokenizer, config):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return lambda prompts: [f" answer {i % 2} {len(p.ids)}" for i, p in enumerate(prompts)]

    trainer = Trainer(_config(tmp_path, iterations=2, steps_per_iteration=2),
                      model=tiny_causal_lm(tokenizer, seed=3), tokenizer=tokenizer, make_generator=make_generator)
    base = copy.deepcopy(trainer.base_state)
    final = trainer.train()
    first_policy = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "iteration-1" / "policy").state_dict()
    assert all(torch.equal(seen[0][k], base[k]) for k in base)  # iteration 1 generates with the base model
    assert all(torch.equal(seen[1][k], first_policy[k]) for k in base)  # iteration 2 with iteration 1's policy
    assert any(not torch.equal(first_policy[k], base[k]) for k in base)
    # Iteration 2 trained from the base on its own data: its policy differs from iteration 1's.
    second = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert any(not torch.equal(second[k], first_policy[k]) for k in base)


def test_duplicate_or_empty_responses_drop_their_query(tmp_path, tokenizer):
    def make_generator(model, tokenizer, config):
        def generate(prompts):
            out = []
            for i, _ in enumerate(prompts):
                query, j = divmod(i, 2)
                out.append({0: " same", 1: "   "}.get(query, f" fine {j}") if query < 2 else f" ok {j}")
            return out
        return generate

    trainer = Trainer(_config(tmp_path, steps_per_iteration=1), model=tiny_causal_lm(tokenizer), tokenizer=tokenizer,
                      make_generator=make_generator)
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "out" / "iteration-1" / "data.jsonl")]
    dropped = {r["example_id"]: r["dropped"] for r in records if r["dropped"]}
    assert set(dropped) == {"0", "1"}
    assert "identical" in dropped["0"] and "empty" in dropped["1"]
    assert sum(not r["dropped"] for r in records) == 2


def test_outputs_load_and_describe_the_run(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, steps_per_iteration=2, iterations=2)
    final = trainer.train()
    out = tmp_path / "out"
    for n in (1, 2):
        records = [json.loads(line) for line in open(out / f"iteration-{n}" / "data.jsonl")]
        assert len(records) == 4 and all(len(r["responses"]) == 2 for r in records)
        assert all(len(r["constitutions"]) == 2 and r["query"] for r in records)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(r["iteration"], r["step"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for key in ("loss", "mi_lower_bound", "row_accuracy", "column_accuracy", "grad_norm", "lr", "tokens_per_s",
                "skipped_steps"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert (out / "metrics.csv").read_text().count("\n") == 5
    assert (out / "training.png").stat().st_size > 1000
    loaded = AutoModelForCausalLM.from_pretrained(final)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


# ---------------------------------------------------------------- checkpoints


def _final_weights(path: Path) -> dict:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tokenizer):
    options = dict(iterations=2, steps_per_iteration=2, save_steps=1, batch_size=1, gradient_accumulation_steps=2,
                   max_queries=2, max_new_tokens=4, do_sample=True, temperature=1.5)
    straight = _trainer(tmp_path / "a", tokenizer, **options)
    reference = _final_weights(straight.train())

    interrupted = _trainer(tmp_path / "b", tokenizer, **options)
    calls = {"n": 0}
    original = interrupted._train_step

    def stop_in_iteration_two(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # iteration 2, step 2: as if the process were killed here
            raise KeyboardInterrupt
        return original(*args)

    interrupted._train_step = stop_in_iteration_two
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    changed = dict(options, lr=2e-3)
    with pytest.raises(ValueError, match="resume: the checkpoint was written with other options: lr"):
        Trainer(_config(tmp_path / "b", **changed), model=tiny_causal_lm(tokenizer), tokenizer=tokenizer,
                resume=True).train()
    resumed = Trainer(_config(tmp_path / "b", **options), model=tiny_causal_lm(tokenizer), tokenizer=tokenizer,
                      resume=True)
    result = _final_weights(resumed.train())
    for name, value in reference.items():
        assert torch.equal(result[name], value), name
    rows = lambda d: [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "seconds")}
                      for line in open(d / "out" / "metrics.jsonl")]
    assert rows(tmp_path / "b") == rows(tmp_path / "a")


KILLED_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import torch
    import sami_fast.training as training
    from tiny_lm import bpe_tokenizer, tiny_causal_lm

    torch.set_num_threads({threads})  # the test's own count: the resumed run must be bit-identical to it

    saves = {{"n": 0}}
    real_save = torch.save

    def slow_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if str(path).endswith("model.pt"):
            saves["n"] += 1
            if saves["n"] == 3:  # the third checkpoint: hang half-written until killed
                print("MID-SAVE", flush=True)
                time.sleep(600)

    training.torch.save = slow_save
    tokenizer = bpe_tokenizer()
    config = training.TrainConfig.from_file({config!r})
    training.Trainer(config, model=tiny_causal_lm(tokenizer), tokenizer=tokenizer).train()
""")


def test_a_kill_mid_save_leaves_only_loadable_checkpoints(tmp_path, tokenizer):
    out = tmp_path / "out"
    config = _config(tmp_path, max_new_tokens=4, batch_size=1, steps_per_iteration=4, save_steps=1,
                     save_total_limit=5)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(tests=str(TESTS), config=str(tmp_path / "config.json"),
                                         threads=torch.get_num_threads()))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "MID-SAVE"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    checkpoints = sorted((out / "checkpoints").iterdir())
    complete = [p for p in checkpoints if not p.name.startswith(".")]
    assert [p.name for p in complete] == ["iteration-001-step-0000001", "iteration-001-step-0000002"]
    assert any(p.name.startswith(".tmp-") for p in checkpoints)  # the half-written one, never renamed
    resumed = Trainer(config, model=tiny_causal_lm(tokenizer), tokenizer=tokenizer, resume=True)
    assert resumed._latest_checkpoint()["step"] == 2
    final = _final_weights(resumed.train())
    straight = Trainer(dataclasses.replace(config, out=str(tmp_path / "straight")), model=tiny_causal_lm(tokenizer),
                       tokenizer=tokenizer)
    reference = _final_weights(straight.train())
    assert all(torch.equal(final[k], v) for k, v in reference.items())


# ---------------------------------------------------------------- CLI and bad input


def test_cli_trains_on_the_embedded_data(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "tiny"
    tiny_causal_lm(tokenizer, seed=4).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = tmp_path / "config.yaml"
    config.write_text("num_constitutions: 2\nprinciples_per_constitution: 1\nmax_new_tokens: 5\nlr: 0.001\n")
    out = tmp_path / "out"
    code = cli_main(["train", "--config", str(config), "--model", str(model_dir), "--out", str(out),
                     "--max-queries", "4", "--iterations", "1", "--steps-per-iteration", "2", "--quiet"])
    assert code == 0
    assert "policy in" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out / "policy").config.vocab_size == len(tokenizer)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_cli_reports_bad_options(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"learning_rate": 1e-5}))
    assert cli_main(["train", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "unknown option(s) learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("options, match", [
    ({"num_constitutions": 1}, "num_constitutions must be at least 2"),
    ({"lr": -1.0}, "lr must be"),
    ({"optimizer": "lion"}, "optimizer must be one of"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
    ({"top_p": 1.5}, "top_p"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"train_data": "x.json", "iterations": 2}, "iterations must be 1"),
    ({"stop_strings": [""]}, "stop_strings"),
    ({"logits_budget_mb": -1}, "logits_budget_mb must be a non-negative int"),
])
def test_config_rejects_bad_values(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)


def test_unknown_config_keys_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\nbatchsize: 2\nwarmup: 3\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown option\(s\) batchsize, warmup"):
        TrainConfig.from_file(path)
    good = tmp_path / "d.json"
    good.write_text('{"lr": 0.5, "stop_strings": ["\\n\\n"]}')
    assert TrainConfig.from_file(good).lr == 0.5 and TrainConfig.from_file(good).stop_strings == ["\n\n"]
    broken = tmp_path / "e.json"
    broken.write_text('{"lr": 0.5,')
    with pytest.raises(ValueError, match="e.json: not valid JSON"):
        TrainConfig.from_file(broken)


def test_template_and_positions_are_checked(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="template"):
        _trainer(tmp_path, tokenizer, template="{query} only")
    trainer = _trainer(tmp_path, tokenizer, max_new_tokens=250)  # the tiny model has 256 positions
    with pytest.raises(ValueError, match=r"queries\.jsonl:1: prompt of \d+ tokens \+ max_new_tokens 250"):
        trainer.train()
