"""bf16 on the CPU: what a distillation step costs in fp32, in bf16 and with only the teachers in bf16, and
what a bf16 teacher costs the student in accuracy. Prints ONE JSON line:

    {"threads", "native_bf16", "teacher_params", "student_params", "batch_size", "trials",
     "fp32_step_ms", "bf16_step_ms", "bf16_student_step_ms", "bf16_teacher_step_ms",
     "bf16_over_fp32", "bf16_student_over_fp32", "bf16_teacher_over_fp32", "teacher_share_fp32",
     "teacher_fp32_ms", "teacher_bf16_weights_ms", "teacher_bf16_autocast_ms",
     "probe_training_slowdown", "probe_inference_slowdown",
     "signal_max_abs_diff", "loss_rel_diff",
     "distill_steps", "acc1_fp32_teacher", "acc1_bf16_teacher"}

Step times (ms, median over --trials, the arms interleaved trial by trial so load from other processes hits
them alike; each trial is the training loop's own seconds over --steps-per-trial steps, from a copy of the
same student): `fp32` (student and teachers in fp32), `bf16` (`distill.train.precision: bf16` and
`teacher.precision: bf16`: everything in bf16), `bf16_student` (bf16 student, fp32 teachers) and
`bf16_teacher` (fp32 student, `teacher.precision: bf16`). `teacher_share_fp32` is the teachers' forward
over the fp32 step time. The teachers' forward alone (ms per batch, interleaved) in fp32, with bf16 weights
(what `teacher.precision: bf16` does) and under bf16 autocast. The probes are vldistill.precision's
(bf16 time over fp32 time of a small transformer block, training and inference). `signal_max_abs_diff` is
the largest difference between the bf16 and fp32 teachers' float32 embeddings on one batch; `loss_rel_diff`
the relative difference of one step's loss. Accuracy: zero-shot top-1 on the test split of a student
distilled for --distill-steps (0: skipped, null) from the fp32 teachers and from the bf16 ones, same seed.
Everything else goes to stderr.

Models: --teacher and --student folders (e.g. the demo's), or the --config's (default: the demo config)
teacher, pretrained into --work-dir for --teacher-steps (or reused from there), and its student. --sizes issue
sets the config's towers to the issue's sizes: a 21.7M-parameter teacher (6 layers of width 384 per tower, MLP
ratio 4) and a 6.5M-parameter student (4 layers of width 256). Times are wall-clock: run it with nothing else
on the machine.

    python benchmarks/bf16_step.py --teacher ~/models/teacher --student ~/models/student
    python benchmarks/bf16_step.py --sizes issue --teacher-steps 200 --distill-steps 100
    python benchmarks/bf16_step.py --tiny       # the tiny config, 1 trial, 2 teacher and 2 distill steps: does it run? (CI)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from _harness import print_figures
from vldistill.config import ExperimentConfig, load_config, packaged_config
from vldistill.data.bundle import DataBundle, load_data
from vldistill.eval.suite import evaluate_model
from vldistill.models.loading import load_dual_encoder_any
from vldistill.precision import native_bf16_cpu, probe_cpu_bf16
from vldistill.profile.throughput import count_parameters
from vldistill.teachers.assemble import teacher_ensemble
from vldistill.teachers.ensemble import TeacherEnsemble, teacher_output_over
from vldistill.train.loop import train
from vldistill.train.plan import DistillPlan
from vldistill.train.runs import obtain_teacher, plan_student_run, train_student
from vldistill.trained import TrainedModel

ISSUE_SIZES = [
    *(f"teacher.model.{tower}.{key}={value}" for tower in ("vision", "text")
      for key, value in (("layers", 6), ("width", 384), ("heads", 6), ("mlp_ratio", 4.0))),
    "teacher.model.projection_dim=384",
    *(f"student.model.{tower}.{key}={value}" for tower in ("vision", "text")
      for key, value in (("layers", 4), ("width", 256), ("heads", 4), ("mlp_ratio", 4.0))),
    "student.model.projection_dim=256",
]
ARMS = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "bf16_student": ("bf16", "fp32"), "bf16_teacher": ("fp32", "bf16")}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="experiment YAML (default: the demo config, or tiny with --tiny)")
    parser.add_argument("--teacher", default=None, help="teacher folder (default: the config's, pretrained into --work-dir)")
    parser.add_argument("--student", default=None, help="student folder to time steps from (default: the config's student)")
    parser.add_argument("--sizes", choices=("config", "issue"), default="config", help="issue: 22M teacher, 7M student")
    parser.add_argument("--tiny", action="store_true", help="the tiny config, few trials and steps: checks the script runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--trials", type=int, default=None, help="interleaved timing trials (default 7; tiny 1)")
    parser.add_argument("--steps-per-trial", type=int, default=None, help="training steps per trial (default 3; tiny 1)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher pretraining steps (default: the config's; tiny 2)")
    parser.add_argument("--distill-steps", type=int, default=None, help="steps of the accuracy runs (default: the config's; tiny 2; 0 skips)")
    parser.add_argument("--work-dir", default=None, help="folder for the teacher and students (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = str(packaged_config("tiny" if args.tiny else "demo"))
    args.trials = args.trials or (1 if args.tiny else 7)
    args.steps_per_trial = args.steps_per_trial or (1 if args.tiny else 3)
    if args.tiny and args.teacher_steps is None:
        args.teacher_steps = 2
    if args.tiny and args.distill_steps is None:
        args.distill_steps = 2
    return args


def experiment_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides the flags make (sizes, teacher folder, pretraining and distillation steps)."""
    overrides = list(ISSUE_SIZES) if args.sizes == "issue" else []
    if args.teacher is not None:
        overrides.append(f"teacher.path={args.teacher}")
    cfg = load_config(args.config, overrides)
    if args.teacher_steps is not None:
        warmup = min(cfg.teacher.train.warmup_steps, args.teacher_steps)
        overrides += [f"teacher.train.steps={args.teacher_steps}", f"teacher.train.warmup_steps={warmup}"]
    if args.distill_steps:
        warmup = min(cfg.distill.train.warmup_steps, args.distill_steps)
        overrides += [f"distill.train.steps={args.distill_steps}", f"distill.train.warmup_steps={warmup}"]
    return overrides


