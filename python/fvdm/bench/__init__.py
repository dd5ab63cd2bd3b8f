"""Benchmarks behind `python -m fvdm bench ...`: timing helpers and the suites."""
