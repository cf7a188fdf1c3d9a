"""Benchmarks: `python -m bench [NAME ...]` runs them (see bench/__main__.py)."""
