"""Benchmark suites: each module's ``cases(device, size)`` returns ``benchmarks.runner.Case`` objects."""
