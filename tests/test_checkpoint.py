"""Checkpoints: atomic, newest K kept, refused when from another run; a run killed with SIGKILL after
a checkpoint resumes to the same student as an uninterrupted run, running only the steps left (a resume
that silently started over would train the same student, so each test also reads which steps ran)."""

import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_same_student, mark_log, steps_after_mark
from safetensors.torch import load_file

from vldistill.cli import main
from vldistill.config import packaged_config
from vldistill.train.checkpoint import CheckpointError, TrainState, capture_rng, checkpoints, load_checkpoint, save_checkpoint

TINY = str(packaged_config("tiny"))


def distill_args(out, teacher, *extra):
    return ["distill", TINY, "--out", str(out), "--no-eval", "--set", f"teacher.path={teacher}",
            "--set", "distill.checkpoint.every=2", "--set", "distill.train.log_every=1", *extra]


@pytest.fixture
def teacher(pretrained_teacher):
    """This file's teacher: the pretrained tiny teacher's folder."""
    return pretrained_teacher


@pytest.fixture(scope="module")
def straight(tmp_path_factory, pretrained_teacher):
    """straight(*extra): the folder of an uninterrupted `distill_args` run with `extra` arguments, run once per
    `extra` in this module (tests must not change it)."""
    runs = {}

    def run(*extra):
        if extra not in runs:
            out = tmp_path_factory.mktemp("straight")
            assert main(distill_args(out, pretrained_teacher, *extra)) == 0
            runs[extra] = out
        return runs[extra]

    return run


