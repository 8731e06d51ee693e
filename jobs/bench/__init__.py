"""Benchmarks: scripts that print figures (``python -m jobs.bench.bench_NAME --help``); not installed with the package."""
