"""Benchmarks (speed and size numbers, never asserted in tests): ``python -m benchmarks.<name>``."""
