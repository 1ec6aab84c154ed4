"""sami_fast's benchmark suite: ``python -m benchmarks`` (or ``sami-fast bench`` in a source checkout).

``benchmarks.runner`` times candidates side by side behind a float64 correctness gate;
``benchmarks.suites`` holds the suites (``loss``, ``logprobs``, ``step``) that it and the
pytest-benchmark files (``pytest benchmarks/ --benchmark-only``) share.
"""
