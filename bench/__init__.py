"""Benchmark scripts (issue #5): one script per measured item; each prints a table and appends its
results to ``BENCHMARKS.md``. Run ``python bench/<name>.py --help`` (or ``python -m bench.<name>``)."""
