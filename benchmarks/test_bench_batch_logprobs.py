"""pytest-benchmark suite: get_batch_logprobs forward+backward per provider (CPU, size "small")."""

import pytest

from sami_fast.bench.batch_logprobs import cases

CASES = cases("cpu", "small")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.provider}-{c.x}" for c in CASES])
def test_bench_batch_logprobs(benchmark, case):
    run = case.setup()
    benchmark(run)
