"""Benchmark programs; each prints its figures (``python -m bench.micro``)."""
