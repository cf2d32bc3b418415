"""Benchmarks: run as scripts, e.g. `python bench/render.py`."""
