"""Benchmarks (`maxdeeplab bench ...`): each a ratio against a reference timed in the same run."""
