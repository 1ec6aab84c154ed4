"""SAMI training data: principles, constitutions, queries and pre-generated examples.

File formats (UTF-8; a byte-order mark is accepted):

- **Principle file** (JSON): ``{"principles": [{"principle": "...", "antithesis": "..."}, ...]}``.
  Each principle and its antithesis is one line of text; all of them are distinct.
- **Ready list of constitutions** (JSON): ``{"constitutions": ["...", ...]}``, distinct texts.
- **Reference format** (a directory): one JSON file per constitution pair,
  ``{"positive": "...", "negative": "..."}``, taken in file-name order (C = 2).
- **Queries**: ``.jsonl`` with one ``{"query": "...", ...}`` object per line (the other fields
  are kept in ``Query.fields``; blank lines are skipped), or plain text with one query per
  non-blank line (surrounding whitespace stripped).
- **Pre-generated training data** (JSON, the reference code's training format):
  ``{example_id: [{"prompt": "...", "response": "...", ...}, ...]}``; item k is the full
  prompt under constitution k and the response generated under it.

In JSON files keys other than the ones named are ignored; a key repeated within one object is
an error. Every error is a ``DataError`` whose message starts with ``"<path>:<line>: "``
(``"<path>: "`` when the file as a whole is wrong).

A constitution built from principles is rendered by ``render_constitution``: one principle per
line, each line ``"- <principle>"``, joined by newlines, no trailing newline.
"""

from __future__ import annotations

import bisect
import json
import json.decoder
import json.scanner
import os
import pathlib
import random
import re
from dataclasses import dataclass

_DATASETS = pathlib.Path(__file__).resolve().parent / "datasets"

EMBEDDED_PRINCIPLES: tuple[str, ...] = ("concise", "formal", "helpful")
"""Names of the principle files shipped with the package; the first is the default."""


class DataError(ValueError):
    """Bad data: the message starts with ``"<path>:<line>: "`` (``"<path>: "`` for a whole-file problem)."""

    @classmethod
    def at(cls, path: str | os.PathLike, message: str, line: int | None = None) -> DataError:
        """The error ``"<path>:<line>: <message>"`` (``"<path>: <message>"`` when ``line`` is None).

        Args:
            path: the file (or directory) at fault.
            message: what is wrong.
            line: the 1-based line, or None for the file as a whole.

        Returns:
            the ``DataError`` (to raise).
        """
        where = f"{path}:{line}" if line is not None else f"{path}"
        return cls(f"{where}: {message}")


@dataclass(frozen=True)
class Principle:
    """One principle of a principle file.

    Attributes:
        principle: the principle, one line of text.
        antithesis: its opposite, one line of text.
    """

    principle: str
    antithesis: str


@dataclass(frozen=True)
class ConstitutionSource:
    """What a constitution file or directory holds: exactly one of the three lists is set.

    Attributes:
        path: the file or directory it was read from (as given), named in errors.
        principles: principles with antitheses, to sample constitutions from.
        constitutions: a ready list of distinct constitution texts.
        pairs: (positive, negative) per reference-format file, sorted by file name.

    Raises:
        ValueError: not exactly one of ``principles``, ``constitutions``, ``pairs`` is set.
    """

    path: str
    principles: list[Principle] | None = None
    constitutions: list[str] | None = None
    pairs: list[tuple[str, str]] | None = None

    def __post_init__(self):
        held = [name for name in ("principles", "constitutions", "pairs") if getattr(self, name) is not None]
        if len(held) != 1:
            raise ValueError(f"ConstitutionSource needs exactly one of principles, constitutions, pairs; got {held}")


@dataclass(frozen=True)
class Query:
    """One query of a query file.

    Attributes:
        text: the query text.
        fields: a JSONL line's other fields (empty for plain text).
        where: ``"<path>:<line>"``, named in errors.
    """

    text: str
    fields: dict
    where: str


