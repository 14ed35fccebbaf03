"""Benchmark suites (run with ``pytest benchmarks/``); a package so its module names never clash with tests/."""
