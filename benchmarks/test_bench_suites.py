"""pytest-benchmark over the runner's suites: every runnable candidate of every quick case on
the available device (``pytest benchmarks/ --benchmark-only``; ``--benchmark-disable`` runs
each once). The runner (``python -m benchmarks``) adds the correctness gate, interleaving,
peak memory and the peers' rows; this is the same cases under pytest-benchmark's statistics."""

import pytest
import torch

from benchmarks.runner import SUITES, load_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CANDIDATES = [
    pytest.param(candidate, id=f"{suite}-{case.kernel}-{case.name}-{candidate.name}".replace(" ", "_"))
    for suite in SUITES
    for case in load_cases(suite, DEVICE, "quick")
    for candidate in case.candidates
    if not candidate.unavailable
]


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_bench(benchmark, candidate):
    benchmark(candidate.setup())
