"""Benchmarks: each module prints a table and writes a JSON; run from the repository root as
``python -m bench.<name>`` (``bench/RESULTS.md`` has the exact commands and the numbers)."""
