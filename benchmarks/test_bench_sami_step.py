"""pytest-benchmark suite for the SAMI step (matrix + loss + backward), "small" CPU cases."""

import pytest

from sami_fast.bench.sami_step import cases

CASES = cases("cpu", "small")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.provider}-{c.x}" for c in CASES])
def test_sami_step(benchmark, case):
    run = case.setup()
    benchmark.extra_info.update(case.notes)
    benchmark(run)
