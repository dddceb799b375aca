"""Benchmark harness and scripts for clipcid_fast (see benchmarks/README.md)."""
