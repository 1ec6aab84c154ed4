"""sami_fast.data: file formats, constitution sampling, errors naming file and line, the embedded dataset."""

import contextlib
import json

import pytest

from sami_fast.data import (
    EMBEDDED_PRINCIPLES, ConstitutionSampler, ConstitutionSource, DataError, Principle, embedded_principles_path,
    embedded_queries_path, load_constitution_source, load_principles, load_queries, load_training_data,
    render_constitution,
)

POOL = [Principle(f"Principle {i}.", f"Antithesis {i}.") for i in range(5)]


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def principle_file(tmp_path, principles, name="principles.json"):
    entries = [{"principle": p.principle, "antithesis": p.antithesis} for p in principles]
    return write(tmp_path, name, json.dumps({"principles": entries}, indent=1))


@contextlib.contextmanager
def raises_at(path, line, fragment):
    """Expect a DataError whose message starts with "<path>:<line>: " ("<path>: " for line None)
    and has ``fragment``."""
    with pytest.raises(DataError) as info:
        yield
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: " if line is not None else f"{path}: "), message
    assert fragment in message, message


def lines_of(constitution: str) -> list[str]:
    assert all(line.startswith("- ") for line in constitution.split("\n")), constitution
    return [line[2:] for line in constitution.split("\n")]


def flips(constitution: str) -> tuple[tuple[int, ...], frozenset[int]]:
    """(pool indices in the order written, indices written as their antithesis)."""
    by_text = ({p.principle: (i, False) for i, p in enumerate(POOL)}
               | {p.antithesis: (i, True) for i, p in enumerate(POOL)})
    located = [by_text[line] for line in lines_of(constitution)]
    return tuple(i for i, _ in located), frozenset(i for i, flipped in located if flipped)


def sampler(C=4, m=3, seed=0, pool=POOL):
    return ConstitutionSampler(ConstitutionSource(path="pool.json", principles=pool),
                               num_constitutions=C, principles_per_constitution=m, seed=seed)


# --- constitutions from principles -----------------------------------------------------------

@pytest.mark.parametrize("C, m", [(2, 1), (4, 2), (8, 3), (5, 5), (32, 5)])
def test_constitutions_distinct_with_flipped_subsets(C, m):
    source = sampler(C, m)
    assert source.max_distinct == 2 ** m
    for index in range(40):
        constitutions = source.for_query(index)
        assert len(constitutions) == C and len(set(constitutions)) == C
        orders_and_flips = [flips(c) for c in constitutions]
        drawn = {frozenset(order) for order, _ in orders_and_flips}
        assert len(drawn) == 1 and len(next(iter(drawn))) == m, "every constitution uses the same m principles once"
        assert orders_and_flips[0][1] == frozenset(), "constitution 0 is all positive"
        flipped = [flipped for _, flipped in orders_and_flips[1:]]
        assert all(flipped) and len(set(flipped)) == C - 1, "constitutions 1.. flip distinct non-empty subsets"


def test_constitutions_seeded_and_independent_of_call_order():
    forward = [sampler(seed=7).for_query(i) for i in range(30)]
    again = sampler(seed=7)
    backward = {i: again.for_query(i) for i in reversed(range(30))}
    assert forward == [backward[i] for i in range(30)]
    assert again.for_query(3) == forward[3], "a repeated call gives the same constitutions"
    assert [sampler(seed=8).for_query(i) for i in range(30)] != forward
    assert len({tuple(c) for c in forward}) > 20, "queries get different constitutions"


def test_principles_drawn_and_order_shuffled_per_constitution():
    source = sampler(C=4, m=3)
    drawn, first_orders, orders_within_query = set(), set(), set()
    for index in range(60):
        orders = [flips(c)[0] for c in source.for_query(index)]
        drawn.add(frozenset(orders[0]))
        first_orders.add(orders[0])
        orders_within_query.add(len(set(orders)))
    assert len(drawn) > 5, "the m principles are a sample of the pool"
    assert len(first_orders) > 20, "constitution 0's principle order is shuffled"
    assert max(orders_within_query) > 1, "each constitution of a query is shuffled on its own"


def test_principles_per_constitution_none_uses_whole_pool(tmp_path):
    source = load_constitution_source(principle_file(tmp_path, POOL[:3]))
    whole = ConstitutionSampler(source, num_constitutions=8)
    assert whole.principles_per_constitution == 3 and whole.max_distinct == 8
    assert sorted(set(flips(whole.for_query(0)[0])[0])) == [0, 1, 2]


