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

from _harness import mean_and_spread, print_figures, seed_args, seed_difference

from vldistill.config import load_config, packaged_config
from vldistill.prompt_distill import BASE_NOVEL_KEYS, run_prompt_distill

TINY = ["prompt_distill.train.steps=4", "prompt_distill.train.batch_size=32", "prompt_distill.train.warmup_steps=1"]


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
        "prompted_minus_student": seed_difference(summaries, "prompted", "student", models, BASE_NOVEL_KEYS),
        "low_resource_minus_student": seed_difference(summaries, low, "student", models, BASE_NOVEL_KEYS) if low in names else None,
        "train_images": {name: summaries[0]["models"][name].get("train_images") for name in names},
        "wall_seconds": [s["wall_seconds"] for s in summaries],
        "classes": {side: len(names_) for side, names_ in summaries[0]["classes"].items()},
    }


if __name__ == "__main__":
    print_figures(seed_args(__doc__), run)
