"""Scale-out figures for the demo models: what several processes, gradient accumulation and checkpoints
cost and whether they change the result. Prints ONE JSON line:

    {"steps", "global_batch",
     "one_process_s", "two_processes_s", "two_processes_speedup",
     "two_processes_max_weight_diff", "two_processes_final_loss_diff",
     "accumulation2_s", "accumulation2_overhead", "accumulation2_max_weight_diff",
     "two_processes_accumulation2_max_weight_diff",
     "checkpoint_every", "checkpoint_s", "checkpoint_overhead", "checkpoint_mb",
     "memory_global_batch", "peak_rss_mb_accumulation1", "peak_rss_mb_accumulation8"}

Each run distills the --config's student (default: the demo's) from the same teacher (the config's, pretrained
in this process for --teacher-steps into --work-dir, or reused when a teacher is already there) for --steps
steps at the config's global batch, in a fresh process: `vldistill distill` alone, under
`torchrun --nproc_per_node 2` (one thread per process), with `distill.train.accumulation_steps: 2`, and
with a checkpoint every --checkpoint-every steps. Times
are the training loop's wall seconds (logged by the run), so data generation and start-up are left out.
Memory: peak resident set of a whole `vldistill distill` process (data, models and all) for 3 steps at a
global batch of --memory-batch, in one pass and as 8 accumulated micro-batches.
Weight differences are the largest absolute difference over every tensor of the saved students against
the single-process run (float32; Adam turns rounding into small weight differences). Everything else goes
to stderr. Run it with nothing else on the machine. With --deadline, a run still going when the benchmark's
time is up is killed (with its process group: torchrun and its workers) and the benchmark fails.

    python benchmarks/scale_out.py                  # 100 steps
    python benchmarks/scale_out.py --steps 20 --teacher-steps 20
    python benchmarks/scale_out.py --tiny           # the tiny config, 4 steps, the runs at once, 240 s deadline: does it run? (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file

from vldistill.cli import main as vldistill_main
from vldistill.config import load_config, packaged_config

TINY = {"config": "tiny", "steps": 4, "teacher_steps": 2, "checkpoint_every": 2, "memory_batch": 64, "deadline": 240.0}


class Deadline:
    """The benchmark's time limit: `remaining()` seconds left (infinite without a limit)."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.end = time.monotonic() + seconds if seconds is not None else math.inf

    def remaining(self) -> float:
        """Seconds left before the limit."""
        return self.end - time.monotonic()


def run(args: list[str], env: dict[str, str], deadline: Deadline) -> float:
    """Run a command line in a fresh process (in its own process group), its output to stderr, failing
    loudly, and killing the group when `deadline` passes; return the process's peak resident set in MB."""
    child = subprocess.Popen(args, env={**os.environ, **env}, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if deadline.remaining() <= 0:
            os.killpg(child.pid, signal.SIGKILL)
            os.wait4(child.pid, 0)
            raise SystemExit(f"deadline passed: killed {' '.join(args)}")
        time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"failed ({child.returncode}): {' '.join(args)}")
    return usage.ru_maxrss / 1024  # KB on Linux


def distill(
    out: Path, config: str, teacher: Path, steps: int, launcher: list[str], env: dict[str, str], deadline: Deadline,
    *sets: str,
) -> dict:
    """Distill into a fresh `out` and return the loop's seconds, the last logged loss, the process's peak
    memory and the student's tensors."""
    shutil.rmtree(out, ignore_errors=True)  # a run refuses a folder holding an earlier run's checkpoints
    args = [*launcher, "distill", config, "--no-eval", "--out", str(out), "--set", f"teacher.path={teacher}",
            "--set", f"distill.train.steps={steps}", "--set", f"distill.train.warmup_steps={min(steps, 10)}",
            "--set", f"distill.train.log_every={steps}"]
    for item in sets:
        args += ["--set", item]
    peak_mb = run(args, env, deadline)
    last = [json.loads(line) for line in (out / "logs" / "distill.jsonl").read_text().splitlines()][-1]
    return {
        "seconds": last["seconds"], "loss": last["loss/total"], "peak_mb": peak_mb,
        "weights": load_file(out / "student" / "model.safetensors"),
    }


