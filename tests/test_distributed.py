"""Two CPU processes (gloo) give what one process gives on the whole batch: embeddings are gathered
across ranks, so negatives and similarity matrices are global, with or without gradient accumulation;
`vldistill distill` under torchrun trains the same student as a single process, and `vldistill cache`
builds the same teacher cache."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from conftest import assert_same_student, build_clip, config_for, teacher_spec
from test_accumulation import batches, gradients, student_and_objective

from vldistill.cache.store import CacheReader
from vldistill.cli import main
from vldistill.config import packaged_config
from vldistill.data.synthetic import vocabulary
from vldistill.data.tokenizer import build_word_tokenizer
from vldistill.distributed import on_every_rank, settle_collectives
from vldistill.models.ensemble import TeacherEnsemble, teacher_output_over
from vldistill.train.checkpoint import checkpoints
from vldistill.train.loop import backward_window

# Layer-wise losses stay per process (DDP averages them): exact for image tokens, whose count is the same
# on every process; text-token means are weighted per process instead of per token.
LOSSES = {
    "clip": {}, "kd": {"temperature": 2.0}, "feature": {}, "crd": {}, "icl": {}, "affinity": {},
    "hidden": {"towers": ["vision"]},
}
TINY = str(packaged_config("tiny"))
TIMEOUT = 120  # seconds: a hung collective fails the test instead of stalling CI


def setup():
    """The same tokenizer, teacher and 12-pair batch in every process."""
    tokenizer = build_word_tokenizer(vocabulary(), max_length=32)
    teacher = TeacherEnsemble([build_clip(config_for(teacher_spec(), tokenizer), seed=10)])
    return tokenizer, teacher


def rank_slices(tokenizer, rank: int, world: int, micro_batches: int) -> list[dict]:
    """This rank's slice of each micro-batch of the 12-pair batch (tokenized on its own, as a loader would)."""
    _, parts = batches(tokenizer, 12, parts=world * micro_batches)
    return [parts[k * world + rank] for k in range(micro_batches)]


