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
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from PIL import Image
from helpers import (
    assert_same_student,
    batches,
    build_clip,
    config_for,
    gradients,
    logged_steps,
    mark_log,
    steps_after_mark,
    student_and_objective,
    teacher_spec,
)

from vldistill.teachers.cache.store import CacheReader
from vldistill.cli import main
from vldistill.config import load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.data.grammar import vocabulary
from vldistill.data.pairs import InMemoryPairs, PairCollator, pair_loader, repeat_batches
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.data.synthetic import make_split
from vldistill.data.tokenizer import build_word_tokenizer, make_tokenize
from vldistill.distributed import on_every_rank, settle_collectives
from vldistill.teachers.ensemble import TeacherEnsemble, teacher_output_over
from vldistill.train.checkpoint import checkpoints
from vldistill.train.loop import backward_window
from vldistill.train.runs import _batches

# Layer-wise losses stay per process (DDP averages them): exact for image tokens, whose count is the same
# on every process; text-token means are weighted per process instead of per token.
LOSSES = {
    "clip": {}, "kd": {"temperature": 2.0}, "feature": {}, "crd": {}, "icl": {}, "affinity": {},
    "hidden": {"towers": ["vision"]},
}
TINY = str(packaged_config("tiny"))
TIMEOUT = 120  # seconds: a hung collective fails the test instead of stalling CI
pytestmark = pytest.mark.slow  # every test starts two processes


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


def torchrun(*args: str) -> None:
    """Run `python -m vldistill ARGS` as 2 processes under torchrun (one thread each); fail on error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vldistill"]
    done = subprocess.run([*command, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]


def distill_args(teacher: Path) -> list[str]:
    """`vldistill distill` of configs/tiny.yaml for 4 steps from `teacher`, without evaluation."""
    return ["distill", TINY, "--no-eval", "--set", f"teacher.path={teacher}", "--set", "distill.train.steps=4"]


def two_process_args(teacher: Path) -> list[str]:
    """`distill_args` as 2 processes x 2 accumulated micro-batches, a checkpoint every 2 steps, a log line per step."""
    return [*distill_args(teacher), "--set", "distill.train.accumulation_steps=2", "--set", "distill.checkpoint.every=2",
            "--set", "distill.train.log_every=1"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, pretrained_teacher) -> Path:
    """The run folder of `distill_args` in this process (built once; tests must not change it)."""
    out = tmp_path_factory.mktemp("one-process")
    assert main([*distill_args(pretrained_teacher), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, pretrained_teacher) -> Path:
    """The run folder of `two_process_args` under torchrun (built once; tests must not change it)."""
    out = tmp_path_factory.mktemp("two-processes")
    torchrun(*two_process_args(pretrained_teacher), "--out", str(out))
    return out


def test_torchrun_two_processes_train_the_student_one_process_trains_and_resume(
    tmp_path, pretrained_teacher, one_process_run, two_process_run,
):
    assert_same_student(two_process_run, one_process_run, atol=1e-4, key_biases=False)
    halfway = two_process_run / "student-checkpoints" / "checkpoint-00000002"
    resumed = tmp_path / "resumed"
    torchrun(*two_process_args(pretrained_teacher), "--out", str(resumed), "--resume", str(halfway))  # both resume
    assert logged_steps(resumed) == [3, 4]  # only the steps after the checkpoint ran
    assert_same_student(resumed, two_process_run, atol=1e-6)


def test_accelerate_launch_two_processes_train_the_student_one_process_trains(tmp_path, pretrained_teacher, one_process_run):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vldistill"]
    done = subprocess.run([*launch, *distill_args(pretrained_teacher), "--out", str(tmp_path / "two")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_student(tmp_path / "two", one_process_run, atol=1e-4, key_biases=False)


def write_manifest(folder: Path, split: str, count: int) -> Path:
    """`count` shapes pairs as 16x16 PNGs `<i>.png`, listed in a JSONL manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    data = make_split(split, count, seed=0, image_size=16)
    for i, image in enumerate(data.images):
        Image.fromarray(image).save(folder / f"{i}.png")
    manifest = folder / f"{split}.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"{i}.png", "caption": c}) + "\n" for i, c in enumerate(data.captions)))
    return manifest


