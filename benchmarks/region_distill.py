"""Open-vocabulary region distillation (`vldistill region-distill`, ViLD-style) over several seeds: per model (the
teacher's crop classifier, the region student with ViLD-text only, ViLD-image only, both) the mean and spread
(max - min) of base / novel / all-class region accuracy, mean per-class recall and AP50, and what ViLD-image adds
over ViLD-text (both minus text-only, per seed, and whether the mean exceeds both arms' seed spreads). The first
seed's run pretrains the teacher; the other seeds reuse it (one teacher, student seeds: the arms differ in their
losses only). Prints one JSON line with the keys

    {"benchmark", "config", "overrides", "seeds", "models", "image_adds", "text_adds", "train_regions",
     "wall_seconds", "classes"}

    python benchmarks/region_distill.py            # configs/demo_region.yaml, seeds 0 1 2
    python benchmarks/region_distill.py --tiny     # configs/tiny.yaml, a few steps, the first seed: does it run?
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _harness import mean_and_spread, print_figures, seed_args, seed_difference

from vldistill.config import load_config, packaged_config
from vldistill.region_distill import run_region_distill

TINY = [
    "region_distill.image_size=32", "region_distill.train_scenes=24", "region_distill.test_scenes=40",
    "region_distill.train.steps=3", "region_distill.train.batch_size=8", "region_distill.train.warmup_steps=1",
]
KEYS = ("base_acc1", "novel_acc1", "all_acc1", "base_recall", "novel_recall", "all_recall", "ap50_base", "ap50_novel", "ap50_all")


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    config = packaged_config("tiny" if args.tiny else "demo_region")
    overrides = [*(TINY if args.tiny else []), *args.overrides]
    seeds = args.seeds[:1] if args.tiny else args.seeds
    summaries: list[dict[str, Any]] = []
    for seed in seeds:
        shared = [f"teacher.path={summaries[0]['teacher']}"] if summaries else []
        cfg = load_config(config, [*overrides, *shared, f"seed={seed}"])
        summaries.append(run_region_distill(cfg, work / f"seed{seed}", progress=False))
    names = list(summaries[0]["models"])
    models = {name: {key: mean_and_spread([s["models"][name][key] for s in summaries]) for key in KEYS} for name in names}
    has = set(names)
    return {
        "benchmark": "region_distill",
        "config": config.stem,
        "overrides": args.overrides,
        "seeds": seeds,
        "models": models,
        "image_adds": seed_difference(summaries, "student-both", "student-text", models, KEYS) if {"student-both", "student-text"} <= has else None,
        "text_adds": seed_difference(summaries, "student-both", "student-image", models, KEYS) if {"student-both", "student-image"} <= has else None,
        "train_regions": summaries[0]["train_regions"],
        "wall_seconds": [s["wall_seconds"] for s in summaries],
        "classes": {side: len(names_) for side, names_ in summaries[0]["classes"].items()},
    }


if __name__ == "__main__":
    print_figures(seed_args(__doc__), run)