def max_weight_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two students' tensors."""
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The benchmark's flags; --tiny fills in the tiny settings for any flag not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="packaged config name or YAML path (default: demo)")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps of each run (default 100)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher pretraining steps (default 100)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint interval of that run (default 10)")
    parser.add_argument("--memory-batch", type=int, default=None, help="global batch of the memory runs (default 2048)")
    parser.add_argument("--deadline", type=float, default=None, help="seconds the whole benchmark may take (default: none)")
    parser.add_argument("--tiny", action="store_true", help="tiny config and settings, 240 s deadline: checks it runs (CI)")
    parser.add_argument("--work-dir", default=None, help="keeps the teacher for the next run (default: a temp dir)")
    args = parser.parse_args(argv)
    defaults = {"config": "demo", "steps": 100, "teacher_steps": 100, "checkpoint_every": 10, "memory_batch": 2048}
    for key, value in (TINY if args.tiny else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def config_path(name_or_path: str) -> str:
    """A packaged config's path by name ("demo", "tiny"), or the given YAML path."""
    return str(packaged_config(name_or_path)) if not name_or_path.endswith((".yaml", ".yml")) else name_or_path


def main(argv: Optional[list[str]] = None) -> None:
    """Pretrain (or reuse) the teacher, run every arm, and print the JSON line."""
    args = parse_args(argv)
    deadline = Deadline(args.deadline)
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale_out-")))
        figures = measure(args, config_path(args.config), work, deadline)
    print(json.dumps(figures))


def measure(args: argparse.Namespace, config: str, work: Path, deadline: Deadline) -> dict:
    """Every run of the benchmark and the figures they give."""
    teacher = work / "teacher"
    if not (teacher / "teacher").is_dir():  # in this process: the teacher is not measured
        with contextlib.redirect_stdout(sys.stderr):
            code = vldistill_main(["pretrain-teacher", config, "--out", str(teacher),
                                   "--set", f"teacher.train.steps={args.teacher_steps}",
                                   "--set", f"teacher.train.warmup_steps={min(args.teacher_steps, 10)}"])
        if code:
            raise SystemExit(f"pretraining the teacher failed ({code})")
    teacher = teacher / "teacher"
    single = [sys.executable, "-m", "vldistill"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vldistill"]
    one_thread = {"OMP_NUM_THREADS": "1"}

    def arm(name: str, steps: int, launcher: list[str], env: dict[str, str], *sets: str) -> dict:
        return distill(work / name, config, teacher, steps, launcher, env, deadline, *sets)

    arms = {  # name: steps, launcher, environment, config overrides
        "one": (args.steps, single, {}),
        "two": (args.steps, torchrun, one_thread),
        "accumulate": (args.steps, single, {}, "distill.train.accumulation_steps=2"),
        "two-accumulate": (args.steps, torchrun, one_thread, "distill.train.accumulation_steps=2"),
        "checkpointed": (args.steps, single, {}, f"distill.checkpoint.every={args.checkpoint_every}"),
        **{f"memory-{k}": (3, single, {}, f"distill.train.batch_size={args.memory_batch}",
                           f"distill.train.accumulation_steps={k}", "distill.train_pairs=null") for k in (1, 8)},
    }
    if args.tiny:  # every arm at once: a tiny run checks that the benchmark works, its times are no figures
        with ThreadPoolExecutor(len(arms)) as pool:
            runs = dict(zip(arms, pool.map(lambda name: arm(name, *arms[name]), arms)))
    else:  # one after another, each alone on the machine
        runs = {name: arm(name, *spec) for name, spec in arms.items()}
    base, two, accumulated, two_accumulated, checkpointed = (
        runs[name] for name in ("one", "two", "accumulate", "two-accumulate", "checkpointed")
    )
    checkpoint = next((work / "checkpointed" / "student-checkpoints").iterdir())
    memory = {k: runs[f"memory-{k}"]["peak_mb"] for k in (1, 8)}
    return {
        "steps": args.steps,
        "global_batch": load_config(config).distill.train.batch_size,
        "one_process_s": round(base["seconds"], 2),
        "two_processes_s": round(two["seconds"], 2),
        "two_processes_speedup": round(base["seconds"] / two["seconds"], 2),
        "two_processes_max_weight_diff": max_weight_diff(two["weights"], base["weights"]),
        "two_processes_final_loss_diff": abs(two["loss"] - base["loss"]),
        "accumulation2_s": round(accumulated["seconds"], 2),
        "accumulation2_overhead": round(accumulated["seconds"] / base["seconds"] - 1, 3),
        "accumulation2_max_weight_diff": max_weight_diff(accumulated["weights"], base["weights"]),
        "two_processes_accumulation2_max_weight_diff": max_weight_diff(two_accumulated["weights"], base["weights"]),
        "checkpoint_every": args.checkpoint_every,
        "checkpoint_s": round(checkpointed["seconds"], 2),
        "checkpoint_overhead": round(checkpointed["seconds"] / base["seconds"] - 1, 3),
        "checkpoint_mb": round(sum(f.stat().st_size for f in checkpoint.iterdir()) / 1e6, 2),
        "memory_global_batch": args.memory_batch,
        "peak_rss_mb_accumulation1": round(memory[1]),
        "peak_rss_mb_accumulation8": round(memory[8]),
    }


if __name__ == "__main__":
    main()
