"""bf16 autocast: chosen per the config and the hardware, and training under it stays close to fp32."""

from __future__ import annotations

import pytest
import torch
from helpers import batches, build_clip, config_for, student_and_objective, teacher_spec

from vldistill.config import OptimConfig
from vldistill.train.loop import train, uses_bf16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU choices")
def test_precision_choice_on_a_cpu():
    assert not uses_bf16("fp32") and uses_bf16("bf16")
    assert not uses_bf16("auto")  # CPUs without bf16 units run it slower than fp32


def test_bf16_autocast_trains_close_to_fp32(tokenizer):
    teacher = build_clip(config_for(teacher_spec(), tokenizer), seed=10)
    data = [batches(tokenizer, 8, parts=1, seed=s)[0] for s in range(3)]
    losses = {}
    for precision in ("fp32", "bf16"):
        module = student_and_objective(tokenizer, {"clip": {}, "kd": {"temperature": 2.0}})
        optim = OptimConfig(steps=3, batch_size=8, warmup_steps=0, log_every=1, precision=precision)
        losses[precision] = [r["loss/total"] for r in train(module.student, module.objective, data, optim, teacher=teacher).history]
    assert losses["bf16"] != losses["fp32"]  # autocast was on: bfloat16 products round differently
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
