"""Benchmarks behind `make bench`: each module measures one thing and writes one section of docs/BENCHMARKS.md."""
