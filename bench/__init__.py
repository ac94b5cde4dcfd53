"""Benchmarks: `python -m bench.dispatch` (see bench/README.md)."""
