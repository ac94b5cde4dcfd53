"""Tiny models built from configs, offline, for tests, the demo and benchmarks."""