@dataclass(frozen=True)
class PregeneratedExample:
    """One example of pre-generated training data (``load_training_data``).

    Attributes:
        example_id: its key in the file.
        prompts: C full prompts, already rendered (prompt k under constitution k).
        responses: C responses (response k generated under prompt k).
        where: ``"<path>:<line>"`` of its item list, named in errors.
    """

    example_id: str
    prompts: list[str]
    responses: list[str]
    where: str


# --- reading files ---------------------------------------------------------------------------

def _read_text(path) -> str:
    """The file's text; missing files, directories and undecodable bytes are a ``DataError``."""
    file = pathlib.Path(path)
    if not file.exists():
        raise DataError.at(path, "no such file or directory")
    if file.is_dir():
        raise DataError.at(path, "is a directory, expected a file")
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError.at(path, f"not UTF-8 text ({error.reason} at byte {error.start})", line) from None


def _reject_duplicate_keys(pairs, path, line) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise DataError.at(path, f"key {key!r} appears twice in one JSON object", line)
        result[key] = value
    return result


class _LocatedDict(dict):
    line: int


class _LocatedList(list):
    line: int


class _LocatedStr(str):
    line: int


def _line(value, fallback: int | None = None) -> int | None:
    """The line a JSON value started on (numbers, booleans and null carry none)."""
    return getattr(value, "line", fallback)


def _load_json(path):
    """Parse a JSON file; objects, arrays and strings in the result carry ``.line`` (1-based).

    The pure-Python scanner is used because it lets each container record where it starts;
    strings are still scanned by the C scanner, so large string-heavy files stay fast.
    """
    text = _read_text(path)
    newlines = [match.start() for match in re.finditer("\n", text)]

    def line_at(index: int) -> int:
        return bisect.bisect_left(newlines, index) + 1  # 1 + the newlines before ``index``

    def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo):
        line = line_at(s_and_end[1] - 1)
        pairs, end = json.decoder.JSONObject(s_and_end, strict, scan_once, None, list, memo)
        located = _LocatedDict(_reject_duplicate_keys(pairs, path, line))
        located.line = line
        return located, end

    def parse_array(s_and_end, scan_once):
        values, end = json.decoder.JSONArray(s_and_end, scan_once)
        located = _LocatedList(values)
        located.line = line_at(s_and_end[1] - 1)
        return located, end

    def parse_string(string, end, strict):
        value, new_end = json.decoder.scanstring(string, end, strict)
        located = _LocatedStr(value)
        located.line = line_at(end - 1)
        return located, new_end

    decoder = json.JSONDecoder()
    decoder.parse_object, decoder.parse_array, decoder.parse_string = parse_object, parse_array, parse_string
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        return decoder.decode(text)
    except json.JSONDecodeError as error:
        raise DataError.at(path, f"malformed JSON: {error.msg} (column {error.colno})", error.lineno) from None


def _text(value, what: str, path, fallback_line, *, one_line: bool = False) -> str:
    """``value`` as a plain, non-blank string, else a ``DataError`` at its line."""
    line = _line(value, fallback_line)
    if not isinstance(value, str):
        raise DataError.at(path, f"{what} must be a string, got {_json_type(value)}", line)
    if not value.strip():
        raise DataError.at(path, f"{what} is empty", line)
    if one_line and "\n" in value.strip():
        raise DataError.at(path, f"{what} must be one line (render_constitution puts one principle per line)", line)
    return str(value)


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)


def _require_object(value, what: str, path, fallback_line=None) -> dict:
    if not isinstance(value, dict):
        raise DataError.at(path, f"{what} must be a JSON object, got {_json_type(value)}", _line(value, fallback_line))
    return value


def _require_list(value, what: str, path, fallback_line=None) -> list:
    if not isinstance(value, list):
        raise DataError.at(path, f"{what} must be a JSON array, got {_json_type(value)}", _line(value, fallback_line))
    if not value:
        raise DataError.at(path, f"{what} is empty", _line(value, fallback_line))
    return value