def test_checkpoints_keep_the_newest_and_refuse_other_runs(tmp_path):
    for step in (2, 4, 6):
        gap = {"gap_ratios": {"kd": 0.5 * step}, "gap_reference": {"kd": 2.0}}
        state = TrainState(step, {"w": torch.full((2,), float(step))}, {"state": {}, "param_groups": []},
                           {"last_epoch": step}, capture_rng(), weighting=gap)
        save_checkpoint(tmp_path, state, "run-a", keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-00000004", "checkpoint-00000006"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    loaded = load_checkpoint(tmp_path / "checkpoint-00000006", "run-a")
    assert loaded.step == 6 and torch.equal(loaded.weights["w"], torch.full((2,), 6.0))
    assert loaded.weighting == {"gap_ratios": {"kd": 3.0}, "gap_reference": {"kd": 2.0}}
    with pytest.raises(CheckpointError, match="belongs to another run"):
        load_checkpoint(tmp_path / "checkpoint-00000006", "run-b")
    with pytest.raises(CheckpointError, match="not a vldistill checkpoint"):
        load_checkpoint(tmp_path, "run-a")


def test_a_failed_checkpoint_write_keeps_the_earlier_ones_and_says_so(tmp_path, monkeypatch):
    def state(step):
        return TrainState(step, {"w": torch.full((2,), float(step))}, {"state": {}, "param_groups": []},
                          {"last_epoch": step}, capture_rng())

    save_checkpoint(tmp_path, state(2), "run-a", keep=2)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("vldistill.train.checkpoint.save_file", disk_full)
    with pytest.raises(CheckpointError, match=r"checkpoint-00000004: \[Errno 28\] No space left on device; the newest "
                                              r"complete one, checkpoint-00000002, is intact"):
        save_checkpoint(tmp_path, state(4), "run-a", keep=2)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000002"]  # no half-written folder left
    assert load_checkpoint(tmp_path / "checkpoint-00000002", "run-a").step == 2


GAP_AND_ACCUMULATION = [  # gap ratios measured at step 3 must come back from the checkpoint at step 4
    "--set", "distill.weighting.kind=gap", "--set", "distill.weighting.every=3",
    "--set", "distill.train.accumulation_steps=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], GAP_AND_ACCUMULATION], ids=["plain", "gap-accumulation"])
def test_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(tmp_path, teacher, extra, straight):
    reference = straight(*extra)
    script = textwrap.dedent(f"""
        import os, signal, sys
        import vldistill.train.loop as loop
        from vldistill.cli import main
        original = loop.save_checkpoint
        def save_then_die(folder, state, fingerprint, keep):
            path = original(folder, state, fingerprint, keep)
            if state.step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return path
        loop.save_checkpoint = save_then_die
        sys.exit(main({distill_args(tmp_path / "killed", teacher, *extra)!r}))
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = tmp_path / "killed" / "student-checkpoints"
    assert [p.name for p in checkpoints(folder)] == ["checkpoint-00000002", "checkpoint-00000004"]
    assert not (tmp_path / "killed" / "student").exists()
    assert mark_log(tmp_path / "killed") == [1, 2, 3, 4]
    assert main([*distill_args(tmp_path / "killed", teacher, *extra), "--resume"]) == 0
    assert steps_after_mark(tmp_path / "killed") == [5, 6, 7, 8]
    assert_same_student(tmp_path / "killed", reference, atol=1e-6)


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_it_and_resume_matches_an_uninterrupted_run(tmp_path, teacher, straight):
    """SIGTERM (a scheduler's preemption) during step 3: the step completes, checkpoint 3 is written although
    checkpoints are due every 2 steps, the run exits with 143, and --resume ends where a straight run does."""
    reference = straight()
    script = textwrap.dedent(f"""
        import os, signal, sys
        import vldistill.train.loop as loop
        from vldistill.cli import main
        original, calls = loop.backward_window, []
        def terminate_in_step_3(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)
        loop.backward_window = terminate_in_step_3
        sys.exit(main({distill_args(tmp_path / "stopped", teacher)!r}))
    """)
    stopped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "stopped by SIGTERM after step 3 of 8" in stopped.stderr and "--resume" in stopped.stderr
    folder = tmp_path / "stopped" / "student-checkpoints"
    assert [p.name for p in checkpoints(folder)] == ["checkpoint-00000002", "checkpoint-00000003"]
    assert mark_log(tmp_path / "stopped") == [1, 2, 3]
    assert main([*distill_args(tmp_path / "stopped", teacher), "--resume"]) == 0
    assert steps_after_mark(tmp_path / "stopped") == [4, 5, 6, 7, 8]
    assert_same_student(tmp_path / "stopped", reference, atol=1e-6)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, teacher, capsys):
    assert main(distill_args(tmp_path / "run", teacher)) == 0
    code = main([*distill_args(tmp_path / "run", teacher, "--set", "distill.train.lr=0.01"), "--resume"])
    assert code == 2 and "belongs to another run" in capsys.readouterr().err


def test_resume_auto_starts_or_continues_and_a_fresh_run_refuses_old_checkpoints(tmp_path, teacher, capsys):
    """`--resume auto` suits a command a scheduler may restart: the first start trains from scratch, a
    restart continues; a run without --resume refuses a folder holding another run's checkpoints."""
    args = distill_args(tmp_path / "run", teacher)
    assert main([*args, "--resume", "auto"]) == 0  # nothing to resume: starts
    first = load_file(tmp_path / "run" / "student" / "model.safetensors")
    capsys.readouterr()
    assert main(args) == 2
    assert "holds checkpoints of an earlier run (newest: checkpoint-00000008)" in capsys.readouterr().err
    assert mark_log(tmp_path / "run") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert main([*args, "--resume", "auto"]) == 0  # continues from the last checkpoint: nothing left to train
    assert steps_after_mark(tmp_path / "run") == []
    again = load_file(tmp_path / "run" / "student" / "model.safetensors")
    assert all(torch.equal(first[key], again[key]) for key in first)


def test_resume_passes_over_a_damaged_newest_checkpoint(tmp_path, teacher, capsys, straight):
    """The newest checkpoint's weights were truncated on disk (a crash of the storage): --resume warns and
    continues from the one before, ending with the uninterrupted run's student."""
    reference = straight()
    args = distill_args(tmp_path / "run", teacher, "--set", "distill.checkpoint.keep=3")
    assert main(args) == 0
    folder = tmp_path / "run" / "student-checkpoints"
    assert [p.name for p in checkpoints(folder)] == ["checkpoint-00000004", "checkpoint-00000006", "checkpoint-00000008"]
    weights = folder / "checkpoint-00000008" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert mark_log(tmp_path / "run") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert main([*args, "--resume"]) == 0
    assert "checkpoint-00000008 is damaged" in capsys.readouterr().err
    assert steps_after_mark(tmp_path / "run") == [7, 8]  # from checkpoint 6
    assert_same_student(tmp_path / "run", reference, atol=1e-6)
