"""Benchmarks and the synthetic adapters they (and the demo and tests) share."""
