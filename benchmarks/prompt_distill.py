"""Prompt distillation (`vldistill prompt-distill`, PromptKD-style) over several seeds: per model (teacher, the
student without prompts, the prompt-distilled student and the low-resource one) the mean and spread (max - min)
of base / novel accuracy, their harmonic mean and all-class acc1, and whether prompt distillation beats the
student without prompts by more than the seed-to-seed spread. Each seed is a whole run (teacher pretraining and
the unprompted student included), one after another in this process; prints one JSON line with the keys

    {"benchmark", "config", "overrides", "seeds", "models", "prompted_minus_student", "low_resource_minus_student",
     "train_images", "wall_seconds", "classes"}

    python benchmarks/prompt_distill.py            # configs/demo_prompt.yaml, seeds 0 1 2
    python benchmarks/prompt_distill.py --tiny     # configs/tiny.yaml, a few steps, the first seed: does it run?
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _harness import mean_and_spread, print_figures

from vldistill.config import load_config, packaged_config
from vldistill.prompt_distill import BASE_NOVEL_KEYS, run_prompt_distill

TINY = ["prompt_distill.train.steps=4", "prompt_distill.train.batch_size=32", "prompt_distill.train.warmup_steps=1"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.yaml with a few steps: checks that it runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work-dir", default=None, help="keep the runs here (default: a temporary folder, deleted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args()


def gain(summaries: list[dict], arm: str, models: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per figure: the mean over seeds of `arm` minus the unprompted student, each seed's gain, and whether the
    mean gain exceeds both arms' seed spreads."""
    result = {}
    for key in BASE_NOVEL_KEYS:
        per_seed = [s["models"][arm][key] - s["models"]["student"][key] for s in summaries]
        noise = max(models[arm][key]["spread"], models["student"][key]["spread"])
        mean = sum(per_seed) / len(per_seed)
        result[key] = {"mean": mean, "per_seed": per_seed, "beyond_spread": len(per_seed) > 1 and mean > noise}
    return result


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    config = packaged_config("tiny" if args.tiny else "demo_prompt")
    overrides = [*(TINY if args.tiny else []), *args.overrides]
    seeds = args.seeds[:1] if args.tiny else args.seeds
    summaries = [
        run_prompt_distill(load_config(config, [*overrides, f"seed={seed}"]), work / f"seed{seed}", progress=False)
        for seed in seeds
    ]
    names = list(summaries[0]["models"])
    models = {
        name: {key: mean_and_spread([s["models"][name][key] for s in summaries]) for key in BASE_NOVEL_KEYS}
        for name in names
    }
    low = "prompted-low-resource"
    return {
        "benchmark": "prompt_distill",
        "config": config.stem,
        "overrides": args.overrides,
        "seeds": seeds,
        "models": models,
        "prompted_minus_student": gain(summaries, "prompted", models),
        "low_resource_minus_student": gain(summaries, low, models) if low in names else None,
        "train_images": {name: summaries[0]["models"][name].get("train_images") for name in names},
        "wall_seconds": [s["wall_seconds"] for s in summaries],
        "classes": {side: len(names_) for side, names_ in summaries[0]["classes"].items()},
    }


if __name__ == "__main__":
    print_figures(parse_args(), run)
