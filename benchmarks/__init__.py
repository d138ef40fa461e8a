"""Benchmark scripts: they print figures and write JSON, they assert nothing (targets are in each docstring)."""