def _required_texts(entry: dict, keys, what: str, path, *, one_line: bool = False) -> list[str]:
    """The non-blank string under each of ``keys`` of a JSON object, else a ``DataError`` at its line."""
    texts = []
    for key in keys:
        if key not in entry:
            raise DataError.at(path, f'{what} has no "{key}"', entry.line)
        texts.append(_text(entry[key], f'{what}: "{key}"', path, entry.line, one_line=one_line))
    return texts


def _reject_repeat(first_seen: dict, text: str, line: int, path, what: str) -> None:
    """Record the line of ``text``; a text seen before is a ``DataError`` naming both lines."""
    if text in first_seen:
        raise DataError.at(path, f"{what} repeats the text of line {first_seen[text]}: {text[:60]!r}", line)
    first_seen[text] = line


# --- principles and constitutions ------------------------------------------------------------

def _parse_principles(entries, path) -> list[Principle]:
    entries = _require_list(entries, '"principles"', path)
    principles, first_seen = [], {}
    for number, entry in enumerate(entries, start=1):
        entry = _require_object(entry, f"principle {number}", path, entries.line)
        texts = [text.strip() for text in
                 _required_texts(entry, ("principle", "antithesis"), f"principle {number}", path, one_line=True)]
        for text in texts:
            # Distinct texts make distinct flip patterns render to distinct constitutions.
            _reject_repeat(first_seen, text, entry.line, path, f"principle {number}")
        principles.append(Principle(*texts))
    return principles


def load_principles(path: str | os.PathLike) -> list[Principle]:
    """Read a principle file ``{"principles": [{"principle": ..., "antithesis": ...}, ...]}``.

    Args:
        path: the JSON file.

    Returns:
        the principles in file order, whitespace around each text stripped.

    Raises:
        DataError: an unreadable or malformed file, no ``"principles"`` key or an empty list,
            an entry without a non-blank one-line ``"principle"`` or ``"antithesis"``, or a
            text that repeats another.
    """
    document = _require_object(_load_json(path), "the file", path)
    if "principles" not in document:
        raise DataError.at(path, 'no "principles" key', document.line)
    return _parse_principles(document["principles"], path)


def _load_reference_dir(path) -> list[tuple[str, str]]:
    files = sorted(pathlib.Path(path).glob("*.json"), key=lambda file: file.name)
    if not files:
        raise DataError.at(path, 'no *.json files (expected one {"positive": ..., "negative": ...} per file)')
    pairs = []
    for file in files:
        document = _require_object(_load_json(file), "the file", file)
        texts = _required_texts(document, ("positive", "negative"), "the file", file)
        if texts[0].strip() == texts[1].strip():
            raise DataError.at(file, '"positive" and "negative" are the same text', document.line)
        pairs.append((texts[0], texts[1]))
    return pairs


def _parse_constitution_list(entries, path) -> list[str]:
    entries = _require_list(entries, '"constitutions"', path)
    constitutions, first_seen = [], {}
    for number, entry in enumerate(entries, start=1):
        text = _text(entry, f"constitution {number}", path, entries.line)
        _reject_repeat(first_seen, text.strip(), _line(entry, entries.line), path, f"constitution {number}")
        constitutions.append(text)
    return constitutions