def test_render_constitution_one_principle_per_line():
    assert render_constitution(["Be brief.", "Be kind."]) == "- Be brief.\n- Be kind."
    with pytest.raises(ValueError):
        render_constitution([])


def test_load_principles_strips_and_keeps_order(tmp_path):
    path = write(tmp_path, "p.json", """
        {"description": "ignored",
         "principles": [{"principle": " Be brief. ", "antithesis": "Ramble."},
                        {"principle": "Be kind.", "antithesis": "Be rude.", "note": "ignored"}]}
    """)
    assert load_principles(path) == [Principle("Be brief.", "Ramble."), Principle("Be kind.", "Be rude.")]
    source = load_constitution_source(path)
    assert source.principles == load_principles(path) and source.constitutions is None and source.pairs is None


# --- ready lists and the reference directory format -------------------------------------------

def test_ready_list_same_length_is_used_for_every_query(tmp_path):
    path = write(tmp_path, "ready.json", '{"constitutions": ["Be brief.", "Ramble.", "Be rude."]}')
    source = load_constitution_source(path)
    assert source.constitutions == ["Be brief.", "Ramble.", "Be rude."]
    exact = ConstitutionSampler(source, num_constitutions=3)
    assert exact.max_distinct == 3
    assert all(exact.for_query(i) == ["Be brief.", "Ramble.", "Be rude."] for i in range(5))


def test_ready_list_longer_is_a_seeded_sample(tmp_path):
    texts = [f"Constitution {i}." for i in range(6)]
    source = load_constitution_source(write(tmp_path, "ready.json", json.dumps({"constitutions": texts})))
    first = ConstitutionSampler(source, num_constitutions=3, seed=1)
    samples = [first.for_query(i) for i in range(20)]
    assert all(len(set(s)) == 3 and set(s) <= set(texts) for s in samples)
    assert len({tuple(s) for s in samples}) > 5
    assert samples == [ConstitutionSampler(source, num_constitutions=3, seed=1).for_query(i) for i in range(20)]


def test_reference_directory_pairs_sorted_by_file_name(tmp_path):
    folder = tmp_path / "constitutions"
    folder.mkdir()
    for name, positive in [("b.json", "Be kind."), ("a.json", "Be brief."), ("c.json", "Be calm.")]:
        (folder / name).write_text(json.dumps({"positive": positive, "negative": positive.replace("Be", "Never be")}))
    (folder / "README.txt").write_text("not a constitution")
    source = load_constitution_source(folder)
    assert source.pairs == [("Be brief.", "Never be brief."), ("Be kind.", "Never be kind."),
                            ("Be calm.", "Never be calm.")]
    pairs = ConstitutionSampler(source, num_constitutions=2, seed=3)
    assert pairs.max_distinct == 2
    chosen = [pairs.for_query(i) for i in range(30)]
    assert all(c in [list(p) for p in source.pairs] for c in chosen)
    assert len({tuple(c) for c in chosen}) == 3, "a seeded pair per query"
    with raises_at(folder, None, "num_constitutions=3"):
        ConstitutionSampler(source, num_constitutions=3)


# --- errors name the file and the line ---------------------------------------------------------

def test_missing_files(tmp_path):
    missing = tmp_path / "nothing.json"
    for load in (load_principles, load_constitution_source, load_queries, load_training_data):
        with raises_at(missing, None, "no such file"):
            load(missing)
    with raises_at(tmp_path, None, "is a directory"):
        load_principles(tmp_path)


@pytest.mark.parametrize("text, line, fragment", [
    ('{"principles": [\n  {"principle": "A.", "antithesis": "B."},\n  {"principle": "C." "antithesis": "D."}\n]}',
     3, "malformed JSON: Expecting ','"),
    ('{"principles": [\n  {"principle": "A.", "antithesis": "B."},\n  {"principle": "C."}\n]}', 3,
     'principle 2 has no "antithesis"'),
    ('{"principles": [\n  {"principle": "A.", "antithesis": "B."},\n  {"principle": "C.", "antithesis": "  "}]}', 3,
     'principle 2: "antithesis" is empty'),
    ('{"principles": [\n  {"principle": "A.", "antithesis": 3}]}', 2, '"antithesis" must be a string'),
    ('{"principles": [\n  {"principle": "A.", "antithesis": "B."},\n  {"principle": "B.", "antithesis": "C."}]}', 3,
     "principle 2 repeats the text of line 2: 'B.'"),
    ('{"principles": [\n  {"principle": "A.\\nA2.", "antithesis": "B."}]}', 2, "must be one line"),
    ('{"principles": [\n  "A."]}', 2, "principle 1 must be a JSON object"),
    ('\n{"principles": []}', 2, '"principles" is empty'),
    ('{"principle": []}', 1, 'no "principles" key'),
    ('{"principles": [], "principles": []}', 1, "appears twice"),
    ('[1, 2]', 1, "must be a JSON object"),
    ('', 1, "malformed JSON"),
])
def test_principle_file_errors(tmp_path, text, line, fragment):
    path = write(tmp_path, "bad.json", text)
    with raises_at(path, line, fragment):
        load_principles(path)


