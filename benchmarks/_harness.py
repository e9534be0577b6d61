"""What the benchmark scripts share (not a benchmark itself: tests/test_benchmarks.py skips `_` files)."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable


def print_figures(args: argparse.Namespace, run: Callable[[argparse.Namespace, Path], dict[str, Any]]) -> None:
    """Call `run(args, work)` in `args.work_dir` (a temp folder when unset) with anything it prints sent to
    stderr, then print its figures as the one JSON line on stdout."""
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        with contextlib.redirect_stdout(sys.stderr):
            figures = run(args, work)
    print(json.dumps(figures))


def mean_and_spread(values: list[float]) -> dict[str, float]:
    """Mean, min, max and spread (max - min) of one figure over seeds."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "spread": max(values) - min(values)}