def load_constitution_source(path: str | os.PathLike) -> ConstitutionSource:
    """Read constitutions from a principle file, a ready list, or a reference-format directory.

    Arguments:
        path: a directory of ``{"positive", "negative"}`` JSON files (C = 2), or a JSON file
            holding either ``"principles"`` (see ``load_principles``) or ``"constitutions"``.

    Returns:
        a ``ConstitutionSource`` with ``pairs`` (directory, in file-name order),
        ``principles`` or ``constitutions`` set.

    Raises:
        DataError: a directory without ``*.json`` files or with a file whose ``"positive"``
            and ``"negative"`` are missing, blank or the same text; a file holding both or
            neither of ``"principles"`` and ``"constitutions"``; a bad principle list (as
            ``load_principles``); an empty constitution list, a blank or non-string entry, or
            a repeated text; an unreadable or malformed file.
    """
    if pathlib.Path(path).is_dir():
        return ConstitutionSource(path=str(path), pairs=_load_reference_dir(path))
    document = _require_object(_load_json(path), "the file", path)
    held = [key for key in ("principles", "constitutions") if key in document]
    if len(held) != 1:
        found = "both" if held else "neither"
        raise DataError.at(path, f'holds {found} of "principles" and "constitutions"; expected exactly one',
                           document.line)
    if held == ["principles"]:
        return ConstitutionSource(path=str(path), principles=_parse_principles(document["principles"], path))
    return ConstitutionSource(path=str(path), constitutions=_parse_constitution_list(document["constitutions"], path))


def render_constitution(principles: list[str]) -> str:
    """The constitution text: ``"- <principle>"`` per principle, one per line, no trailing newline.

    Args:
        principles: the principle (or antithesis) texts, in order.

    Returns:
        the lines joined by newlines.

    Raises:
        ValueError: ``principles`` is empty.
    """
    if not principles:
        raise ValueError("principles must be a non-empty list of strings")
    return "\n".join(f"- {principle}" for principle in principles)


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _distinct_flip_masks(rng: random.Random, width: int, count: int) -> list[int]:
    """``count`` distinct non-zero ``width``-bit masks (bit i set: principle i flips), in random order.

    Rejection sampling: ``count < 2**width`` is checked by the caller, and C is small enough
    (one generation per constitution) that the expected number of draws stays small.
    """
    masks, seen = [], set()
    while len(masks) < count:
        mask = rng.getrandbits(width)
        if mask and mask not in seen:
            seen.add(mask)
            masks.append(mask)
    return masks


class ConstitutionSampler:
    """The C constitutions of each query, a function of (seed, query index) alone.

    Arguments:
        source: what ``load_constitution_source`` read.
        num_constitutions: C, at least 2 and at most ``max_distinct``.
        principles_per_constitution: principles drawn from the pool per query (principle
            files only; None = the whole pool).
        seed: with the query index, fixes every constitution of that query.

    Attributes:
        max_distinct: the most distinct constitutions one query can get: 2**m for m
            principles per constitution, the list's length for a ready list, 2 for pairs.

    Raises:
        TypeError: ``seed`` or ``num_constitutions`` is not an int, or (for principles) a given
            ``principles_per_constitution`` is not.
        DataError: ``num_constitutions`` below 2 or above ``max_distinct``;
            ``principles_per_constitution`` outside 1..(principles in the file), or given
            for a source without principles.
    """

    def __init__(self, source: ConstitutionSource, *, num_constitutions: int,
                 principles_per_constitution: int | None = None, seed: int = 0):
        path = source.path
        self.source = source
        self.seed = _check_int("seed", seed)
        self.num_constitutions = _check_int("num_constitutions", num_constitutions)
        if num_constitutions < 2:
            raise DataError.at(path, f"num_constitutions={num_constitutions}: SAMI needs at least 2 constitutions")
        if source.principles is not None:
            pool = len(source.principles)
            if principles_per_constitution is None:
                principles_per_constitution = pool
            _check_int("principles_per_constitution", principles_per_constitution)
            if not 1 <= principles_per_constitution <= pool:
                raise DataError.at(path, f"principles_per_constitution={principles_per_constitution} must lie in "
                                         f"1..{pool} (the number of principles in the file)")
            self.max_distinct = 2 ** principles_per_constitution
            limit = (f"{principles_per_constitution} principles per constitution make at most {self.max_distinct} "
                     f"(2**{principles_per_constitution}; the file has {pool} principles)")
        else:
            if principles_per_constitution is not None:
                raise DataError.at(path, f"principles_per_constitution={principles_per_constitution} applies only "
                                         "to a principle file; this source holds ready constitutions")
            if source.constitutions is not None:
                self.max_distinct = len(source.constitutions)
                limit = f"the list holds {self.max_distinct} constitutions"
            else:
                self.max_distinct = 2
                limit = "the reference format gives 2 per query (positive, negative)"
        if num_constitutions > self.max_distinct:
            raise DataError.at(path, f"num_constitutions={num_constitutions} is more distinct constitutions than "
                                     f"this source can make: {limit}")
        self.principles_per_constitution = principles_per_constitution

    def for_query(self, index: int) -> list[str]:
        """The C constitution texts of query ``index`` (constitution 0 first).

        A ready list of exactly C constitutions gives all of them, in order; a longer one C
        of them at random; pairs one pair at random. From principles:
        ``principles_per_constitution`` principles drawn at random; constitution 0 states
        them all, each other one flips a distinct non-empty subset to their antitheses; the
        lines of each are shuffled (``render_constitution``).

        Args:
            index: the query's index (from 0).

        Returns:
            C distinct constitution texts, the same for the same seed and index in any process.

        Raises:
            ValueError: ``index`` is not a non-negative int.
        """
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        # A string seed is hashed with SHA-512: the same in every process, whatever PYTHONHASHSEED is.
        rng = random.Random(f"{self.seed}:{index}")
        C, source = self.num_constitutions, self.source
        if source.pairs is not None:
            return list(rng.choice(source.pairs))
        if source.constitutions is not None:
            if C == len(source.constitutions):
                return list(source.constitutions)
            return rng.sample(source.constitutions, C)
        drawn = rng.sample(source.principles, self.principles_per_constitution)
        constitutions = []
        for mask in [0] + _distinct_flip_masks(rng, len(drawn), C - 1):
            lines = [p.antithesis if mask >> i & 1 else p.principle for i, p in enumerate(drawn)]
            rng.shuffle(lines)
            constitutions.append(render_constitution(lines))
        return constitutions