def natural_batches(count: int, batch_size: int, steps: int) -> list[list[int]]:
    """The pair indices of the global batches a seed-0 loader draws from `count` good pairs."""
    pairs = InMemoryPairs(np.zeros((count, 1, 1, 3), np.uint8), ["a pair"] * count)
    loader = pair_loader(pairs, PairCollator(lambda images, captions: {"pixel_values": images.float()}), batch_size, 0)
    return [batch["sample_index"].tolist() for batch in repeat_batches(loader, steps)]


def test_two_processes_refill_corrupt_images_and_train_the_one_process_student(tmp_path, pretrained_teacher, monkeypatch):
    """Corrupt images in a manifest, 4 in the first process's share of the first two batches and 1 in the
    second's: each is replaced from later batches at its place, so every micro-batch of both processes stays
    full, the embeddings gather, and 2 processes x 2 micro-batches train the student 1 process trains."""
    train = write_manifest(tmp_path / "train", "train", 96)
    test = write_manifest(tmp_path / "test", "test", 24)
    natural = natural_batches(96, 32, steps=3)
    # 2 processes x 2 micro-batches of 16: process 0 reads positions 0-7 and 16-23 of each global batch
    corrupt = [natural[0][0], natural[0][1], natural[0][2], natural[0][9], natural[1][17]]
    for k, index in enumerate(corrupt):
        image = tmp_path / "train" / f"{index}.png"
        image.write_bytes(b"not an image" if k % 2 else image.read_bytes()[:60])  # garbage, or a truncated PNG
    data = [f"data.train={train}", f"data.test={test}", "data.dataset=files", "data.image_size=16",
            "data.max_bad_share=0.2", "distill.train.steps=4"]
    cfg = load_config(TINY, [*data, "distill.train.accumulation_steps=2"])
    preprocess = BatchPreprocessor(make_tokenize(build_word_tokenizer(vocabulary()), 32))

    def micro_batches(world: int, rank: int) -> list[list[int]]:
        with monkeypatch.context() as env:
            env.setenv("WORLD_SIZE", str(world))
            env.setenv("RANK", str(rank))
            bundle = load_data(cfg.data, progress=False)
            batches = _batches(bundle, preprocess, cfg.distill.train, cfg.seed, cfg.data.augment)
            return [batch["sample_index"].tolist() for batch in batches]

    one, ranks = micro_batches(1, 0), [micro_batches(2, rank) for rank in (0, 1)]
    assert [len(micro) for micro in one] == [16] * 8 and not set(corrupt) & {i for micro in one for i in micro}
    assert all([len(micro) for micro in share] == [8] * 8 for share in ranks)
    assert [ranks[0][k] + ranks[1][k] for k in range(8)] == one
    args = ["distill", TINY, "--no-eval", "--set", f"teacher.path={pretrained_teacher}", *(a for d in data for a in ("--set", d))]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun(*args, "--set", "distill.train.accumulation_steps=2", "--out", str(tmp_path / "two"))
    assert_same_student(tmp_path / "two", tmp_path / "one", atol=1e-4, key_biases=False)


CRASH = """
import os, sys
import vldistill.train.loop as loop
from vldistill.cli import main
original, calls = loop.backward_window, []
def crash_in_step_3(*args, **kwargs):  # rank 1 dies in step 3 of a launch's first attempt, as a failing machine would
    calls.append(1)
    with open(os.environ["STEPS_RECORD"], "a") as record:  # a line "attempt rank" per step a process starts
        record.write(os.environ["TORCHELASTIC_RESTART_COUNT"] + " " + os.environ["RANK"] + "\\n")
    if len(calls) == 3 and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os._exit(1)
    return original(*args, **kwargs)
loop.backward_window = crash_in_step_3
sys.exit(main(sys.argv[1:]))
"""


