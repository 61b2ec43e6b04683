"""Benchmarks that print tables: `python -m bench.<name>` from the repository root."""