# --- queries ---------------------------------------------------------------------------------

def _lines(text: str):
    """(line number, line) over ``text`` split at "\\n" only: U+2028 and friends may sit inside JSON strings."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.rstrip("\r")


def load_queries(path: str | os.PathLike) -> list[Query]:
    """Read queries: ``.jsonl`` (one ``{"query": ...}`` per line) or plain text (one per line).

    Args:
        path: a ``.jsonl`` file, or any other file but ``.json`` (read as plain text); blank
            lines are skipped.

    Returns:
        the queries in file order; ``Query.fields`` holds a JSONL line's other fields
        (empty for plain text) and ``Query.where`` is ``"<path>:<line>"``.

    Raises:
        DataError: an unreadable file; a ``.json`` file; a JSONL line that is malformed, not
            an object, repeats a key, or has no non-blank string ``"query"``; no query at all.
    """
    text = _read_text(path)
    suffix = pathlib.Path(path).suffix.lower()
    if suffix == ".json":
        # Read as plain text, a JSON document would become one query per line of JSON syntax.
        raise DataError.at(path, "a .json file is not a query file: use .jsonl (one {\"query\": ...} object per "
                                 "line) or plain text (one query per line)")
    queries = []
    for number, line in _lines(text):
        if not line.strip():
            continue
        if suffix != ".jsonl":
            queries.append(Query(line.strip(), {}, f"{path}:{number}"))
            continue
        try:
            # json.loads calls the hook before the next iteration: binding ``number`` late is fine.
            record = json.loads(line, object_pairs_hook=lambda pairs: _reject_duplicate_keys(pairs, path, number))  # noqa: B023
        except json.JSONDecodeError as error:
            raise DataError.at(path, f"malformed JSON: {error.msg} (column {error.colno})", number) from None
        if not isinstance(record, dict):
            raise DataError.at(path, f"each line must be a JSON object, got {_json_type(record)}", number)
        if "query" not in record:
            raise DataError.at(path, f'no "query" field (fields: {", ".join(record) or "none"})', number)
        query = _text(record.pop("query"), '"query"', path, number)
        queries.append(Query(query, record, f"{path}:{number}"))
    if not queries:
        raise DataError.at(path, "holds no queries")
    return queries


# --- pre-generated training data -------------------------------------------------------------

def _example_problem(items) -> str | None:
    """Why an example cannot train (None when it can)."""
    if len(items) < 2:
        return f"{len(items)} item(s); SAMI needs at least 2 (prompt, response) pairs"
    for key in ("prompt", "response"):
        for k, item in enumerate(items):
            if item.get(key) is None:
                return f'item {k} has no "{key}"'
            if not item[key].strip():
                return f'item {k} has an empty "{key}"'
        texts = [item[key] for item in items]
        if len(set(texts)) < len(texts):
            return f"two items have the same {key}"
    return None


def load_training_data(
    path: str | os.PathLike,
) -> tuple[list[PregeneratedExample], list[tuple[str, str]]]:
    """Read pre-generated SAMI data in the reference code's training format.

    ``{example_id: [{"prompt": ..., "response": ..., "example_id": ...}, ...]}``: item k is
    the full prompt under constitution k (already rendered) and the response generated under it.

    Args:
        path: the JSON file.

    Returns:
        (examples, skipped): the usable examples in file order, and ``(example_id, reason)``
        for each example left out: a missing, null or empty prompt or response, fewer than 2
        items, or two items with the same prompt or the same response (nothing to contrast).
        Examples may differ in their number of items (C >= 2 each).

    Raises:
        DataError: an unreadable or malformed file, no examples, an example that is not an
            array of objects, a ``"prompt"`` or ``"response"`` that is neither a string nor
            null, or no usable example at all.
    """
    document = _require_object(_load_json(path), "the file", path)
    if not document:
        raise DataError.at(path, "holds no examples", document.line)
    examples, skipped = [], []
    for example_id, items in document.items():
        if not isinstance(items, list):
            raise DataError.at(path, f"example {example_id!r} must be a JSON array of items, got {_json_type(items)}",
                               _line(items, document.line))
        for k, item in enumerate(items):
            _require_object(item, f"example {example_id!r} item {k}", path, items.line)
            for key in ("prompt", "response"):
                if item.get(key) is not None and not isinstance(item[key], str):
                    raise DataError.at(path, f'example {example_id!r} item {k}: "{key}" must be a string, '
                                             f"got {_json_type(item[key])}", item.line)
        problem = _example_problem(items)
        if problem is not None:
            skipped.append((example_id, problem))
            continue
        examples.append(PregeneratedExample(
            example_id=example_id,
            prompts=[str(item["prompt"]) for item in items],
            responses=[str(item["response"]) for item in items],
            where=f"{path}:{items.line}",
        ))
    if not examples:
        first_id, first_reason = skipped[0]
        raise DataError.at(path, f"all {len(skipped)} examples are unusable (e.g. {first_id!r}: {first_reason})")
    return examples, skipped


# --- the embedded example dataset -------------------------------------------------------------

def embedded_queries_path() -> pathlib.Path:
    """The shipped example queries (``.jsonl``, fields ``query`` and ``id``)."""
    return _DATASETS / "queries.jsonl"


def embedded_principles_path(name: str | None = None) -> pathlib.Path:
    """The shipped principle file ``name`` (one of ``EMBEDDED_PRINCIPLES``; None = the first, the default).

    Raises:
        ValueError: ``name`` is not one of ``EMBEDDED_PRINCIPLES``.
    """
    if name is None:
        name = EMBEDDED_PRINCIPLES[0]
    if name not in EMBEDDED_PRINCIPLES:
        raise ValueError(f"unknown embedded principle file {name!r}; choose one of {', '.join(EMBEDDED_PRINCIPLES)}")
    return _DATASETS / "principles" / f"{name}.json"
