"""Profiling: parameter counts and measured throughput."""
