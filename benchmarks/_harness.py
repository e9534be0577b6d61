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


def seed_args(doc: str) -> argparse.Namespace:
    """The flags of a benchmark that runs one command's config over seeds: --tiny, --seeds, --work-dir, --set."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.yaml with a few steps: checks that it runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work-dir", default=None, help="keep the runs here (default: a temporary folder, deleted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args()


def seed_difference(
    summaries: list[dict], arm: str, reference: str, models: dict[str, dict[str, Any]], keys: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Per figure of `keys`: the mean over seeds of model `arm` minus model `reference` (in each summary's
    "models"), each seed's difference, and whether the mean's size exceeds both models' seed spreads (`models`:
    their mean_and_spread per figure)."""
    result = {}
    for key in keys:
        per_seed = [s["models"][arm][key] - s["models"][reference][key] for s in summaries]
        noise = max(models[arm][key]["spread"], models[reference][key]["spread"])
        mean = sum(per_seed) / len(per_seed)
        result[key] = {"mean": mean, "per_seed": per_seed, "beyond_spread": len(per_seed) > 1 and abs(mean) > noise}
    return result
