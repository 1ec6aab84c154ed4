"""`sami-fast eval` on tiny random models with an offline-trained tokenizer, and once on SmolLM2-135M.

Order-swap symmetry of the judge, identical policies, token lengths, the length-controlled
win rate on synthetic verdicts, held-out MI against a direct fp64 computation, the CLI on
the output of a tiny `sami-fast train` run, and bad input.
"""

import json
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PhiConfig, PreTrainedTokenizerFast

from oracle import (
    K_MATRIX, assert_matrix_oracle_close, assert_oracle_close, assert_stats_oracle_close, fp64_twin,
    full_sequence_matrix, ulp_floor,
)
from sami_fast import reference
from sami_fast.cli import main as cli_main
from sami_fast.data import DataError
from sami_fast import evaluation
from sami_fast.evaluation import (
    EvalConfig, Evaluator, Judge, bootstrap_interval, held_out_queries, length_controlled_win_rate, policy_models,
    training_base, training_queries,
)
from sami_fast.hf import load_smollm2
from sami_fast.models import load_causal_lm
from sami_fast.trainer import _check_template
from sami_fast.training import EMBEDDED_TRAINING_QUERIES, build_prompt
from tiny_lm import bpe_tokenizer, tiny_causal_lm

# Judge prompts hold two responses and the instructions: more positions than training prompts need.
JUDGE_POSITIONS = 4096


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def _config(tmp_path, **options) -> EvalConfig:
    defaults = dict(policy="unused", out=str(tmp_path / "eval"), max_queries=3, num_constitutions=2,
                    principles_per_constitution=1, max_new_tokens=6, bootstrap_samples=200, quiet=True)
    return EvalConfig(**{**defaults, **options})


def _tiny(tokenizer, seed):
    return tiny_causal_lm(tokenizer, seed=seed, max_positions=JUDGE_POSITIONS), tokenizer


def _first_position_judge(tokenizer):
    """A tiny Phi whose LM-head bias puts nearly all mass on "A", whatever the prompt says."""
    config = PhiConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=JUDGE_POSITIONS,
                       pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.bias[tokenizer.convert_tokens_to_ids("A")] += 60.0
    return model, tokenizer


def _run(tmp_path, tokenizer, *, base_seed=0, policy_seed=1, judge=None, **options):
    config = _config(tmp_path, **options)
    judge = judge or _tiny(tokenizer, 2)
    policies = [("policy", 1, *_tiny(tokenizer, policy_seed))]
    return Evaluator(config, base=_tiny(tokenizer, base_seed), judge=judge, policies=policies).run()


# ---------------------------------------------------------------- the judge and the win rate


def test_a_judge_preferring_the_first_position_gives_exactly_half(tmp_path, tokenizer):
    result = _run(tmp_path, tokenizer, judge=_first_position_judge(tokenizer), tie_margin=0.0)
    records = result.comparisons
    assert len(records) == 3 * 2 and not any(r["identical"] for r in records)  # real comparisons, not identical pairs
    for record in records:
        assert record["p_policy_as_a"] > 1 - 1e-12 and record["p_policy_as_b"] < 1e-12  # it always says "A"
        assert record["p_policy"] == 0.5 and record["verdict"] == 0.5
    row = result.rows[1]
    assert (row["win_rate"], row["win_low"], row["win_high"]) == (0.5, 0.5, 0.5)
    assert (row["wins"], row["ties"], row["losses"]) == (0, 6, 0) and row["lc_win_rate"] == 0.5
    assert row["judge_order_agreement"] == 0.0  # the two orders always disagree: pure position bias


def test_identical_greedy_policies_tie_everywhere(tmp_path, tokenizer):
    result = _run(tmp_path, tokenizer, base_seed=3, policy_seed=3)
    assert all(r["identical"] and r["verdict"] == 0.5 for r in result.comparisons)
    base, policy = result.rows
    assert policy["win_low"] <= 0.5 <= policy["win_high"] and policy["win_rate"] == 0.5
    # The same model gives the same responses, hence the same held-out MI.
    assert base["mi_lower_bound"] == policy["mi_lower_bound"]


