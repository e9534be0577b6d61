"""Staged training (train/stages.py, `distill.stages`): the config refuses impossible stages by key; selectors
resolve through the model's own parameter groups (an unknown one lists the known ones); a stage that trains only
the vision tower leaves the text tower bit-identical and holds optimizer state for the vision tower only; each
stage's learning rate is what the log shows; a run resumed inside a stage (or at a stage's end) ends with the
weights of an uninterrupted run; a checkpoint of other stages is refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import IMAGE_SIZE, ONE_HEAD_STUDENT, TEXT_LENGTH, build_clip, config_for

from vldistill.binding import ConfigError
from vldistill.cli import main
from vldistill.config import OptimConfig, StageConfig, load_config, packaged_config
from vldistill.data.synthetic import make_split
from vldistill.data.tokenizer import make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.losses import LossContext, build_objective
from vldistill.train.checkpoint import CheckpointError, load_checkpoint
from vldistill.train.loop import Checkpointer, train
from vldistill.train.runs import run_fingerprint
from vldistill.train.stages import plan_stages

TINY = str(packaged_config("tiny"))
CLIP_ONLY = {"clip": {"weight": 1.0}}
FEATURE = {"clip": {"weight": 1.0}, "feature": {"weight": 1.0}}  # its projection (16 -> 32) is the objective's
STEPS = 5  # stage 1 "vision": steps 1-2, lr 1e-3, no warmup; stage 2 "joint": steps 3-5, lr 1e-4, 1 warmup step
STAGES = [
    StageConfig("vision", 2, lr=1e-3, trainable=["vision"]),
    StageConfig("joint", 3, lr=1e-4, warmup_steps=1, trainable=["student"]),
]


def stages_override(*stages: str) -> str:
    return "distill.stages=[" + ", ".join(stages) + "]"


@pytest.mark.parametrize("overrides, message", [
    ([stages_override("{name: a, steps: 3, trainable: [vision]}", "{name: b, steps: 3, trainable: [student]}")],
     ("distill.stages: the stages' steps sum to 6, but distill.train.steps is 8; they must be equal "
      "(set distill.train.steps: 6)")),
    ([stages_override("{name: a, steps: 4, trainable: [vision]}", "{name: a, steps: 4, trainable: [student]}")],
     "distill.stages[1].name: 'a' names an earlier stage too"),
    ([stages_override("{name: a, steps: 8, trainable: []}")], "distill.stages[0].trainable must name at least one"),
    ([stages_override("{name: a, steps: 0, trainable: [student]}")], "distill.stages[0].steps must be >= 1, got 0"),
    ([stages_override("{steps: 8, trainable: [student]}")], "distill.stages[0].name is required"),
    ([stages_override("{name: a, steps: 8, lr: -1.0, trainable: [student]}")], "distill.stages[0].lr must be > 0"),
    ([stages_override("{name: a, steps: 4, warmup_steps: 5, trainable: [student]}", "{name: b, steps: 4, trainable: [student]}")],
     "distill.stages[0].warmup_steps must be null or in [0, steps=4], got 5"),
    ([stages_override("{name: a, steps: 1, trainable: [student]}", "{name: b, steps: 7, trainable: [student]}")],
     "distill.stages[0] has 1 steps, fewer than its warmup (distill.train.warmup_steps: 2)"),
    ([stages_override("{name: a, steps: 8, trainable: [student], epochs: 2}")], "unknown config key 'distill.stages[0].epochs'"),
])
def test_the_config_refuses_impossible_stages_by_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY, overrides)


def test_a_run_without_stages_is_one_unnamed_stage_and_stages_change_the_run_fingerprint() -> None:
    plain = load_config(TINY)
    staged = load_config(TINY, [stages_override("{name: a, steps: 4, trainable: [vision]}", "{name: b, steps: 4, trainable: [student]}")])
    renamed = load_config(TINY, [stages_override("{name: a, steps: 4, trainable: [vision]}", "{name: c, steps: 4, trainable: [student]}")])
    assert plain.distill.stages == [] and [s.name for s in staged.distill.stages] == ["a", "b"]
    prints = {run_fingerprint(cfg, CLIP_ONLY, True, "t") for cfg in (plain, staged, renamed)}
    assert len(prints) == 3  # a checkpoint of a run with other stages is refused as another run's


def student_and_objective(tokenizer, losses=CLIP_ONLY):
    """The seeded one-head tiny student and a seeded objective of `losses` (against a 32-d teacher)."""
    student = build_clip(config_for(ONE_HEAD_STUDENT, tokenizer), seed=1).train()
    torch.manual_seed(2)
    return student, build_objective(losses, LossContext(16, 32, ONE_HEAD_STUDENT))


def test_selectors_resolve_through_the_models_groups_and_an_unknown_one_lists_the_known(tokenizer) -> None:
    student, objective = student_and_objective(tokenizer, FEATURE)
    optim = OptimConfig(steps=4, batch_size=8, warmup_steps=1)
    configs = [StageConfig("one", 1, trainable=["text.layers.0", "objective"]), StageConfig("two", 3, trainable=["student"])]
    one, two = plan_stages(configs, optim, student, objective)
    layer = {f"student.{n}" for n, _ in student.named_parameters() if n.startswith("model.text_model.encoder.layers.0.")}
    projection = {f"objective.{n}" for n, _ in objective.named_parameters()}
    assert projection and one.trainable == layer | projection and len(layer) == 16
    assert two.trainable == {f"student.{n}" for n, _ in student.named_parameters()}
    assert (one.start, one.end, one.warmup_steps, one.lr) == (0, 1, 1, optim.lr)  # the first stage warms up as distill.train
    assert (two.start, two.end, two.warmup_steps) == (1, 4, 0)  # later stages do not, unless told
    bad = [StageConfig("one", 4, trainable=["student", "vision.layers.3"])]
    with pytest.raises(ValueError, match=r"^distill.stages\[0\].trainable\[1\]: CLIPDualEncoder has no parameter group "
                                         r"'vision.layers.3'; known: student, objective, prompts, projector, vision, "
                                         r"vision.layers.0, text, text.layers.0$"):
        plan_stages(bad, optim, student, objective)
    with pytest.raises(ValueError, match=r"distill.stages\[0\].trainable\[0\]: 'prompts' selects the student's prompts.\* "
                                         r"parameters, but this CLIPDualEncoder has none"):
        plan_stages([StageConfig("one", 4, trainable=["prompts"])], optim, student, objective)
    with pytest.raises(ValueError, match=r"distill.stages\[0\].trainable \(objective\) selects no parameters"):
        plan_stages([StageConfig("one", 4, trainable=["objective"])], optim, *student_and_objective(tokenizer))


@pytest.fixture(scope="module")
def micro_batches(tokenizer):
    """STEPS seeded training batches of 8 real pairs."""
    tokenize = make_tokenize(tokenizer, TEXT_LENGTH)
    found = []
    for seed in range(STEPS):
        data = make_split("train", 8, seed=seed, image_size=IMAGE_SIZE)
        found.append({"pixel_values": to_pixel_values(data.images), **tokenize(data.captions)})
    return found


def staged_run(tokenizer, micro_batches, folder, *, resume=None, stages=STAGES, fingerprint="staged"):
    """Train the seeded student with `stages` over the batches (from the resume step on), checkpointing every
    step to `folder`, logging every step to `folder`/log.jsonl: the student, its objective and the result."""
    student, objective = student_and_objective(tokenizer)
    optim = OptimConfig(steps=STEPS, batch_size=8, lr=5e-3, warmup_steps=0, log_every=1, grad_clip=None)
    resolved = plan_stages(stages, optim, student, objective)
    start = resume.step if resume is not None else 0
    result = train(
        student, objective, micro_batches[start:], optim, progress=False, resume=resume, stages=resolved,
        checkpointer=Checkpointer(folder / "checkpoints", every=1, keep=STEPS, fingerprint=fingerprint),
        log_path=folder / "log.jsonl",
    )
    return student, result


@pytest.fixture(scope="module")
def straight(tokenizer, micro_batches, tmp_path_factory):
    """An uninterrupted two-stage run: its folder, the seeded initial student and the trained one."""
    folder = tmp_path_factory.mktemp("straight")
    initial, _ = student_and_objective(tokenizer)
    student, result = staged_run(tokenizer, micro_batches, folder)
    return {"folder": folder, "initial": initial.state_dict(), "final": student.state_dict(), "result": result}


def test_stage_one_trains_only_the_vision_tower_and_holds_optimizer_state_for_it_only(straight) -> None:
    checkpoints = straight["folder"] / "checkpoints"
    after_one = load_checkpoint(checkpoints / "checkpoint-00000002", "staged")
    initial, final = straight["initial"], straight["final"]
    vision = [n for n in initial if n.startswith(("model.vision_model.", "model.visual_projection."))]
    text = [n for n in initial if n.startswith(("model.text_model.", "model.text_projection."))]
    assert len(vision) == 24 and len(text) == 21
    weights = {name.removeprefix("student."): value for name, value in after_one.weights.items()}
    assert all(torch.equal(weights[n], initial[n]) for n in text)  # frozen: bit-identical after stage 1
    assert torch.equal(weights["model.logit_scale"], initial["model.logit_scale"])  # in no tower: frozen too
    assert all(not torch.equal(weights[n], initial[n]) for n in vision)
    assert all(not torch.equal(final[n], weights[n]) for n in text)  # stage 2 trains them
    # Stage 1's optimizer holds exactly the vision tower's parameters, each with Adam state.
    groups = after_one.optimizer["param_groups"]
    assert sum(len(g["params"]) for g in groups) == len(vision) == len(after_one.optimizer["state"])
    assert after_one.stage == {"index": 0, "name": "vision", "start": 0, "steps": 2}
    after_three = load_checkpoint(checkpoints / "checkpoint-00000003", "staged")
    assert after_three.stage == {"index": 1, "name": "joint", "start": 2, "steps": 3}
    assert len(after_three.optimizer["state"]) == len(initial)  # stage 2 trains every student parameter


def test_each_stage_logs_its_name_and_its_own_learning_rate(straight) -> None:
    records = [json.loads(line) for line in (straight["folder"] / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["vision", "vision", "joint", "joint", "joint"]
    # The lr after each step's scheduler step: stage 1 cosine over 2 steps from 1e-3 (no warmup); stage 2 one
    # warmup step to 1e-4, then cosine over its 2 remaining steps.
    expected = [0.5e-3, 0.0, 1e-4, 0.5e-4, 0.0]
    assert [r["lr"] for r in records] == pytest.approx(expected, abs=1e-12)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] == [r["step"] for r in straight["result"].history]


@pytest.mark.parametrize("step", [2, 3], ids=["at-stage-1-end", "inside-stage-2"])
def test_resume_inside_or_between_stages_matches_an_uninterrupted_run(tokenizer, micro_batches, straight, tmp_path, step):
    state = load_checkpoint(straight["folder"] / "checkpoints" / f"checkpoint-{step:08d}", "staged")
    student, result = staged_run(tokenizer, micro_batches, tmp_path, resume=state)
    assert [r["step"] for r in result.history] == list(range(step + 1, STEPS + 1))
    resumed = student.state_dict()
    assert all(torch.equal(resumed[name], value) for name, value in straight["final"].items())
    assert all(p.requires_grad for p in student.parameters())  # the flags are restored after the run


def test_a_checkpoint_of_other_stages_is_refused(tokenizer, micro_batches, straight, tmp_path) -> None:
    state = load_checkpoint(straight["folder"] / "checkpoints" / "checkpoint-00000003", "staged")
    other = [StageConfig("vision", 3, lr=1e-3, trainable=["vision"]), StageConfig("joint", 2, trainable=["student"])]
    message = "written in stage 1 (joint, steps 3-5), but this run's step 4 is in stage 1 (joint, steps 4-5)"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        staged_run(tokenizer, micro_batches, tmp_path, resume=state, stages=other)


def distill_args(out, teacher, stages: str) -> list[str]:
    return ["distill", TINY, "--out", str(out), "--no-eval", "--set", f"teacher.path={teacher}",
            "--set", "distill.train.log_every=1", "--set", "distill.train.steps=4", "--set", stages]


def test_distill_trains_in_stages_and_logs_them(pretrained_teacher, tmp_path) -> None:
    two = stages_override("{name: towers, steps: 2, lr: 0.005, trainable: [vision.layers.0, text]}",
                          "{name: all, steps: 2, warmup_steps: 1, trainable: [student, objective]}")
    assert main(distill_args(tmp_path / "run", pretrained_teacher, two)) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "logs" / "distill.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["towers"] * 2 + ["all"] * 2
    # Stage 1 warms up over distill.train.warmup_steps (2) to its own lr; stage 2 over its 1 step to distill.train.lr.
    assert [r["lr"] for r in records] == pytest.approx([0.0025, 0.005, 0.002, 0.0], abs=1e-12)


def test_distill_names_a_selector_the_student_lacks(pretrained_teacher, tmp_path, capsys) -> None:
    bad = stages_override("{name: towers, steps: 4, trainable: [vision, decoder]}")
    assert main(distill_args(tmp_path / "run", pretrained_teacher, bad)) == 2
    err = capsys.readouterr().err
    assert "distill.stages[0].trainable[1]: CLIPDualEncoder has no parameter group 'decoder'; known: student" in err
