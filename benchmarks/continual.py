"""Continual re-distillation on the embedded shapes: a student distilled on an old domain (shapes circle, square,
triangle) is re-distilled on a new domain (shapes cross, diamond) (a) plainly, (b) with EWC (`continual.ewc_lambda`)
and (a prompted student, unless `--no-prompts`) (c) with EWC on all but the prompts and prompt memory (the old
domain evaluated with its stored prompts). Each seed distils its own old-domain student; the teacher (`--teacher`, else one pretrained here
on both domains) is shared. Zero-shot top-1 accuracy is over each domain's own classes. Prints ONE JSON line:

    {"seeds", "domains", "ewc_lambda", "steps", "old_acc1_before", "new_acc1_before", "plain", "ewc",
     "ewc_memory", "ewc_kept_share", "aim_met", "seconds"}

Each figure is {"mean", "std", "values"} over the seeds (std: sample standard deviation, 0 for one seed).
`plain`, `ewc`, `ewc_memory` (null with --no-prompts) hold each arm's "old_acc1", "new_acc1" and "forgetting"
(old-domain accuracy before minus after). `ewc_kept_share` is the share of plain fine-tuning's forgetting EWC
avoids, 1 - forgetting_ewc / forgetting_plain, per seed, plus "of_means" (from the mean forgettings; null when
plain fine-tuning forgot nothing); `aim_met`: of_means >= 0.5. Everything else goes to stderr.

    python benchmarks/continual.py --teacher /path/to/teacher            # 3 seeds, the demo's student
    python benchmarks/continual.py --seeds 0 --old-steps 100 --new-steps 100 --ewc-lambda 1e5 --no-prompts
    python benchmarks/continual.py --tiny                                # tiny sizes: does it run? (CI)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from _harness import print_figures
from vldistill.binding import build_dataclass
from vldistill.config import ExperimentConfig, load_config, packaged_config
from vldistill.continual import run_continual
from vldistill.data.bundle import load_data
from vldistill.fileio import write_text_atomic
from vldistill.teachers.assemble import load_teacher
from vldistill.train.runs import pretrain_teacher, train_student

OLD_DOMAIN = {"shape": ["circle", "square", "triangle"]}
NEW_DOMAIN = {"shape": ["cross", "diamond"]}
ARMS = ("plain", "ewc", "ewc_memory")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher", help="a teacher folder (default: pretrain one here on both domains)")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--old-steps", type=int, default=150)
    parser.add_argument("--new-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-size", type=int, default=4000, help="shapes drawn per domain run (the domain's kept)")
    parser.add_argument("--test-size", type=int, default=600)
    parser.add_argument("--ewc-lambda", type=float, default=3e5)
    parser.add_argument("--fisher-batches", type=int, default=16)
    parser.add_argument("--no-prompts", dest="prompts", action="store_false",
                        help="unprompted students: no arm (c) (default: 4 learnable context tokens)")
    parser.add_argument("--tiny", action="store_true", help="the tiny config, a few steps, one seed")
    parser.add_argument("--work-dir", help="keep the runs here (default: a temp folder)")
    return parser.parse_args(argv)


def spread(values: list[float]) -> dict[str, Any]:
    """{"mean", "std", "values"} of per-seed values (sample std; 0 for one value)."""
    return {
        "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def kept_share(forgetting_plain: float, forgetting_ewc: float) -> Optional[float]:
    """The share of plain fine-tuning's forgetting EWC avoids: 1 - ewc / plain; None when plain forgot nothing."""
    return None if forgetting_plain <= 0 else 1.0 - forgetting_ewc / forgetting_plain


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of per-seed `runs`, each {"before": {"old", "new"}, "arms": {arm: {"old", "new"}}} (accuracies):
    before-accuracies, each arm's accuracies and forgetting, EWC's kept share and whether it meets the aim."""
    figures: dict[str, Any] = {
        "old_acc1_before": spread([r["before"]["old"] for r in runs]),
        "new_acc1_before": spread([r["before"]["new"] for r in runs]),
    }
    for arm in ARMS:
        if arm not in runs[0]["arms"]:
            figures[arm] = None
            continue
        figures[arm] = {
            "old_acc1": spread([r["arms"][arm]["old"] for r in runs]),
            "new_acc1": spread([r["arms"][arm]["new"] for r in runs]),
            "forgetting": spread([r["before"]["old"] - r["arms"][arm]["old"] for r in runs]),
        }
    per_seed = [
        kept_share(r["before"]["old"] - r["arms"]["plain"]["old"], r["before"]["old"] - r["arms"]["ewc"]["old"])
        for r in runs
    ]
    of_means = kept_share(figures["plain"]["forgetting"]["mean"], figures["ewc"]["forgetting"]["mean"])
    known = [v for v in per_seed if v is not None]
    figures["ewc_kept_share"] = {
        **(spread(known) if known else {"mean": None, "std": None}), "values": per_seed, "of_means": of_means,
    }
    figures["aim_met"] = of_means is not None and of_means >= 0.5
    return figures


def base_config(args: argparse.Namespace) -> ExperimentConfig:
    """The demo's teacher and student (the tiny ones with --tiny) at the benchmark's sizes and steps."""
    if args.tiny:
        return load_config(packaged_config("tiny"), ["data.train_size=300", "data.test_size=120"])
    return load_config(packaged_config("demo"), [
        f"data.train_size={args.train_size}", f"data.test_size={args.test_size}", "data.val_size=64",
        f"teacher.train.steps={args.teacher_steps}", "distill.train_pairs=null",
        f"distill.train.batch_size={args.batch_size}", f"distill.train.lr={args.lr}", "distill.train.warmup_steps=10",
        "distill.train.log_every=25",
        # clip + kd: the objective owns no parameters, so the Fisher of the previous losses needs none retrained
        "distill.losses={clip: {weight: 1.0}, kd: {weight: 1.0, temperature: 2.0}}",
    ])


def domain_config(base: ExperimentConfig, args: argparse.Namespace, seed: int, domain: dict, steps: int, teacher: Path,
                  continual: Optional[dict] = None) -> ExperimentConfig:
    """`base` on one domain with `seed`, `steps` distillation steps from `teacher`, and a `continual` section."""
    data = base.to_dict()
    data["seed"] = seed
    data["data"]["shapes_filter"] = domain
    data["teacher"]["path"] = str(teacher)
    data["distill"]["train"]["steps"] = steps
    if args.prompts:
        data["student"]["prompts"] = {"n_ctx": 4}
    if continual:
        data["continual"].update(continual)
    return build_dataclass(ExperimentConfig, data, "")


def steps(args: argparse.Namespace) -> tuple[int, int]:
    """The old- and new-domain distillation steps (4 each with --tiny)."""
    return (4, 4) if args.tiny else (args.old_steps, args.new_steps)


def one_seed(args: argparse.Namespace, base: ExperimentConfig, teacher: Path, seed: int, work: Path) -> dict[str, Any]:
    """Distil the old-domain student of `seed`, then re-distil it per arm: the seed's accuracies."""
    old_steps, new_steps = steps(args)
    old_cfg = domain_config(base, args, seed, OLD_DOMAIN, old_steps, teacher)
    old_dir = work / f"seed{seed}" / "old"
    write_text_atomic(old_dir / "config.yaml", yaml.safe_dump(old_cfg.to_dict(), sort_keys=False))
    train_student(old_cfg, load_data(old_cfg.data, progress=False), load_teacher(str(teacher)), old_dir / "student", progress=False)
    arms: dict[str, Any] = {}
    settings = {"previous": str(old_dir), "previous_domain": "old", "domain": "new", "fisher_batches": args.fisher_batches}
    plan = [("plain", 0.0, False), ("ewc", args.ewc_lambda, False)] + ([("ewc_memory", args.ewc_lambda, True)] if args.prompts else [])
    for arm, strength, memory in plan:
        continual = {**settings, "ewc_lambda": strength, "prompt_memory": memory}
        cfg = domain_config(base, args, seed, NEW_DOMAIN, new_steps, teacher, continual)
        summary = run_continual(cfg, work / f"seed{seed}" / arm, progress=False)
        before = summary["acc1_before"]
        arms[arm] = {"old": summary["acc1_after"]["old"], "new": summary["acc1_after"]["new"]}
    return {"before": before, "arms": arms}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The benchmark (see the module docstring)."""
    start = time.perf_counter()
    seeds = [0] if args.tiny else args.seeds
    base = base_config(args)
    teacher = Path(args.teacher) if args.teacher else None
    if teacher is None:
        teacher = work / "teacher"
        pretrain_teacher(base, load_data(base.data, progress=False), teacher, progress=False)
    runs = [one_seed(args, base, teacher, seed, work) for seed in seeds]
    figures = summarize(runs)
    return {
        "seeds": seeds, "domains": {"old": OLD_DOMAIN, "new": NEW_DOMAIN}, "ewc_lambda": args.ewc_lambda,
        "steps": dict(zip(("old", "new"), steps(args))),
        **figures, "seconds": round(time.perf_counter() - start, 1),
    }


if __name__ == "__main__":
    print_figures(parse_args(), run)
