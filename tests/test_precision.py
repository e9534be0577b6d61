"""bf16: chosen per the config and the hardware; training under autocast stays close to fp32; bf16 teachers
(`teacher.precision: bf16`) hand float32 signals close to the fp32 teachers' to the losses and build a cache
that says so; a bf16 run on the CPU logs what the bf16 probe measured."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers import batches, build_clip, config_for, student_and_objective, teacher_spec

import vldistill.precision as precision
from vldistill.config import ConfigError, OptimConfig, load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.losses.base import EMBEDDINGS, HIDDEN_STATES
from vldistill.precision import Bf16Probe, native_bf16_cpu, probe_cpu_bf16, training_autocast
from vldistill.teachers.cache import CacheMismatchError, CacheReader
from vldistill.teachers.cache.build import build_cache
from vldistill.teachers.cache.meta import cache_meta
from vldistill.teachers.ensemble import TeacherEnsemble
from vldistill.train.loop import train, uses_bf16
from vldistill.train.runs import obtain_teacher

LOSSES = {"clip": {}, "kd": {"temperature": 2.0}, "feature": {}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU choices")
def test_precision_choice_on_a_cpu():
    assert not uses_bf16("fp32") and uses_bf16("bf16")
    assert not uses_bf16("auto")  # on a CPU bf16 measured slower than fp32


def one_step_losses(tokenizer, optim: OptimConfig, teachers: dict, steps: int = 1) -> dict[str, list[float]]:
    """The logged total losses of `steps` steps of the seeded small student against each of `teachers`."""
    data = [batches(tokenizer, 8, parts=1, seed=s)[0] for s in range(steps)]
    losses = {}
    for name, teacher in teachers.items():
        module = student_and_objective(tokenizer, LOSSES)
        losses[name] = [r["loss/total"] for r in train(module.student, module.objective, data, optim, teacher=teacher).history]
    return losses


def test_bf16_autocast_trains_close_to_fp32(tokenizer):
    teacher = build_clip(config_for(teacher_spec(), tokenizer), seed=10)
    losses = {}
    for name in ("fp32", "bf16"):
        optim = OptimConfig(steps=3, batch_size=8, warmup_steps=0, log_every=1, precision=name)
        losses[name] = one_step_losses(tokenizer, optim, {name: teacher}, steps=3)[name]
    assert losses["bf16"] != losses["fp32"]  # autocast was on: bfloat16 products round differently
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_bf16_teachers_hand_float32_signals_close_to_fp32(tokenizer):
    teacher = build_clip(config_for(teacher_spec(), tokenizer), seed=10)
    batch = batches(tokenizer, 16, parts=1, seed=0)[0]
    needs = EMBEDDINGS | HIDDEN_STATES
    fp32 = TeacherEnsemble([teacher])(batch, needs)
    bf16_ensemble = TeacherEnsemble([teacher], precision="bf16")
    bf16 = bf16_ensemble(batch, needs)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())  # the ensemble cast a copy
    assert bf16_ensemble.teachers[0].model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert set(bf16) == set(fp32)
    for name in ("image_embeds", "text_embeds"):
        assert bf16[name].dtype == torch.float32
        difference = float((bf16[name] - fp32[name]).abs().max())
        # Measured on unit-norm embeddings over 5 seeds: 2.7e-3 to 6.4e-3.
        assert 0 < difference < 1.5e-2
    for name in ("image_hidden_states", "text_hidden_states"):
        assert all(layer.dtype == torch.float32 for layer in bf16[name])
        difference = max(float((b - f).abs().max()) for b, f in zip(bf16[name], fp32[name]))
        assert 0 < difference < 0.1  # measured 1.9e-2 to 4.7e-2 over 5 seeds
    assert float(bf16.logit_scale) == float(fp32.logit_scale)  # kept exact: the temperature is not rounded
    assert torch.equal(bf16.text_attention_mask, fp32.text_attention_mask)


def test_one_step_loss_with_a_bf16_teacher_is_close_to_fp32(tokenizer):
    teacher = build_clip(config_for(teacher_spec(), tokenizer), seed=10)
    optim = OptimConfig(steps=1, batch_size=8, warmup_steps=0, log_every=1)
    teachers = {name: TeacherEnsemble([teacher], precision=name) for name in ("fp32", "bf16")}
    losses = one_step_losses(tokenizer, optim, teachers)
    relative = abs(losses["bf16"][0] - losses["fp32"][0]) / losses["fp32"][0]
    assert 0 < relative < 1e-2  # measured 2e-5 to 2.4e-3 over 5 seeds (batches of 16)


def test_teacher_precision_is_configured_and_validated():
    assert load_config(None).teacher.precision == "fp32"
    assert load_config(None, ["teacher.precision=bf16"]).teacher.precision == "bf16"
    with pytest.raises(ConfigError, match=r"teacher\.precision must be one of fp32, bf16, got 'fp16'"):
        load_config(None, ["teacher.precision=fp16"])
    with pytest.raises(ValueError, match="unknown teacher precision 'int8'; known: fp32, bf16"):
        TeacherEnsemble([torch.nn.Linear(1, 1)], precision="int8")


def test_the_real_probe_times_both_precisions():
    probe = probe_cpu_bf16(training=True)
    assert probe.fp32_ms > 0 and probe.bf16_ms > 0 and "forward and backward" in probe.what
    if not native_bf16_cpu():  # bf16 products are emulated: several times slower (measured 3-5x here)
        assert probe.slowdown > 1


def probe_records(caplog) -> list[logging.LogRecord]:
    """What vldistill.precision logged."""
    return [r for r in caplog.records if r.name == "vldistill.precision"]


@pytest.fixture
def fixed_probe(monkeypatch):
    """Make the probe report `probe.value` (bf16 2.5x slower unless a test sets another) and count its calls."""

    def fake(training: bool) -> Bf16Probe:
        fake.calls.append(training)
        return fake.value

    fake.calls, fake.value = [], Bf16Probe(10.0, 25.0, "a fake probe")
    monkeypatch.setattr(precision, "probe_cpu_bf16", fake)
    return fake


def test_a_bf16_run_on_the_cpu_warns_with_the_measured_slowdown(tokenizer, fixed_probe, caplog):
    teacher = build_clip(config_for(teacher_spec(), tokenizer), seed=10)
    optim = OptimConfig(steps=1, batch_size=8, warmup_steps=0, log_every=1, precision="bf16")
    with caplog.at_level(logging.INFO, logger="vldistill.precision"):
        one_step_losses(tokenizer, optim, {"bf16": TeacherEnsemble([teacher], precision="bf16")})
    warnings = [r.getMessage() for r in probe_records(caplog) if r.levelno == logging.WARNING]
    assert fixed_probe.calls == [True, False]  # the student's training probe, then the teachers' inference one
    assert len(warnings) == 2
    assert warnings[0].startswith("bf16 training (precision: bf16) on the CPU is slower than fp32 here: bf16 took 2.5x")
    assert warnings[1].startswith("bf16 teachers (teacher.precision: bf16) on the CPU is slower than fp32 here")
    assert all("a fake probe" in w and "10.0 ms fp32, 25.0 ms bf16" in w for w in warnings)


def test_fp32_runs_do_not_probe_and_a_faster_bf16_is_only_noted(tokenizer, fixed_probe, caplog):
    teacher = build_clip(config_for(teacher_spec(), tokenizer), seed=10)
    fp32 = OptimConfig(steps=1, batch_size=8, warmup_steps=0, log_every=1)
    with caplog.at_level(logging.INFO, logger="vldistill.precision"):
        one_step_losses(tokenizer, fp32, {"fp32": teacher})
        assert fixed_probe.calls == [] and not probe_records(caplog)
        fixed_probe.value = Bf16Probe(10.0, 6.0, "a fake probe")
        bf16 = OptimConfig(steps=1, batch_size=8, warmup_steps=0, log_every=1, precision="bf16")
        one_step_losses(tokenizer, bf16, {"bf16": teacher})
    records = probe_records(caplog)
    assert [r.levelno for r in records] == [logging.INFO]
    assert records[0].getMessage().startswith("bf16 training (precision: bf16) on the CPU: bf16 took 0.6x the fp32 time")


def test_training_autocast_runs_bf16_products_and_attention_with_fp32_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    q = torch.randn(2, 2, 5, 4, requires_grad=True)
    with training_autocast("cpu", True):
        assert layer(torch.randn(3, 8)).dtype == torch.bfloat16
        attended = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    attended.float().sum().backward()
    reference = q.detach().clone().requires_grad_(True)
    torch.nn.functional.scaled_dot_product_attention(reference, reference, reference).sum().backward()
    assert q.grad.dtype == torch.float32
    assert torch.allclose(q.grad, reference.grad, atol=5e-2)  # bf16 rounding of the attention's products
    with training_autocast("cpu", False):
        assert layer(torch.randn(3, 8)).dtype == torch.float32


def test_a_cache_of_bf16_teachers_is_close_to_fp32_and_refused_for_fp32_teachers(tmp_path):
    cfg = load_config(packaged_config("tiny"), ["data.train_size=64"])
    data = load_data(cfg.data, progress=False)
    teacher = obtain_teacher(cfg, data, tmp_path / "teacher", progress=False)
    rows = {}
    for name in ("fp32", "bf16"):
        built = load_config(packaged_config("tiny"), ["data.train_size=64", f"teacher.precision={name}"])
        build_cache(built, data, teacher, tmp_path / name, progress=False)
        reader = CacheReader.open(tmp_path / name, cache_meta(built, data, [teacher]))
        rows[name] = {field: reader.rows(field, np.arange(64)) for field in ("teacher0/image", "teacher0/text")}
    for field, fp32 in rows["fp32"].items():
        difference = np.abs(rows["bf16"][field].astype(np.float32) - fp32.astype(np.float32)).max()
        assert 0 < difference < 1.5e-2  # bf16 teachers, stored as float16 like the fp32 ones
    fp32_cfg = load_config(packaged_config("tiny"), ["data.train_size=64"])
    with pytest.raises(CacheMismatchError, match="teacher_precision"):
        CacheReader.open(tmp_path / "bf16", cache_meta(fp32_cfg, data, [teacher]))
