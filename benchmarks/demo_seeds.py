"""The demo's four arms over several seeds: mean and spread (max - min) of every figure per arm, whether
distillation beats the same student without a teacher by more than the seed-to-seed spread, and the wall
time of each demo run. Each seed is a whole `vldistill demo` (teacher pretraining included), run one after
another in this process; prints one JSON line with the keys

    {"benchmark", "config", "family", "overrides", "seeds", "arms", "student_minus_baseline", "student_minus_scratch",
     "image_speedup", "caption_speedup", "wall_seconds", "train_seconds", "teacher_train_pairs", "student_train_pairs",
     "retrieval_match"}

    python benchmarks/demo_seeds.py                       # configs/demo.yaml, seeds 0 1 2
    python benchmarks/demo_seeds.py --tiny                # configs/tiny.yaml, seeds 0 1: a check that it runs
    python benchmarks/demo_seeds.py --family blip         # configs/demo_blip.yaml (`vldistill demo --family blip`)

With --family blip the figures also hold ITM re-ranked R@1, BLEU-4, CIDEr-D and captions per second, and the
result the captioning speed-up ("caption_speedup", null for CLIP).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _harness import mean_and_spread

from vldistill.config import load_config, packaged_config
from vldistill.demo import ARMS, run_demo
from vldistill.demo_blip import BLIP_KEYS, run_blip_demo
from vldistill.eval.suite import SUMMARY_KEYS

CONFIGS = {"clip": ("demo", "tiny"), "blip": ("demo_blip", "tiny_blip")}
RUNS = {"clip": run_demo, "blip": run_blip_demo}
KEYS = {"clip": SUMMARY_KEYS, "blip": BLIP_KEYS}
SPEEDS = {"clip": ("images_per_second",), "blip": ("images_per_second", "captions_per_second")}


def summarize(summaries: list[dict], keys=SUMMARY_KEYS, speeds=("images_per_second",)) -> dict:
    """Per arm and figure (`keys` and `speeds`): mean and spread over the seeds' demo summaries; per key: the
    student's mean gain over the baseline and over scratch, and whether the gain exceeds both arms' spreads."""
    arms = {
        arm: {fig: mean_and_spread([s["models"][arm][fig] for s in summaries]) for fig in (*keys, *speeds)}
        for arm in ARMS
    }
    verdicts = {}
    for other in ("baseline", "scratch"):
        verdicts[f"student_minus_{other}"] = {}
        for key in keys:
            gains = [s["models"]["student"][key] - s["models"][other][key] for s in summaries]
            gain = statistics.fmean(gains)
            noise = max(arms["student"][key]["spread"], arms[other][key]["spread"])
            verdicts[f"student_minus_{other}"][key] = {
                "mean": gain, "per_seed": gains, "beyond_spread": len(summaries) > 1 and gain > noise,
            }
    return {"arms": arms, **verdicts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny config: checks that the benchmark runs")
    parser.add_argument("--family", choices=sorted(CONFIGS), default="clip", help="the demo's model family")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0 1 with --tiny)")
    parser.add_argument("--work-dir", default=None, help="keep the demo runs here (default: a temporary folder, deleted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.seeds = args.seeds or ([0, 1] if args.tiny else [0, 1, 2])
    config = packaged_config(CONFIGS[args.family][1 if args.tiny else 0])
    with tempfile.TemporaryDirectory(prefix="demo-seeds-") as scratch:
        work = Path(args.work_dir or scratch)
        summaries = [
            RUNS[args.family](  # peak memory is not a figure here: no fresh-process probes
                load_config(config, [*args.overrides, f"seed={seed}"]), work / f"seed{seed}", progress=False,
                measure_memory=False,
            )
            for seed in args.seeds
        ]
    speedups = [s["image_speedup"]["median"] for s in summaries]
    result = {
        "benchmark": "demo_seeds",
        "config": config.stem,
        "family": args.family,
        "overrides": args.overrides,
        "seeds": args.seeds,
        **summarize(summaries, KEYS[args.family], SPEEDS[args.family]),
        "image_speedup": mean_and_spread(speedups),
        "caption_speedup": (
            mean_and_spread([s["caption_speedup"]["median"] for s in summaries]) if args.family == "blip" else None
        ),
        "wall_seconds": [s["wall_seconds"] for s in summaries],
        "train_seconds": [s["train_seconds"] for s in summaries],
        "teacher_train_pairs": summaries[0]["teacher_train_pairs"],
        "student_train_pairs": summaries[0]["student_train_pairs"],
        "retrieval_match": summaries[0]["retrieval_match"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
