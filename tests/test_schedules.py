"""Tests for vldistill.losses.schedules and its wiring: schedule kinds against hand-worked values, validation
naming the key, scheduled weights and temperatures in the objective, gap and uncertainty weighting,
and a tiny training run that logs every weight and temperature."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from helpers import TEXT_LENGTH, build_clip, config_for, model_inputs, random_output, seeded

from vldistill.config import ConfigError, OptimConfig, load_config
from vldistill.data.bundle import in_memory_bundle
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.data.tokenizer import make_tokenize
from vldistill.data.synthetic import make_split
from vldistill.data.transforms import to_pixel_values
from vldistill.losses import LossContext, build_objective
from vldistill.models import DualEncoderSpec, TowerSpec
from vldistill.models.signals import Signals
from vldistill.losses.schedules import (
    Schedule,
    WeightingConfig,
    gap_weights,
    parse_schedule,
    schedule_value,
    training_progress,
)
from vldistill.train.loop import train
from vldistill.train.runs import held_out_batch

B, DIM = 6, 8
SQRT2 = math.sqrt(2.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors run far faster on one intra-op thread when the shared cores are busy (contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def outputs(dim: int = DIM, scale: float = 10.0, seed: int = 0) -> Signals:
    """float64 outputs with random unit rows, deterministic in `seed`."""
    return random_output(B, dim, scale, dtype=torch.float64, generator=seeded(seed))


def value_of(losses: dict, student: Signals, teacher: Signals, **kwargs) -> float:
    """The total of a fresh (fixed-weight) objective for `losses`, in float64."""
    return build_objective(losses, LossContext(DIM, DIM), **kwargs).double()(student, teacher)[0].item()


# ---------------------------------------------------------------- schedule kinds


@pytest.mark.parametrize(
    ("spec", "expected"),  # over 11 steps, so step s is at progress s / 10
    [
        (2.5, {0: 2.5, 5: 2.5, 10: 2.5}),
        ({"kind": "constant", "value": 3.0}, {0: 3.0, 4: 3.0, 10: 3.0}),
        ({"kind": "linear", "start": 0.0, "end": 2.0}, {0: 0.0, 3: 0.6, 5: 1.0, 10: 2.0}),
        ({"kind": "linear", "start": 5.0, "end": 1.0}, {0: 5.0, 5: 3.0, 10: 1.0}),
        ({"kind": "cosine", "start": 5.0, "end": 1.0}, {0: 5.0, 5: 3.0, 10: 1.0}),
        (
            {"kind": "step", "start": 1.0, "gamma": 0.1, "milestones": [0.5, 0.8]},
            {0: 1.0, 4: 1.0, 5: 0.1, 7: 0.1, 8: 0.01, 10: 0.01},
        ),
    ],
)
def test_schedule_kinds_match_hand_worked_values(spec, expected: dict[int, float]) -> None:
    for step, value in expected.items():
        assert schedule_value(spec, step, 11) == pytest.approx(value, rel=1e-12, abs=1e-15), step


def test_schedule_ends_are_exact_and_cosine_follows_the_half_cosine() -> None:
    cosine = {"kind": "cosine", "start": 5.0, "end": 1.0}
    # Over 5 steps: progress 0, 1/4, 1/2, 3/4, 1; w = (1 - cos(pi p)) / 2, value = 5 - 4 w.
    hand = [5.0, 3.0 + SQRT2, 3.0, 3.0 - SQRT2, 1.0]
    assert [schedule_value(cosine, s, 5) for s in range(5)] == pytest.approx(hand, rel=1e-12)
    for kind in ("linear", "cosine"):
        spec = {"kind": kind, "start": 0.1, "end": 0.7}
        assert schedule_value(spec, 0, 7) == 0.1 and schedule_value(spec, 6, 7) == 0.7  # exactly
    assert schedule_value(cosine, 0, 1) == 5.0  # a single step is the start
    assert schedule_value(cosine, 9, 5) == 1.0  # past the end stays at the end
    assert schedule_value(Schedule(kind="linear", start=1.0, end=3.0), 1, 3) == 2.0  # a parsed Schedule works too


def test_training_progress() -> None:
    assert [training_progress(s, 5) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert training_progress(0, 1) == 0.0
    with pytest.raises(ValueError, match="total_steps"):
        training_progress(0, 0)
    with pytest.raises(ValueError, match="step"):
        training_progress(-1, 5)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"start": 0.0, "end": 1.0}, "w.kind must be one of constant, linear, cosine, step; it is missing"),
        ({"kind": "exponential", "start": 1.0}, "w.kind must be one of constant, linear, cosine, step; got 'exponential'"),
        ({"kind": "linear", "start": 0.0}, "w.end is required by kind linear (it takes start, end)"),
        ({"kind": "constant", "value": 1.0, "start": 0.0}, "w.start is not used by kind constant (it takes value)"),
        ({"kind": "cosine", "value": 1.0, "start": 0.0, "end": 1.0}, "w.value is not used by kind cosine"),
        ({"kind": "step", "start": 1.0, "milestones": [0.5]}, "w.gamma is required by kind step"),
        ({"kind": "step", "start": 1.0, "gamma": 0.0, "milestones": [0.5]}, "w.gamma must be > 0"),
        ({"kind": "step", "start": 1.0, "gamma": 0.5, "milestones": []}, "w.milestones must be a non-empty increasing"),
        ({"kind": "step", "start": 1.0, "gamma": 0.5, "milestones": [0.5, 0.5]}, "w.milestones must be"),
        ({"kind": "step", "start": 1.0, "gamma": 0.5, "milestones": [0.8, 0.2]}, "w.milestones must be"),
        ({"kind": "step", "start": 1.0, "gamma": 0.5, "milestones": [1.0]}, "w.milestones must be"),
        ({"kind": "step", "start": 1.0, "gamma": 0.5, "milestones": [0.0, 0.5]}, "w.milestones must be"),
        ({"kind": "linear", "start": -1.0, "end": 1.0}, "w.start must be a finite number >= 0, got -1.0"),
        ({"kind": "linear", "start": math.inf, "end": 1.0}, "w.start must be a finite number"),
        ({"kind": "linear", "start": "a", "end": 1.0}, "w.start must be float"),
        ({"kind": "linear", "start": True, "end": 1.0}, "w.start must be float"),
        ({"kind": "linear", "start": 0.0, "end": 1.0, "stop": 2.0}, "unknown config key 'w.stop'"),
        ("hot", "w must be a number or a schedule mapping"),
        (True, "w must be a number or a schedule mapping"),
        (-1, "w must be a finite number >= 0"),
    ],
)
def test_schedule_errors_name_the_key(spec, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_schedule(spec, "w")


def test_positive_schedules_refuse_zero() -> None:
    with pytest.raises(ValueError, match=re.escape("t.end must be a finite number > 0, got 0.0")):
        parse_schedule({"kind": "cosine", "start": 5.0, "end": 0.0}, "t", positive=True)
    assert parse_schedule({"kind": "linear", "start": 0.0, "end": 1.0}, "w").at(0.5) == 0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.losses.kd.temperature={kind: cosine, start: 5, end: 0}",
         r"distill\.losses\.kd\.temperature\.end must be a finite number > 0"),
        ("distill.losses.kd.temperature={kind: linear, start: 5}", r"distill\.losses\.kd\.temperature\.end is required"),
        ("distill.losses.kd.weight={kind: linear, start: 0}", r"distill\.losses\.kd\.weight\.end is required by kind linear"),
        ("distill.losses.kd.weight={kind: step, start: 1, gamma: 0.5, milestones: [1.5]}",
         r"distill\.losses\.kd\.weight\.milestones must be"),
        ("distill.losses.kd.weight={kind: linear, start: -1, end: 1}", r"distill\.losses\.kd\.weight\.start must be"),
        ("distill.losses.clip.temperature={kind: constant, value: 1}", r"unknown config key distill\.losses\.clip\.temperature"),
        ("distill.weighting.kind=dwa", r"distill\.weighting\.kind must be one of fixed, gap, uncertainty, got 'dwa'"),
        ("distill.weighting.every=0", r"distill\.weighting\.every must be >= 1, got 0"),
        ("distill.weighting.evry=5", r"unknown config key 'distill\.weighting\.evry'"),
    ],
)
def test_config_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_accepts_schedules_and_weighting(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "distill:\n  losses:\n    clip: {weight: 1.0}\n"
        "    kd: {weight: {kind: linear, start: 0.0, end: 1.0}, temperature: {kind: cosine, start: 5.0, end: 1.0}}\n"
        "  weighting: {kind: gap, every: 10}\n"
    )
    cfg = load_config(path)
    assert cfg.distill.losses["kd"]["temperature"] == {"kind": "cosine", "start": 5.0, "end": 1.0}
    assert cfg.distill.weighting == WeightingConfig(kind="gap", every=10)
    assert load_config(None).distill.weighting == WeightingConfig(kind="fixed", every=50)
    path.write_text("distill:\n  losses: {clip: {weight: 1.0}}\n  weighting: {kind: gap}\n")
    with pytest.raises(ConfigError, match=r"distill\.weighting\.kind is gap, but no loss in distill\.losses uses the teacher"):
        load_config(path)


# ---------------------------------------------------------------- scheduled weights and temperatures


def test_objective_applies_a_linear_weight_schedule() -> None:
    losses = {"clip": {"weight": 0.5}, "kd": {"weight": {"kind": "linear", "start": 0.0, "end": 2.0}, "temperature": 2.0}}
    objective = build_objective(losses, LossContext(DIM, DIM)).double()
    student, teacher = outputs(seed=1), outputs(seed=2)
    clip = value_of({"clip": {}}, student, teacher)
    kd = value_of({"kd": {"temperature": 2.0}}, student, teacher)
    assert objective.weights == {"clip": 0.5, "kd": 0.0}  # before any progress: the start
    for step, kd_weight in enumerate([0.0, 0.5, 1.0, 1.5, 2.0]):  # 2 * step / 4 over 5 steps
        objective.set_progress(step, 5)
        total, parts = objective(student, teacher)
        assert total.item() == pytest.approx(0.5 * clip + kd_weight * kd, rel=1e-12)
        assert parts["loss/kd"].item() == pytest.approx(kd, rel=1e-12)
        assert objective.settings() == {"weight/clip": 0.5, "weight/kd": kd_weight, "temperature/kd": 2.0}


@pytest.mark.parametrize("name", ["kd", "affinity", "crd"])
def test_scheduled_temperature_gives_the_loss_at_that_temperature(name: str) -> None:
    objective = build_objective({name: {"temperature": {"kind": "cosine", "start": 5.0, "end": 1.0}}}, LossContext(DIM, DIM))
    objective.double()
    student, teacher = outputs(seed=3), outputs(seed=4)
    for step, hand in enumerate([5.0, 3.0 + SQRT2, 3.0, 3.0 - SQRT2, 1.0]):
        objective.set_progress(step, 5)
        temperature = objective.settings()[f"temperature/{name}"]
        assert temperature == pytest.approx(hand, rel=1e-12)
        direct = value_of({name: {"temperature": temperature}}, student, teacher)
        assert objective(student, teacher)[0].item() == direct
    assert objective.losses[name].params.temperature == 5.0  # the configured params are left alone


def test_plain_temperature_is_logged_and_unscheduled_losses_have_none() -> None:
    objective = build_objective({"clip": {}, "kd": {"temperature": 2.0}, "feature": {}}, LossContext(DIM, DIM))
    objective.set_progress(3, 4)
    assert objective.settings() == {"weight/clip": 1.0, "weight/kd": 1.0, "temperature/kd": 2.0, "weight/feature": 1.0}
    assert objective.temperature_schedules == {} and objective.losses["clip"].temperature is None
    assert objective.weight_schedules["kd"] == Schedule(kind="constant", value=1.0)


# ---------------------------------------------------------------- uncertainty weighting


def test_uncertainty_weighting_matches_the_formula_and_trains_its_log_variances() -> None:
    objective = build_objective(
        {"clip": {}, "kd": {"weight": 2.0, "temperature": 2.0}}, LossContext(DIM, DIM),
        weighting=WeightingConfig(kind="uncertainty"),
    ).double()
    assert {name for name, _ in objective.named_parameters()} == {"log_variances.clip", "log_variances.kd"}
    s = {"clip": 0.3, "kd": -0.5}
    with torch.no_grad():
        for name, value in s.items():
            objective.log_variances[name].fill_(value)
    student, teacher = outputs(seed=5), outputs(seed=6)
    clip = value_of({"clip": {}}, student, teacher)
    kd = value_of({"kd": {"temperature": 2.0}}, student, teacher)

    total, _ = objective(student, teacher)
    expected = (math.exp(-0.3) * clip + 0.3) + 2.0 * (math.exp(0.5) * kd - 0.5)
    assert total.item() == pytest.approx(expected, rel=1e-12)
    total.backward()  # d/ds [w (exp(-s) L + s)] = w (1 - exp(-s) L)
    assert objective.log_variances["clip"].grad.item() == pytest.approx(1 - math.exp(-0.3) * clip, rel=1e-12)
    assert objective.log_variances["kd"].grad.item() == pytest.approx(2.0 * (1 - math.exp(0.5) * kd), rel=1e-12)
    settings = objective.settings()
    assert settings["weight/kd"] == pytest.approx(2.0 * math.exp(0.5), rel=1e-12)
    assert settings["log_variance/clip"] == pytest.approx(0.3) and settings["temperature/kd"] == 2.0


# ---------------------------------------------------------------- gap weighting


def test_gap_weights_hand_worked() -> None:
    weights = {"clip": 1.0, "kd": 2.0, "crd": 1.0}
    # w r = (2, 0.25), sum w = 3, sum w r = 2.25: kd = 2 * 3 / 2.25, crd = 0.25 * 3 / 2.25.
    assert gap_weights(weights, {"kd": 1.0, "crd": 0.25}) == pytest.approx({"clip": 1.0, "kd": 8 / 3, "crd": 1 / 3})
    assert gap_weights(weights, {"kd": 0.5, "crd": 1.0}) == pytest.approx({"clip": 1.0, "kd": 1.5, "crd": 1.5})
    assert gap_weights(weights, {"kd": 0.7, "crd": 0.7}) == pytest.approx(weights)  # equal ratios: unchanged
    assert gap_weights(weights, {"kd": 0.0, "crd": 0.0}) == weights  # nothing left to balance


def gap_objective():
    losses = {"clip": {}, "kd": {"weight": 2.0, "temperature": 2.0}, "crd": {"weight": 1.0}}
    return build_objective(losses, LossContext(DIM, DIM), weighting=WeightingConfig(kind="gap", every=2)).double()


def test_gap_weighting_gives_all_weight_to_the_loss_with_a_gap_left() -> None:
    """The student ends with the teacher's embeddings but a different logit scale: crd (cosine relations)
    reaches 0, so r_crd = 0 and kd gets the whole distillation budget 2 + 1 = 3; clip is untouched."""
    objective = gap_objective()
    teacher = outputs(scale=20.0, seed=7)
    objective.refresh_gap(outputs(seed=8), teacher)
    assert objective.weights == {"clip": 1.0, "kd": 2.0, "crd": 1.0}  # the reference: ratios 1
    closer = Signals(image_embeds=teacher.image_embeds, text_embeds=teacher.text_embeds, logit_scale=torch.tensor(10.0, dtype=torch.float64))
    objective.refresh_gap(closer, teacher)
    assert objective.gap_ratios["crd"] == 0.0 and objective.gap_ratios["kd"] > 0
    assert objective.weights == pytest.approx({"clip": 1.0, "kd": 3.0, "crd": 0.0}, rel=1e-12)


def test_gap_weighting_follows_the_loss_ratios() -> None:
    objective = gap_objective()
    start, later, teacher = outputs(seed=9), outputs(seed=10), outputs(seed=11)
    objective.refresh_gap(start, teacher)
    objective.refresh_gap(later, teacher)
    values = {
        name: [value_of({name: options}, s, teacher) for s in (start, later)]
        for name, options in (("kd", {"temperature": 2.0}), ("crd", {}))
    }
    r_kd, r_crd = (values[name][1] / values[name][0] for name in ("kd", "crd"))
    assert objective.gap_ratios == pytest.approx({"kd": r_kd, "crd": r_crd}, rel=1e-12)
    a_kd, a_crd = 2 * r_kd * 3 / (2 * r_kd + r_crd), r_crd * 3 / (2 * r_kd + r_crd)
    assert objective.weights == pytest.approx({"clip": 1.0, "kd": a_kd, "crd": a_crd}, rel=1e-12)
    clip = value_of({"clip": {}}, later, teacher)
    expected = clip + a_kd * values["kd"][1] + a_crd * values["crd"][1]
    assert objective(later, teacher)[0].item() == pytest.approx(expected, rel=1e-12)
    assert objective.settings()["gap_ratio/kd"] == pytest.approx(r_kd, rel=1e-12)


def test_gap_state_is_saved_and_restored() -> None:
    """A resumed run keeps its reference losses: after loading, a refresh gives the original run's ratios."""
    start, later, teacher = outputs(seed=9), outputs(seed=10), outputs(seed=11)
    original = gap_objective()
    original.refresh_gap(start, teacher)
    resumed = gap_objective()
    resumed.load_weighting_state(original.weighting_state())
    assert resumed.gap_reference == original.gap_reference and resumed.gap_ratios == original.gap_ratios
    original.refresh_gap(later, teacher)
    resumed.refresh_gap(later, teacher)
    assert resumed.gap_ratios == original.gap_ratios and resumed.gap_ratios["kd"] != 1.0
    other = build_objective({"clip": {}, "kd": {}}, LossContext(DIM, DIM), weighting=WeightingConfig(kind="gap")).double()
    with pytest.raises(ValueError, match="another configuration"):
        other.load_weighting_state(original.weighting_state())