def interleaved(arms: dict[str, Callable[[], float]], trials: int) -> dict[str, float]:
    """Median of each arm's measurement (ms) over `trials` rounds, every round running each arm once in turn,
    after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for trial in range(trials + 1):
        for name, measure in arms.items():
            value = measure()
            if trial:
                times[name].append(value)
    return {name: statistics.median(values) for name, values in times.items()}


def step_arm(plan: DistillPlan, teachers: TeacherEnsemble, precision: str, batches: list, steps: int) -> Callable[[], float]:
    """A measurement: ms per step of the training loop over `steps` batches, a copy of the plan's student and
    objective trained in `precision` with `teachers`."""
    optim = dataclasses.replace(plan.optim, steps=steps, warmup_steps=0, log_every=steps, precision=precision)

    def measure() -> float:
        student, objective = copy.deepcopy(plan.student), copy.deepcopy(plan.objective)
        result = train(student, objective, batches[:steps], optim, teacher=teachers, progress=False)
        return 1000 * result.seconds / steps

    return measure


def teacher_arm(forward: Callable[[dict], object], batches: list) -> Callable[[], float]:
    """A measurement: ms per batch of `forward` over the batches (no gradients)."""

    def measure() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                forward(batch)
        return 1000 * (time.perf_counter() - start) / len(batches)

    return measure


def first_step_loss(plan: DistillPlan, teachers: TeacherEnsemble, batch: dict) -> float:
    """The loss of one fp32 step of a copy of the plan's student on `batch` with `teachers`."""
    optim = dataclasses.replace(plan.optim, steps=1, warmup_steps=0, log_every=1, precision="fp32")
    result = train(copy.deepcopy(plan.student), copy.deepcopy(plan.objective), [batch], optim, teacher=teachers, progress=False)
    return result.history[0]["loss/total"]


def max_signal_diff(fp32: TeacherEnsemble, bf16: TeacherEnsemble, batch: dict) -> float:
    """Largest absolute difference between the two ensembles' float32 image and text embeddings on `batch`."""
    a, b = fp32(batch), bf16(batch)
    return max(float((a[name] - b[name]).abs().max()) for name in ("image_embeds", "text_embeds"))