def test_identical_sampled_policies_give_about_half(tmp_path, tokenizer):
    """Two draws from one model: the responses differ, the judge decides (no tie margin), the interval covers 0.5."""
    result = _run(tmp_path, tokenizer, base_seed=3, policy_seed=3, do_sample=True, temperature=1.0, top_p=1.0,
                  tie_margin=0.0, max_queries=6, bootstrap_samples=500)
    assert sum(r["identical"] for r in result.comparisons) == 0
    row = result.rows[1]
    assert row["wins"] > 0 and row["losses"] > 0
    assert row["win_low"] <= 0.5 <= row["win_high"]
    assert row["win_low"] <= row["win_rate"] <= row["win_high"]


def test_batched_judge_scores_match_one_prompt_at_a_time(tokenizer):
    """Judge prompts of different lengths in one batch: each verdict log-prob as its full sequence gives it."""
    model, _ = _tiny(tokenizer, 2)
    comparisons = [("- Be concise.", "What causes rain?", " Clouds.", " Water vapour cools and falls."),
                   ("- Answer playfully, with jokes!", "How do I boil an egg?", " Ha!", " Seven minutes.")]
    judge = Judge(model, tokenizer, batch_size=2)
    ours = judge.logprobs(comparisons)
    prompts = [[judge.prompt_ids(c, q, policy, base), judge.prompt_ids(c, q, base, policy)]
               for c, q, policy, base in comparisons]
    assert_matrix_oracle_close(ours.float(), model, prompts, [judge.letter_ids] * 2, what="judge log-probs")
    preferences = judge.preferences(comparisons)
    assert np.array_equal(preferences["p_policy_as_a"], torch.sigmoid(ours[:, 0, 0] - ours[:, 0, 1]).numpy())
    assert np.array_equal(preferences["p_policy_as_b"], torch.sigmoid(ours[:, 1, 1] - ours[:, 1, 0]).numpy())


# ---------------------------------------------------------------- lengths, length control, MI


def test_lengths_are_counted_in_tokens(tmp_path, tokenizer):
    result = _run(tmp_path, tokenizer)
    for record in result.comparisons:
        for side in ("policy", "base"):
            text = record[f"{side}_response"]
            assert record[f"{side}_tokens"] == len(tokenizer(text, add_special_tokens=False).input_ids)
    assert any(r["policy_tokens"] != len(r["policy_response"]) for r in result.comparisons)  # not characters
    base, policy = result.rows
    assert policy["mean_tokens"] == np.mean([r["policy_tokens"] for r in result.comparisons])
    assert base["mean_tokens"] == policy["base_mean_tokens"] == np.mean([r["base_tokens"] for r in result.comparisons])


def test_length_controlled_win_rate_recovers_a_known_effect():
    """Verdicts drawn from P(win) = sigmoid(a + b * length difference) with the policy mostly longer:
    the raw win rate is inflated by length, the estimate at zero difference recovers sigmoid(a)."""
    rng = np.random.default_rng(0)
    a, b = -0.4, 0.04  # at equal length the policy loses 40% : 60%; each extra token helps
    queries, per_query = 800, 4
    difference = rng.normal(30.0, 20.0, size=queries * per_query)
    verdict = (rng.random(difference.size) < 1 / (1 + np.exp(-(a + b * difference)))).astype(float)
    rate, slope = length_controlled_win_rate(verdict, difference)
    groups = [np.arange(q * per_query, (q + 1) * per_query) for q in range(queries)]
    low, high = bootstrap_interval(lambda rows: length_controlled_win_rate(verdict[rows], difference[rows])[0],
                                   groups, 200, seed=1)
    truth = 1 / (1 + np.exp(-a))
    assert low <= truth <= high and high - low < 0.1
    assert abs(slope - b) < 0.01
    assert verdict.mean() > high  # the raw rate is not what the policy is worth at equal length


def test_length_controlled_win_rate_with_no_length_difference_is_the_win_rate():
    verdict = np.array([1.0, 1.0, 0.5, 0.0])
    rate, slope = length_controlled_win_rate(verdict, np.zeros(4), prior=0.0)
    assert abs(rate - verdict.mean()) < 1e-12 and slope == 0.0