def rank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    tokenizer, teacher = setup()
    results = {}
    for micro_batches in (1, 2):
        module = accelerator.prepare(student_and_objective(tokenizer, LOSSES))
        window = rank_slices(tokenizer, rank, world, micro_batches)
        needs = accelerator.unwrap_model(module).objective.needs
        loss, _ = backward_window(accelerator, module, window, teacher_output_over(teacher, window, needs))
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean")  # the per-process hidden parts differ
        results[micro_batches] = {"loss": mean_loss, "grads": gradients(accelerator.unwrap_model(module))}
    # a flag false on one rank (a NaN loss, a stop signal) is false on all: every rank takes the same branch
    agreed = (on_every_rank(rank == 0, accelerator.device), on_every_rank(True, accelerator.device))
    settle_collectives()
    if rank == 0:
        torch.save({"agreed": agreed, "results": results}, out)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_on_the_whole_batch(tmp_path):
    torch.set_num_threads(1)
    tokenizer, teacher = setup()
    whole, _ = batches(tokenizer, 12, parts=1)
    reference = student_and_objective(tokenizer, LOSSES)
    loss, _ = reference(whole, teacher_output_over(teacher, [whole], reference.objective.needs))
    loss.backward()
    expected = gradients(reference)
    out = tmp_path / "rank0.pt"
    context = mp.start_processes(rank_worker, args=(2, free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"two-process run did not finish in {TIMEOUT} s (hung collective)")
    distributed = torch.load(out, weights_only=True)
    assert distributed["agreed"] == (False, True)
    for micro_batches, found in distributed["results"].items():  # 2 x 6 pairs, and 2 x 2 micro-batches x 3 pairs
        assert found["loss"].item() == pytest.approx(loss.item(), rel=1e-5), micro_batches
        assert found["grads"].keys() == expected.keys() and len(expected) > 20
        for name, grad in expected.items():  # float32 sums in another order: relative to the tensor's scale
            assert (found["grads"][name] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-6, (micro_batches, name)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["pretrain-teacher", TINY, "--out", str(out)]) == 0
    return out / "teacher"


def torchrun(*args: str) -> None:
    """Run `python -m vldistill ARGS` as 2 processes under torchrun (one thread each); fail on error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vldistill"]
    done = subprocess.run([*command, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]


def test_torchrun_two_processes_train_the_student_one_process_trains_and_resume(tmp_path, teacher_dir):
    args = ["distill", TINY, "--no-eval", "--set", f"teacher.path={teacher_dir}", "--set", "distill.train.steps=4"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = [*args, "--set", "distill.train.accumulation_steps=2", "--set", "distill.checkpoint.every=2"]
    torchrun(*two, "--out", str(tmp_path / "two"))
    assert_same_student(tmp_path / "two", tmp_path / "one", atol=1e-4, key_biases=False)
    halfway = tmp_path / "two" / "student-checkpoints" / "checkpoint-00000002"
    torchrun(*two, "--out", str(tmp_path / "resumed"), "--resume", str(halfway))  # both processes resume
    assert_same_student(tmp_path / "resumed", tmp_path / "two", atol=1e-6)


def test_accelerate_launch_two_processes_train_the_student_one_process_trains(tmp_path, teacher_dir):
    args = ["distill", TINY, "--no-eval", "--set", f"teacher.path={teacher_dir}", "--set", "distill.train.steps=4"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vldistill"]
    done = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_student(tmp_path / "two", tmp_path / "one", atol=1e-4, key_biases=False)


CRASH = """
import os, sys
import vldistill.train.loop as loop
from vldistill.cli import main
original, calls = loop.backward_window, []
def crash_in_step_3(*args, **kwargs):  # rank 1 dies in step 3 of a launch's first attempt, as a failing machine would
    calls.append(1)
    if len(calls) == 3 and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os._exit(1)
    return original(*args, **kwargs)
loop.backward_window = crash_in_step_3
sys.exit(main(sys.argv[1:]))
"""


def test_a_crashed_two_process_run_recovers_by_rerun_or_torchrun_restart(tmp_path, teacher_dir):
    """A process dies in step 3. Without restarts torchrun fails, and the same command again (a scheduler's
    requeue) continues from checkpoint 2 with `--resume auto`; with `--max-restarts 1` torchrun restarts both
    processes, which do the same. Both end with the student of an uninterrupted run."""
    args = ["distill", TINY, "--no-eval", "--set", f"teacher.path={teacher_dir}", "--set", "distill.train.steps=4",
            "--set", "distill.checkpoint.every=2", "--resume", "auto"]
    torchrun(*args, "--out", str(tmp_path / "straight"))
    script = tmp_path / "crash.py"
    script.write_text(CRASH)

    def crashing_run(out: str, *launcher_options: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   *launcher_options, str(script), *args, "--out", str(tmp_path / out)]
        return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=TIMEOUT)

    assert crashing_run("requeued").returncode != 0 and not (tmp_path / "requeued" / "student").exists()
    assert [p.name for p in checkpoints(tmp_path / "requeued" / "student-checkpoints")] == ["checkpoint-00000002"]
    torchrun(*args, "--out", str(tmp_path / "requeued"))
    assert_same_student(tmp_path / "requeued", tmp_path / "straight", atol=1e-6)
    restarted = crashing_run("restarted", "--max-restarts", "1")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "failed (exitcode: 1) local_rank: 1" in restarted.stderr  # the first attempt did crash
    assert_same_student(tmp_path / "restarted", tmp_path / "straight", atol=1e-6)


def test_torchrun_two_processes_build_the_cache_one_process_builds(tmp_path, teacher_dir):
    args = ["cache", TINY, "--set", f"teacher.path={teacher_dir}", "--set", "cache.shard_rows=60"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun(*args, "--out", str(tmp_path / "two"))
    one, two = (CacheReader.open(tmp_path / run, verify=True) for run in ("one", "two"))
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [shard["index"] for shard in manifest["shards"]] == [0, 1, 2, 3, 4] and manifest["complete"]  # 256 / 60
    rows = np.arange(one.total_rows)
    for field in one.fields:
        assert np.allclose(two.rows(field, rows), one.rows(field, rows), atol=2e-3), field  # fp16, other threads