def test_gap_refreshes_every_n_steps_and_only_for_gap() -> None:
    objective = gap_objective()
    assert objective.needs_held_out and [objective.gap_due(s) for s in range(5)] == [True, False, True, False, True]
    fixed = build_objective({"kd": {}}, LossContext(DIM, DIM))
    assert not fixed.needs_held_out and not fixed.gap_due(0)
    only_task = build_objective({"clip": {}}, LossContext(DIM), weighting=WeightingConfig(kind="gap"))
    assert not only_task.needs_held_out


# ---------------------------------------------------------------- training


STUDENT_SPEC = DualEncoderSpec(
    vision=TowerSpec(layers=1, width=16, heads=1, patch_size=8), text=TowerSpec(layers=1, width=16, heads=1),
    projection_dim=16,
)
OPTIM = OptimConfig(steps=3, batch_size=6, lr=1e-3, warmup_steps=0, log_every=1)


def train_batches(make_batch, steps: int) -> list[dict[str, torch.Tensor]]:
    return [model_inputs(make_batch(6, split="train", seed=i)) for i in range(steps)]


def test_training_logs_scheduled_and_gap_weights_and_temperatures(tokenizer, teacher, make_batch, tmp_path) -> None:
    losses = {
        "clip": {},
        "kd": {"weight": {"kind": "linear", "start": 0.0, "end": 1.0}, "temperature": {"kind": "cosine", "start": 4.0, "end": 1.0}},
        "crd": {"weight": 1.0},
    }
    objective = build_objective(losses, LossContext(16, 32), weighting=WeightingConfig(kind="gap", every=2))
    student = build_clip(config_for(STUDENT_SPEC, tokenizer), seed=1)
    with pytest.raises(ValueError, match="held_out_batch"):
        train(student, objective, train_batches(make_batch, 3), OPTIM, teacher=teacher)
    held_out = model_inputs(make_batch(6, split="val"))
    log = tmp_path / "log.jsonl"
    result = train(
        student, objective, train_batches(make_batch, 3), OPTIM, teacher=teacher, log_path=log, held_out_batch=held_out
    )
    history = result.history
    assert [r["step"] for r in history] == [1, 2, 3]
    assert [json.loads(line) for line in log.read_text().splitlines()] == history
    # Step k ran at progress (k - 1) / 2: kd temperature 4 -> 1 along the half cosine, kd weight 0 -> 1.
    assert [r["temperature/kd"] for r in history] == pytest.approx([4.0, 2.5, 1.0], rel=1e-12)
    assert [r["temperature/crd"] for r in history] == [0.1, 0.1, 0.1]
    assert [r["weight/clip"] for r in history] == [1.0, 1.0, 1.0]
    # Gap ratios are 1 until the refresh before the third step; the distillation budget is 1 + kd's schedule.
    assert [(r["gap_ratio/kd"], r["gap_ratio/crd"]) for r in history[:2]] == [(1.0, 1.0), (1.0, 1.0)]
    assert [(r["weight/kd"], r["weight/crd"]) for r in history[:2]] == [(0.0, 1.0), (0.5, 1.0)]
    last = history[2]
    r_kd, r_crd = last["gap_ratio/kd"], last["gap_ratio/crd"]
    assert r_kd != 1.0 and r_crd != 1.0
    assert last["weight/kd"] == pytest.approx(r_kd * 2 / (r_kd + r_crd), rel=1e-6)
    assert last["weight/crd"] == pytest.approx(r_crd * 2 / (r_kd + r_crd), rel=1e-6)


