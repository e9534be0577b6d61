"""Profiling: what a model costs to run on this machine.

counts: parameters per tower, FLOPs per image and per text, weight bytes on disk; throughput: interleaved
timed rounds, latency and throughput figures; memory: peak memory in a fresh process; inputs: what the
models are fed; stats: several models profiled side by side, as JSON and a table (`vldistill profile`).
"""
