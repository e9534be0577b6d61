"""A NaN or infinite loss skips its step (no update) and is counted; too many in a row stop the run; a resumed
run keeps the count."""

import pytest
import torch
from helpers import build_clip, config_for, teacher_spec

from vldistill.config import ConfigError, OptimConfig, load_config
from vldistill.losses import LossContext, build_objective
from vldistill.train.checkpoint import load_checkpoint
from vldistill.train.loop import Checkpointer, NonFiniteLossError, train

OPTIM = OptimConfig(steps=4, batch_size=4, warmup_steps=0, log_every=1, max_nonfinite=2)


def batches(make_batch, poisoned: set[int]):
    out = []
    for i in range(OPTIM.steps):
        batch = {k: v for k, v in make_batch(4, seed=i).items() if k in ("pixel_values", "input_ids", "attention_mask")}
        if i in poisoned:
            batch["pixel_values"] = batch["pixel_values"].clone().fill_(float("nan"))
        out.append(batch)
    return out


def test_a_nan_batch_is_skipped_and_counted(tokenizer, make_batch):
    student = build_clip(config_for(teacher_spec(), tokenizer), seed=1)
    objective = build_objective({"clip": {}}, LossContext(student.embed_dim))
    result = train(student, objective, batches(make_batch, {1}), OPTIM)
    assert result.steps == 4 and result.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in student.parameters())
    untrained = build_clip(config_for(teacher_spec(), tokenizer), seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), untrained.parameters()))


def test_too_many_nan_steps_in_a_row_stop_the_run(tokenizer, make_batch):
    student = build_clip(config_for(teacher_spec(), tokenizer), seed=1)
    objective = build_objective({"clip": {}}, LossContext(student.embed_dim))
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite losses in a row \(last at step 3: loss/clip=nan"):
        train(student, objective, batches(make_batch, {1, 2}), OPTIM)
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_max_nonfinite_is_validated():
    with pytest.raises(ConfigError, match="distill.train.max_nonfinite must be >= 1"):
        load_config(None, ["distill.train.max_nonfinite=0"])


def test_a_resumed_run_takes_only_the_remaining_steps_and_keeps_the_skipped_count(tokenizer, make_batch, tmp_path):
    """Resumed from the checkpoint at step 2 (after the NaN step), the run logs steps 3 and 4 only, still counts
    the skipped step, and ends where the uninterrupted run does."""
    data = batches(make_batch, {1})
    runs = []
    for resume in (None, 2):
        student = build_clip(config_for(teacher_spec(), tokenizer), seed=1)
        objective = build_objective({"clip": {}}, LossContext(student.embed_dim))
        state = load_checkpoint(tmp_path / "checkpoint-00000002", "run") if resume else None
        checkpointer = Checkpointer(tmp_path, every=2, keep=2, fingerprint="run") if resume is None else None
        result = train(student, objective, data[resume or 0 :], OPTIM, checkpointer=checkpointer, resume=state)
        runs.append((student, result))
    (straight, whole), (resumed, rest) = runs
    assert [record["step"] for record in whole.history] == [1, 2, 3, 4]
    assert [record["step"] for record in rest.history] == [3, 4]
    assert rest.steps == 4 and rest.nonfinite_steps == 1
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
