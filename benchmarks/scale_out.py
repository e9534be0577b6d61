"""Scale-out figures for the demo models: what several processes, gradient accumulation and checkpoints
cost and whether they change the result. Prints ONE JSON line:

    {"steps", "global_batch",
     "one_process_s", "two_processes_s", "two_processes_speedup",
     "two_processes_max_weight_diff", "two_processes_final_loss_diff",
     "accumulation2_s", "accumulation2_overhead", "accumulation2_max_weight_diff",
     "two_processes_accumulation2_max_weight_diff",
     "checkpoint_every", "checkpoint_s", "checkpoint_overhead", "checkpoint_mb",
     "memory_global_batch", "peak_rss_mb_accumulation1", "peak_rss_mb_accumulation8"}

Each run distills the demo student from the same teacher (the demo config's, pretrained for
--teacher-steps into --work-dir, or reused when a teacher is already there) for --steps steps at the demo's global batch, in a
fresh process: `vldistill distill` alone, under `torchrun --nproc_per_node 2` (one thread per process),
with `distill.train.accumulation_steps: 2`, and with a checkpoint every --checkpoint-every steps. Times
are the training loop's wall seconds (logged by the run), so data generation and start-up are left out.
Memory: peak resident set of a whole `vldistill distill` process (data, models and all) for 3 steps at a
global batch of --memory-batch, in one pass and as 8 accumulated micro-batches.
Weight differences are the largest absolute difference over every tensor of the saved students against
the single-process run (float32; Adam turns rounding into small weight differences). Everything else goes
to stderr. Run it with nothing else on the machine.

    python benchmarks/scale_out.py                  # 100 steps
    python benchmarks/scale_out.py --steps 20 --teacher-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

from safetensors.torch import load_file

from vldistill.config import load_config, packaged_config

DEMO = str(packaged_config("demo"))


def run(args: list[str], env: dict[str, str]) -> float:
    """Run a command line in a fresh process, its output to stderr, failing loudly; return the process's
    peak resident set in MB."""
    child = subprocess.Popen(args, env={**os.environ, **env}, stdout=sys.stderr, stderr=sys.stderr)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"failed ({child.returncode}): {' '.join(args)}")
    return usage.ru_maxrss / 1024  # KB on Linux


def distill(out: Path, teacher: Path, steps: int, launcher: list[str], env: dict[str, str], *sets: str) -> dict:
    """Distill into a fresh `out` and return the loop's seconds, the last logged loss, the process's peak
    memory and the student's tensors."""
    shutil.rmtree(out, ignore_errors=True)  # a run refuses a folder holding an earlier run's checkpoints
    args = [*launcher, "distill", DEMO, "--no-eval", "--out", str(out), "--set", f"teacher.path={teacher}",
            "--set", f"distill.train.steps={steps}", "--set", f"distill.train.warmup_steps={min(steps, 10)}",
            "--set", f"distill.train.log_every={steps}"]
    for item in sets:
        args += ["--set", item]
    peak_mb = run(args, env)
    last = [json.loads(line) for line in (out / "logs" / "distill.jsonl").read_text().splitlines()][-1]
    return {
        "seconds": last["seconds"], "loss": last["loss/total"], "peak_mb": peak_mb,
        "weights": load_file(out / "student" / "model.safetensors"),
    }


def max_weight_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two students' tensors."""
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--memory-batch", type=int, default=2048)
    parser.add_argument("--work-dir", default=None, help="keeps the teacher for the next run (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="scale_out-"))
    teacher = work / "teacher"
    if not (teacher / "teacher").is_dir():
        run([sys.executable, "-m", "vldistill", "pretrain-teacher", DEMO, "--out", str(teacher),
             "--set", f"teacher.train.steps={args.teacher_steps}",
             "--set", f"teacher.train.warmup_steps={min(args.teacher_steps, 10)}"], {})
    teacher = teacher / "teacher"
    single = [sys.executable, "-m", "vldistill"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vldistill"]
    one_thread = {"OMP_NUM_THREADS": "1"}
    base = distill(work / "one", teacher, args.steps, single, {})
    two = distill(work / "two", teacher, args.steps, torchrun, one_thread)
    accumulated = distill(work / "accumulate", teacher, args.steps, single, {}, "distill.train.accumulation_steps=2")
    two_accumulated = distill(work / "two-accumulate", teacher, args.steps, torchrun, one_thread,
                              "distill.train.accumulation_steps=2")
    checkpointed = distill(work / "checkpointed", teacher, args.steps, single, {},
                           f"distill.checkpoint.every={args.checkpoint_every}")
    checkpoint = next((work / "checkpointed" / "student-checkpoints").iterdir())
    memory = {
        k: distill(work / f"memory-{k}", teacher, 3, single, {}, f"distill.train.batch_size={args.memory_batch}",
                   f"distill.train.accumulation_steps={k}")["peak_mb"]
        for k in (1, 8)
    }
    print(json.dumps({
        "steps": args.steps,
        "global_batch": load_config(DEMO).distill.train.batch_size,
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
    }))


if __name__ == "__main__":
    main()