def test_training_learns_uncertainty_log_variances(tokenizer, teacher, make_batch) -> None:
    objective = build_objective(
        {"clip": {}, "kd": {"temperature": 2.0}}, LossContext(16, 32), weighting=WeightingConfig(kind="uncertainty")
    )
    student = build_clip(config_for(STUDENT_SPEC, tokenizer), seed=1)
    history = train(student, objective, train_batches(make_batch, 3), OPTIM, teacher=teacher).history
    learned = {name: p.item() for name, p in objective.log_variances.items()}
    assert all(value != 0.0 for value in learned.values())
    # Each record holds what weighted that step's loss, i.e. before that step's update.
    assert history[0]["log_variance/kd"] == 0.0 and history[0]["weight/kd"] == 1.0
    assert history[-1]["log_variance/kd"] not in (0.0, learned["kd"])
    assert history[-1]["weight/kd"] == pytest.approx(math.exp(-history[-1]["log_variance/kd"]), rel=1e-12)
    assert history[0]["weight/clip"] == 1.0 and history[0]["temperature/kd"] == 2.0


def test_held_out_batch_comes_from_val_when_present(tokenizer) -> None:
    splits = {split: make_split(split, n, image_size=16) for split, n in (("train", 12), ("val", 5), ("test", 4))}
    data = in_memory_bundle(splits["train"], splits["test"], val=splits["val"])
    pixels = lambda split: [row for row in to_pixel_values(splits[split].images)]  # noqa: E731

    def drawn_from(batch, split: str) -> bool:
        return all(any(torch.equal(row, image) for image in pixels(split)) for row in batch["pixel_values"])

    preprocess = BatchPreprocessor(make_tokenize(tokenizer, TEXT_LENGTH))
    batch = held_out_batch(data, preprocess, 4, seed=0)
    assert batch["pixel_values"].shape[0] == 4 and drawn_from(batch, "val")
    again = held_out_batch(data, preprocess, 4, seed=0)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert held_out_batch(data, preprocess, 100, seed=0)["pixel_values"].shape[0] == 5
    data.val = None
    assert drawn_from(held_out_batch(data, preprocess, 4, seed=0), "train")


def test_describe_schedule_for_model_cards() -> None:
    from vldistill.losses.schedules import describe_schedule

    assert describe_schedule(2.0) == "2"
    assert describe_schedule({"kind": "cosine", "start": 5.0, "end": 1.0}) == "cosine 5 -> 1"
    assert describe_schedule({"kind": "constant", "value": 0.5}) == "0.5"
    assert describe_schedule({"kind": "step", "start": 1.0, "gamma": 0.5, "milestones": [0.5]}) == "step 1 x0.5 at [0.5]"