@pytest.mark.parametrize("text, line, fragment", [
    ('{"constitutions": ["A."], "principles": []}', 1, "both"),
    ('{"other": 1}', 1, "neither"),
    ('{"constitutions": [\n "A.",\n "B.",\n "A."]}', 4, "constitution 3 repeats the text of line 2"),
    ('{"constitutions": [\n "A.",\n ""]}', 3, "constitution 2 is empty"),
    ('{"constitutions": []}', 1, '"constitutions" is empty'),
])
def test_constitution_file_errors(tmp_path, text, line, fragment):
    path = write(tmp_path, "bad.json", text)
    with raises_at(path, line, fragment):
        load_constitution_source(path)


def test_reference_directory_errors(tmp_path):
    with raises_at(tmp_path, None, "no *.json files"):
        load_constitution_source(tmp_path)
    (tmp_path / "a.json").write_text('{"positive": "A.", "negative": "B."}')
    bad = tmp_path / "b.json"
    bad.write_text('\n{"positive": "A."}')
    with raises_at(bad, 2, 'the file has no "negative"'):
        load_constitution_source(tmp_path)
    bad.write_text('{"positive": "A.", "negative": "A."}')
    with raises_at(bad, 1, "same text"):
        load_constitution_source(tmp_path)


def test_sampler_errors_name_file_and_numbers(tmp_path):
    path = principle_file(tmp_path, POOL[:3])
    source = load_constitution_source(path)
    with raises_at(path, None, "num_constitutions=1: SAMI needs at least 2"):
        ConstitutionSampler(source, num_constitutions=1)
    with raises_at(path, None, "num_constitutions=5 is more distinct constitutions than this source can make: "
                               "2 principles per constitution make at most 4"):
        ConstitutionSampler(source, num_constitutions=5, principles_per_constitution=2)
    for m in (0, 4):
        with raises_at(path, None, f"principles_per_constitution={m} must lie in 1..3"):
            ConstitutionSampler(source, num_constitutions=2, principles_per_constitution=m)
    with pytest.raises(TypeError, match="num_constitutions must be an int"):
        ConstitutionSampler(source, num_constitutions=2.0)
    ready_path = write(tmp_path, "ready.json", '{"constitutions": ["A.", "B."]}')
    ready = load_constitution_source(ready_path)
    with raises_at(ready_path, None, "the list holds 2 constitutions"):
        ConstitutionSampler(ready, num_constitutions=3)
    with raises_at(ready_path, None, "applies only to a principle file"):
        ConstitutionSampler(ready, num_constitutions=2, principles_per_constitution=1)
    with pytest.raises(ValueError, match="exactly one of"):
        ConstitutionSource(path="x", principles=POOL, constitutions=["A."])


# --- queries ---------------------------------------------------------------------------------

def test_queries_jsonl_keeps_other_fields(tmp_path):
    path = write(tmp_path, "q.jsonl", '{"query": "How?", "id": 7, "tags": ["a"]}\n\n  \r\n{"query": "Why?"}\r\n')
    queries = load_queries(path)
    assert [(q.text, q.fields, q.where) for q in queries] == [
        ("How?", {"id": 7, "tags": ["a"]}, f"{path}:1"), ("Why?", {}, f"{path}:4")]


def test_queries_plain_text(tmp_path):
    path = write(tmp_path, "q.txt", "  How do I keep basil fresh?\n\nWhy is the sky blue?  \n")
    assert [(q.text, q.fields, q.where) for q in load_queries(path)] == [
        ("How do I keep basil fresh?", {}, f"{path}:1"), ("Why is the sky blue?", {}, f"{path}:3")]


