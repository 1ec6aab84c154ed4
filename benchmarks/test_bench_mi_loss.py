"""pytest-benchmark suite: the SAMI MI loss forward+backward per provider (CPU, size "small")."""

import pytest

from sami_fast.bench.mi_loss import cases

CASES = cases("cpu", "small")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.provider}-{c.x}" for c in CASES])
def test_bench_mi_loss(benchmark, case):
    run = case.setup()
    benchmark(run)
