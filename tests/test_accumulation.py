"""Gradient accumulation keeps the whole batch's semantics: K micro-batches give the loss and gradients of
one pass over their union (negatives, similarity matrices, combined teacher logits and per-sample means
span the window), and K-step training ends where whole-batch training does."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from helpers import batches, build_clip, config_for, gradients, student_and_objective, teacher_spec

from vldistill.config import OptimConfig
from vldistill.teachers.ensemble import TeacherEnsemble, teacher_output_over
from vldistill.train.loop import backward_window, train

EVERY_SIGNAL = {
    "clip": {}, "kd": {"temperature": 2.0}, "affinity": {}, "feature": {}, "crd": {}, "icl": {},
    "hidden": {"weight": 0.5}, "attention": {"weight": 0.5},
}


@pytest.mark.parametrize("losses, teachers, method", [
    (EVERY_SIGNAL, 1, "fixed"),
    ({"kd": {"temperature": 2.0}, "affinity": {}}, 2, "confidence"),  # combined logits over the window
])
def test_micro_batches_give_the_whole_batch_loss_and_gradients(tokenizer, losses, teachers, method):
    teacher = TeacherEnsemble(
        [build_clip(config_for(teacher_spec(), tokenizer), seed=10 + k) for k in range(teachers)], method=method
    )
    whole, micro = batches(tokenizer, 12, parts=3)
    assert len({b["input_ids"].shape[1] for b in micro}) > 1  # micro-batches padded to different lengths
    reference = student_and_objective(tokenizer, losses)
    needs = reference.objective.needs
    loss, _ = reference(whole, teacher_output_over(teacher, [whole], needs))
    loss.backward()
    accumulated = student_and_objective(tokenizer, losses)
    window_loss, _ = backward_window(Accelerator(cpu=True), accumulated, micro, teacher_output_over(teacher, micro, needs))
    assert window_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    expected, found = gradients(reference), gradients(accumulated)
    assert found.keys() == expected.keys() and len(found) > 20
    assert any("logit_scale" in name for name in found)  # the loss-side parameters are compared too
    for name, grad in expected.items():  # float32 sums in another order: relative to the tensor's scale
        assert (found[name] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-6, name


def test_training_with_accumulation_ends_where_whole_batch_training_does(tokenizer):
    teacher = build_clip(config_for(teacher_spec(), tokenizer), seed=10)
    losses = {"clip": {}, "kd": {"temperature": 2.0}, "feature": {}}
    steps = [batches(tokenizer, 8, parts=2, seed=s) for s in range(3)]
    finals = []
    for accumulation, data in ((1, [w for w, _ in steps]), (2, [m for _, ms in steps for m in ms])):
        module = student_and_objective(tokenizer, losses)
        optim = OptimConfig(steps=3, batch_size=8, accumulation_steps=accumulation, warmup_steps=1, lr=1e-3,
                            log_every=1, grad_clip=0.5)
        result = train(module.student, module.objective, data, optim, teacher=teacher)
        assert result.steps == 3 and len(result.history) == 3
        finals.append((module.state_dict(), [r["loss/total"] for r in result.history]))
    (whole_state, whole_losses), (micro_state, micro_losses) = finals
    assert micro_losses == pytest.approx(whole_losses, rel=1e-5)
    for name, value in whole_state.items():
        if name.endswith("k_proj.bias"):  # exact gradient 0 (softmax ignores a shift); Adam scales float noise up
            continue
        assert torch.allclose(micro_state[name], value, atol=1e-5), name