def zero_shot_acc1(trained: TrainedModel, data: DataBundle, cfg: ExperimentConfig) -> float:
    """Zero-shot top-1 accuracy on the test data, as `vldistill eval` reports it."""
    return evaluate_model(trained.model, trained.tokenizer, data, cfg.eval, "student", progress=False, throughput=False)["summary"]["acc1"]


def run(args: argparse.Namespace, work: Path) -> dict:
    """Obtain the models, time the arms and the teachers' forward, compare signals and accuracies."""
    torch.set_num_threads(args.threads)
    overrides = experiment_overrides(args)
    cfg = load_config(args.config, overrides)
    data = load_data(cfg.data, progress=False)
    teacher = obtain_teacher(cfg, data, work / "teacher", work / "logs", progress=False)
    student = load_dual_encoder_any(args.student)[0] if args.student else None
    plan = plan_student_run(cfg, data, teacher, work / "timing", student=student)
    if plan.teachers is None:
        raise SystemExit("the config's losses need no teacher: nothing to compare")
    bf16_cfg = load_config(args.config, [*overrides, "teacher.precision=bf16"])
    teachers = {"fp32": plan.teachers, "bf16": teacher_ensemble(bf16_cfg, teacher, plan.student.input_spec)[0]}
    batches = list(itertools.islice(iter(plan.batches), args.steps_per_trial))
    steps = interleaved(
        {name: step_arm(plan, teachers[teacher_precision], precision, batches, args.steps_per_trial)
         for name, (precision, teacher_precision) in ARMS.items()},
        args.trials,
    )
    needs = plan.objective.needs

    def autocast_teachers(batch: dict) -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return teacher_output_over(teachers["fp32"], [batch], needs)

    forward = interleaved({
        "fp32": teacher_arm(lambda batch: teacher_output_over(teachers["fp32"], [batch], needs), batches),
        "bf16_weights": teacher_arm(lambda batch: teacher_output_over(teachers["bf16"], [batch], needs), batches),
        "bf16_autocast": teacher_arm(autocast_teachers, batches),
    }, args.trials)
    losses = {name: first_step_loss(plan, ensemble, batches[0]) for name, ensemble in teachers.items()}
    figures = {
        "threads": args.threads,
        "native_bf16": native_bf16_cpu(),
        "teacher_params": count_parameters(teacher.model),
        "student_params": count_parameters(plan.student),
        "batch_size": cfg.distill.train.batch_size,
        "trials": args.trials,
        **{f"{name}_step_ms": round(ms, 2) for name, ms in steps.items()},
        **{f"{name}_over_fp32": round(steps[name] / steps["fp32"], 3) for name in ARMS if name != "fp32"},
        "teacher_share_fp32": round(forward["fp32"] / steps["fp32"], 3),
        **{f"teacher_{name}_ms": round(ms, 2) for name, ms in forward.items()},
        "probe_training_slowdown": round(probe_cpu_bf16(training=True).slowdown, 3),
        "probe_inference_slowdown": round(probe_cpu_bf16(training=False).slowdown, 3),
        "signal_max_abs_diff": max_signal_diff(teachers["fp32"], teachers["bf16"], batches[0]),
        "loss_rel_diff": abs(losses["bf16"] - losses["fp32"]) / abs(losses["fp32"]),
        "distill_steps": args.distill_steps if args.distill_steps is not None else cfg.distill.train.steps,
        "acc1_fp32_teacher": None,
        "acc1_bf16_teacher": None,
    }
    if figures["distill_steps"]:
        for precision in ("fp32", "bf16"):
            arm_cfg = load_config(args.config, [*overrides, f"teacher.precision={precision}"])
            trained = train_student(arm_cfg, data, teacher, work / f"student-{precision}-teacher", progress=False)
            figures[f"acc1_{precision}_teacher"] = zero_shot_acc1(trained, data, cfg)
    return figures


def main(argv: Optional[list[str]] = None) -> None:
    """Run the benchmark; only the JSON line goes to stdout."""
    print_figures(parse_args(argv), run)


if __name__ == "__main__":
    main()