def test_a_crashed_two_process_run_recovers_by_rerun_or_torchrun_restart(tmp_path, pretrained_teacher, two_process_run):
    """A process dies in step 3 (2 processes x 2 micro-batches). Without restarts torchrun fails, and the same
    command again (a scheduler's requeue) continues from checkpoint 2 with `--resume auto`; with `--max-restarts 1`
    torchrun restarts both processes, which do the same. Both run only steps 3 and 4 again and end with the
    student of an uninterrupted run."""
    args = [*two_process_args(pretrained_teacher), "--resume", "auto"]
    script = tmp_path / "crash.py"
    script.write_text(CRASH)

    def crashing_run(out: str, *launcher_options: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   *launcher_options, str(script), *args, "--out", str(tmp_path / out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPS_RECORD": str(tmp_path / f"{out}-steps.txt")}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)

    assert crashing_run("requeued").returncode != 0 and not (tmp_path / "requeued" / "student").exists()
    assert [p.name for p in checkpoints(tmp_path / "requeued" / "student-checkpoints")] == ["checkpoint-00000002"]
    assert mark_log(tmp_path / "requeued") == [1, 2]
    torchrun(*args, "--out", str(tmp_path / "requeued"))
    assert steps_after_mark(tmp_path / "requeued") == [3, 4]
    assert_same_student(tmp_path / "requeued", two_process_run, atol=1e-6)
    restarted = crashing_run("restarted", "--max-restarts", "1")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "failed (exitcode: 1) local_rank: 1" in restarted.stderr  # the first attempt did crash
    started = Counter((tmp_path / "restarted-steps.txt").read_text().split("\n")[:-1])
    # rank 1 of attempt 0 began steps 1-3 (and died in step 3); each process of the restart ran steps 3 and 4 only
    assert (started["0 1"], started["1 0"], started["1 1"]) == (3, 2, 2)
    assert_same_student(tmp_path / "restarted", two_process_run, atol=1e-6)


def test_torchrun_two_processes_build_the_cache_one_process_builds(tmp_path, pretrained_teacher):
    args = ["cache", TINY, "--set", f"teacher.path={pretrained_teacher}", "--set", "cache.shard_rows=60"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun(*args, "--out", str(tmp_path / "two"))
    one, two = (CacheReader.open(tmp_path / run, verify=True) for run in ("one", "two"))
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [shard["index"] for shard in manifest["shards"]] == [0, 1, 2, 3, 4] and manifest["complete"]  # 256 / 60
    rows = np.arange(one.total_rows)
    for field in one.fields:
        assert np.allclose(two.rows(field, rows), one.rows(field, rows), atol=2e-3), field  # fp16, other threads


def test_torchrun_two_processes_prompt_distill_with_a_frozen_text_tower(tmp_path, pretrained_teacher):
    """Two processes train the prompts, the projector and (stage 2) the vision tower while the text tower, which no
    loss reads, stays frozen (DDP refuses trainable parameters without a gradient); the first process evaluates."""
    stages = ("prompt_distill.stages=[{name: prompts, steps: 2, trainable: [prompts, projector]}, "
              "{name: joint, steps: 2, trainable: [student, objective]}]")
    args = ["prompt-distill", TINY, "-q", "--set", f"teacher.path={pretrained_teacher}", "--set", "distill.train.steps=2",
            "--set", "prompt_distill.train.steps=4", "--set", "prompt_distill.train.batch_size=16",
            "--set", "prompt_distill.train.warmup_steps=1", "--set", "prompt_distill.low_resource=null", "--set", stages]
    torchrun(*args, "--out", str(tmp_path / "two"))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert set(summary["models"]) == {"teacher", "student", "prompted"}
    logged = [json.loads(line) for line in (tmp_path / "two" / "logs" / "prompted.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 4
