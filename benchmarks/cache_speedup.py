"""Teacher cache speed-up: distill the same student for the same steps once with the teacher online and
once from a teacher cache (views=1), and print ONE JSON line:

    {"online_epoch_s", "cached_epoch_s", "speedup", "acc1_online", "acc1_cached", "bytes_per_sample",
     "cache_build_s", "teacher_student_flops_ratio"}

Epoch times are the training loop's wall time per step times the steps of one epoch (train size //
batch size); `cache_build_s` is a fresh build of the cache; acc1 is zero-shot top-1 on the test split;
FLOPs are of one image + one caption forward, counted by torch.utils.flop_counter.FlopCounterMode
(2 FLOPs per multiply-add). The teacher is pretrained into --work-dir, or reused from there when it
matches the config. Everything else goes to stderr.

    python benchmarks/cache_speedup.py                       # the demo config, one epoch each
    python benchmarks/cache_speedup.py --train-size 2048 --steps 32 --teacher-steps 100
    python benchmarks/cache_speedup.py --tiny                # the tiny config: does it run? (CI, seconds)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _harness import print_figures
from vldistill.teachers.cache.build import build_cache
from vldistill.config import ExperimentConfig, load_config, packaged_config
from vldistill.data.bundle import DataBundle, load_data
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.eval.suite import evaluate_model
from vldistill.models.inputs import inputs_for
from vldistill.train.runs import build_student, obtain_teacher, train_student
from vldistill.trained import TrainedModel


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="experiment YAML (default: the demo config, or tiny with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tiny config (256 pairs, 8 steps): checks the script runs")
    parser.add_argument("--train-size", type=int, default=None, help="training pairs (default: the config's)")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps of each run (default: one epoch)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher pretraining steps (default: the config's)")
    parser.add_argument("--work-dir", default=None, help="folder for the teacher, cache and students (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = str(packaged_config("tiny" if args.tiny else "demo"))
    return args


def experiment_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides the flags make; distillation defaults to one epoch of steps."""
    overrides = []
    if args.train_size is not None:
        overrides.append(f"data.train_size={args.train_size}")
    if args.teacher_steps is not None:
        teacher_warmup = min(load_config(args.config).teacher.train.warmup_steps, args.teacher_steps)
        overrides += [f"teacher.train.steps={args.teacher_steps}", f"teacher.train.warmup_steps={teacher_warmup}"]
    cfg = load_config(args.config, overrides)
    steps = args.steps if args.steps is not None else max(1, cfg.data.train_size // cfg.distill.train.batch_size)
    warmup = min(cfg.distill.train.warmup_steps, steps)
    return [*overrides, f"distill.train.steps={steps}", f"distill.train.warmup_steps={warmup}"]


def forward_flops(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward of `model` on `batch`'s image and text inputs."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(**inputs_for(batch, ""))
    return counter.get_total_flops()


def flops_ratio(cfg: ExperimentConfig, data: DataBundle, teacher: TrainedModel) -> float:
    """Teacher FLOPs over student FLOPs for the first training image and its caption."""
    student = build_student(cfg, teacher, inherit=False)
    preprocess = BatchPreprocessor.for_model(teacher.tokenizer, teacher.model.input_spec)
    sample = data.train[0]
    batch = preprocess(sample.image.unsqueeze(0), [sample.caption])
    return forward_flops(teacher.model, batch) / forward_flops(student, batch)


def zero_shot_acc1(trained: TrainedModel, data: DataBundle, cfg: ExperimentConfig) -> float:
    """Zero-shot top-1 accuracy of a trained student on the test data, as `vldistill eval` reports it."""
    return evaluate_model(trained.model, trained.tokenizer, data, cfg.eval, "student", progress=False)["summary"]["acc1"]


def run(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Pretrain or reuse the teacher, build the cache, distill online and from the cache, evaluate both."""
    overrides = experiment_overrides(args)
    cfg = load_config(args.config, overrides)
    data = load_data(cfg.data, progress=False)
    teacher = obtain_teacher(cfg, data, work / "teacher", work / "logs")
    cache_dir = work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    built = build_cache(cfg, data, teacher, cache_dir, progress=False)
    print(built.summary(), file=sys.stderr)
    steps = cfg.distill.train.steps
    steps_per_epoch = cfg.data.train_size // cfg.distill.train.batch_size
    online = train_student(cfg, data, teacher, work / "online", desc="distill online")
    cached_cfg = load_config(args.config, [*overrides, f"cache.path={cache_dir}", "cache.mode=require"])
    cached = train_student(cached_cfg, data, teacher, work / "cached", desc="distill from cache")
    online_epoch = online.result.seconds / steps * steps_per_epoch
    cached_epoch = cached.result.seconds / steps * steps_per_epoch
    return {
        "online_epoch_s": round(online_epoch, 3),
        "cached_epoch_s": round(cached_epoch, 3),
        "speedup": round(online_epoch / cached_epoch, 3),
        "acc1_online": zero_shot_acc1(online, data, cfg),
        "acc1_cached": zero_shot_acc1(cached, data, cfg),
        "bytes_per_sample": built.bytes_per_sample,
        "cache_build_s": round(built.seconds, 3),
        "teacher_student_flops_ratio": round(flops_ratio(cfg, data, teacher), 3),
    }


def main(argv: Optional[list[str]] = None) -> None:
    """Run the benchmark; only the JSON line goes to stdout."""
    print_figures(parse_args(argv), run)


if __name__ == "__main__":
    main()