@pytest.mark.parametrize("text, line, fragment", [
    ('{"query": "A"}\n{"query": "B"\n', 2, "malformed JSON: Expecting ',' delimiter"),
    ('{"query": "A"}\n["B"]\n', 2, "must be a JSON object, got an array"),
    ('\n{"question": "B"}\n', 2, 'no "query" field (fields: question)'),
    ('{"query": "A"}\n{"query": "   "}\n', 2, '"query" is empty'),
    ('{"query": 5}\n', 1, '"query" must be a string, got a number'),
    ('{"query": "A", "query": "B"}\n', 1, "appears twice"),
    ('\n\n', None, "holds no queries"),
])
def test_query_errors(tmp_path, text, line, fragment):
    path = write(tmp_path, "bad.jsonl", text)
    with raises_at(path, line, fragment):
        load_queries(path)


def test_query_json_suffix_and_bad_encoding(tmp_path):
    path = write(tmp_path, "q.json", '[{"query": "A"}]')
    with raises_at(path, None, "not a query file"):
        load_queries(path)
    binary = tmp_path / "q.txt"
    binary.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    with raises_at(binary, 3, "not UTF-8"):
        load_queries(binary)


# --- pre-generated training data --------------------------------------------------------------

def test_training_data_examples_and_skipped(tmp_path):
    def item(prompt, response, k):
        return {"prompt": prompt, "response": response, "example_id": k}
    data = {
        "0": [item("c0 q0", "r0", 0), item("c1 q0", "r1", 1)],
        "1": [item("c0 q1", "r0", 0), item("c1 q1", "r1", 1), item("c2 q1", "r2", 2)],
        "no-prompt": [{"response": "r0"}, item("c1", "r1", 1)],
        "null-response": [item("c0", None, 0), item("c1", "r1", 1)],
        "empty-response": [item("c0", "r0", 0), item("c1", " ", 1)],
        "single": [item("c0", "r0", 0)],
        "same-responses": [item("c0", "r", 0), item("c1", "r", 1)],
    }
    path = write(tmp_path, "train.json", json.dumps(data, indent=1))
    examples, skipped = load_training_data(path)
    assert [(e.example_id, e.prompts, e.responses) for e in examples] == [
        ("0", ["c0 q0", "c1 q0"], ["r0", "r1"]), ("1", ["c0 q1", "c1 q1", "c2 q1"], ["r0", "r1", "r2"])]
    assert examples[0].where == f"{path}:2" and examples[1].where.startswith(f"{path}:")
    assert dict(skipped) == {
        "no-prompt": 'item 0 has no "prompt"', "null-response": 'item 0 has no "response"',
        "empty-response": 'item 1 has an empty "response"',
        "single": "1 item(s); SAMI needs at least 2 (prompt, response) pairs",
        "same-responses": "two items have the same response",
    }
    assert all(type(text) is str for e in examples for text in e.prompts + e.responses)


@pytest.mark.parametrize("text, line, fragment", [
    ('{"a": [\n {"prompt": "p", "response": "r"},\n "oops"]}', 3, "example 'a' item 1 must be a JSON object"),
    ('{"a": [\n {"prompt": "p", "response": 4}]}', 2, '"response" must be a string'),
    ('{"a": {"prompt": "p"}}', 1, "must be a JSON array of items"),
    ('{}', 1, "holds no examples"),
    ('{"a": [{"prompt": "p", "response": "r"}]}', None, "all 1 examples are unusable"),
    ('{"a": [\n{"prompt": "p", "response": "r"},\n{"prompt": "q" "response": "s"}]}', 3, "malformed JSON"),
])
def test_training_data_errors(tmp_path, text, line, fragment):
    path = write(tmp_path, "train.json", text)
    with raises_at(path, line, fragment):
        load_training_data(path)


# --- the embedded dataset ----------------------------------------------------------------------

def test_embedded_dataset_loads_and_makes_four_constitutions():
    queries = load_queries(embedded_queries_path())
    assert 30 <= len(queries) <= 60 and len({q.text for q in queries}) == len(queries)
    assert sorted(path.stem for path in embedded_principles_path().parent.glob("*.json")) == sorted(EMBEDDED_PRINCIPLES)
    assert embedded_principles_path() == embedded_principles_path(EMBEDDED_PRINCIPLES[0])
    for name in EMBEDDED_PRINCIPLES:
        source = load_constitution_source(embedded_principles_path(name))
        assert 2 <= len(source.principles) <= 4
        four = ConstitutionSampler(source, num_constitutions=4, principles_per_constitution=2)
        assert all(len(set(four.for_query(i))) == 4 for i in range(len(queries)))
    default = load_constitution_source(embedded_principles_path())
    assert ConstitutionSampler(default, num_constitutions=4).max_distinct >= 4
    with pytest.raises(ValueError, match="choose one of " + ", ".join(EMBEDDED_PRINCIPLES)):
        embedded_principles_path("kind")