def test_held_out_mi_matches_a_direct_computation(tmp_path, tokenizer):
    """The MI lower bound and accuracies against reference.stats of the full-sequence matrix in fp64."""
    model = _tiny(tokenizer, 0)[0]
    config = _config(tmp_path, do_sample=True, temperature=1.0, top_p=1.0, max_queries=2, num_constitutions=3,
                     principles_per_constitution=2, win_rate=False)
    result = Evaluator(config, base=(model, tokenizer), policies=[]).run()
    assert result.comparisons == [] and len(result.rows) == 1
    row = result.rows[0]
    lines = [json.loads(line) for line in (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(len(set(line["responses"])) == 3 for line in lines)
    template = _check_template(tokenizer, None)
    prompts = [[build_prompt(tokenizer, c, line["query"], template).ids for c in line["constitutions"]]
               for line in lines]
    responses = [[torch.tensor(tokenizer(text, add_special_tokens=False).input_ids) for text in line["responses"]]
                 for line in lines]
    with torch.no_grad():
        plain = full_sequence_matrix(model, prompts, responses)
        truth = full_sequence_matrix(fp64_twin(model), prompts, responses)
    stats = {name: row[name] for name in ("row_accuracy", "column_accuracy", "mi_lower_bound")}
    assert_stats_oracle_close(row["sami_loss"], stats, plain, truth)
    assert row["mi_queries"] == 2
    tiny = 2 * ulp_floor(truth, torch.float32)  # as assert_stats_oracle_close: the bound cancels below the scores
    for b, line in enumerate(lines):  # each query's bound, as exported
        assert_oracle_close(torch.tensor(line["mi_lower_bound"], dtype=torch.float32),
                            reference.stats(plain[b : b + 1])["mi_lower_bound"],
                            reference.stats(truth[b : b + 1])["mi_lower_bound"], k=K_MATRIX, tiny=tiny,
                            what=f"MI lower bound of query {b}")


# ---------------------------------------------------------------- the CLI on a training run


def test_cli_evaluates_every_iteration_of_a_training_run(tmp_path, tokenizer, capsys, monkeypatch):
    base_dir, judge_dir = tmp_path / "base", tmp_path / "judge"
    for directory, seed in ((base_dir, 4), (judge_dir, 2)):
        _tiny(tokenizer, seed)[0].save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    train_out = tmp_path / "train"
    assert cli_main(["train", "--model", str(base_dir), "--out", str(train_out), "--max-queries", "2",
                     "--iterations", "2", "--num-constitutions", "2", "--principles-per-constitution", "1",
                     "--max-new-tokens", "4", "--lr", "0.01", "--quiet"]) == 0
    one_iteration = train_out / "iteration-2" / "policy"
    assert policy_models(str(one_iteration)) == [("iteration-2", 2, str(one_iteration))]
    lines = (train_out / "iteration-1" / "data.jsonl").read_text().splitlines()
    trained = {json.loads(line)["query"] for line in lines}
    assert training_queries(str(one_iteration)) == training_queries(str(train_out)) == trained and len(trained) == 2
    config = tmp_path / "eval.yaml"
    config.write_text("num_constitutions: 2\nprinciples_per_constitution: 1\nmax_new_tokens: 4\n"
                      "bootstrap_samples: 100\n")
    out = tmp_path / "eval"
    capsys.readouterr()
    assert training_base(str(train_out)) == training_base(str(one_iteration)) == str(base_dir)
    loaded = []  # no --base: the base is the model the run trained from, not the default SmolLM2
    monkeypatch.setattr(evaluation, "load_causal_lm",
                        lambda spec, dtype: loaded.append(spec) or load_causal_lm(spec, dtype))
    code = cli_main(["eval", "--config", str(config), "--policy", str(train_out),
                     "--judge", str(judge_dir), "--out", str(out), "--max-queries", "2", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert loaded[0] == str(base_dir) and None not in loaded
    assert "MI bound [95% CI]" in printed and "iteration-1" in printed and "iteration-2" in printed
    records = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records] == ["iteration-1"] * 4 + ["iteration-2"] * 4
    assert {r["query"] for r in records} == {q.text for q in held_out_queries(_config(tmp_path, max_queries=2))}
    assert set(records[0]) >= {"query", "constitution", "policy_response", "base_response", "policy_tokens",
                               "base_tokens", "p_policy_as_a", "p_policy_as_b", "p_policy", "verdict"}
    summary = (out / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary] == ["model", "base", "iteration-1", "iteration-2"]
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_queries_are_the_ones_training_leaves_out(tmp_path):
    from sami_fast.data import embedded_queries_path, load_queries

    every = [q.text for q in load_queries(embedded_queries_path())]
    held_out = [q.text for q in held_out_queries(_config(tmp_path, max_queries=None))]
    assert held_out == every[EMBEDDED_TRAINING_QUERIES:]
    with pytest.warns(UserWarning, match="1 of the queries were trained on"):
        kept = held_out_queries(_config(tmp_path, max_queries=None), trained={every[EMBEDDED_TRAINING_QUERIES]})
    assert [q.text for q in kept] == every[EMBEDDED_TRAINING_QUERIES + 1 :]


# ---------------------------------------------------------------- bad input


def test_a_policy_directory_without_a_model_is_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"policy: {empty} holds no model"):
        policy_models(str(empty))
    unfinished = tmp_path / "run" / "iteration-1"
    unfinished.mkdir(parents=True)
    (unfinished / "data.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=f"{unfinished / 'policy'} holds no model"):
        policy_models(str(tmp_path / "run"))
    assert cli_main(["eval", "--policy", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert f"policy: {empty} holds no model" in capsys.readouterr().err


@pytest.mark.parametrize("document, match", [
    ({"principles": []}, '"principles" is empty'),
    ({"description": "no principles here"}, 'holds neither of "principles" and "constitutions"'),
])
def test_principles_that_give_no_constitution_are_an_error_naming_the_file(tmp_path, tokenizer, document, match):
    path = tmp_path / "principles.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match=re.escape(str(path)) + f"(:[0-9]+)?: {match}"):
        Evaluator(_config(tmp_path, principles=str(path)), base=_tiny(tokenizer, 0), policies=[])


def test_held_out_principles_beyond_the_pool_is_an_error(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="held_out_principles=5 but .*concise.json holds 3 principles"):
        Evaluator(_config(tmp_path, held_out_principles=5), base=_tiny(tokenizer, 0), policies=[])


def test_a_judge_without_a_single_token_verdict_letter_is_named(tmp_path, tokenizer):
    vocab = {"<unk>": 0, "A": 1, "Response": 2, "Answer": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    no_b = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match="no single token for the verdict letter 'B'"):
        Evaluator(_config(tmp_path), base=_tiny(tokenizer, 0), judge=(_tiny(tokenizer, 2)[0], no_b), policies=[])


@pytest.mark.parametrize("options, match", [
    ({"policy": None}, "policy must name a model"),
    ({"num_constitutions": 1}, "num_constitutions must be at least 2"),
    ({"tie_margin": 0.5}, "tie_margin must be in"),
    ({"judge_template": "no field"}, "judge_template must be"),
    ({"bootstrap_samples": 0}, "bootstrap_samples must be a positive int"),
])
def test_bad_options_are_named(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **options)


def test_queries_all_seen_in_training_are_an_error(tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("What causes rain?\n")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no held-out query left"):
        held_out_queries(_config(tmp_path, queries=str(queries)), trained={"What causes rain?"})


# ---------------------------------------------------------------- the real model


def test_smollm2_judges_its_own_sampled_responses(tmp_path):
    """SmolLM2-135M-Instruct as base, policy and judge on two held-out queries: real prompts fit, its
    tokenizer has the verdict letters, and the probabilities are proper."""
    model, tokenizer = load_smollm2(torch.float32)
    model.eval()
    config = _config(tmp_path, max_queries=2, max_new_tokens=8, do_sample=True, tie_margin=0.0)
    result = Evaluator(config, base=(model, tokenizer), judge=(model, tokenizer),
                       policies=[("policy", 1, model, tokenizer)]).run()
    assert len(result.comparisons) == 4
    for record in result.comparisons:
        for name in ("p_policy_as_a", "p_policy_as_b", "verdict_mass"):
            assert 0 < record[name] < 1, (name, record[name])
        assert record["verdict_mass"] > 0.01  # an instruct model puts real mass on a letter
        assert record["identical"] or record["p_policy"] != 0.5
    for row in result.rows:
        assert np.isfinite(row["mi_lower_bound"]) and row["mi_queries"] == 2
