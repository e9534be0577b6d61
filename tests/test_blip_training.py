"""A BLIP student trained against a BLIP teacher's ITM logits scores the teacher's pairs: the loop hands the
student the teacher's ITM negatives, re-based to each micro-batch of an accumulation window."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_blip

from vldistill.losses.base import LossContext
from vldistill.losses.registry import build_objective
from vldistill.models.signals import Signals
from vldistill.teachers.ensemble import TeacherEnsemble, teacher_output_over
from vldistill.train.loop import StudentWithObjective, teacher_chosen_inputs


def inputs(batch: dict) -> dict:
    return {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask")}


def test_teacher_chosen_inputs_are_the_micro_batchs_negatives_rebased() -> None:
    negatives = torch.tensor([[1, 0, 3, 4, 2], [1, 0, 4, 2, 3]])  # micro-batches of 2 and 3 rows, shifted
    teacher = Signals(itm_negatives=negatives)
    assert teacher_chosen_inputs(teacher, 0, 2)["itm_negatives"].tolist() == [[1, 0], [1, 0]]
    assert teacher_chosen_inputs(teacher, 2, 3)["itm_negatives"].tolist() == [[1, 2, 0], [2, 0, 1]]
    assert teacher_chosen_inputs(Signals(logit_scale=torch.tensor(1.0)), 0, 2) == {}
    assert teacher_chosen_inputs(None, 0, 2) == {}


def test_the_student_scores_the_teachers_itm_pairs_in_every_micro_batch(tokenizer, make_batch) -> None:
    teacher = TeacherEnsemble([tiny_blip(tokenizer, seed=0)])
    student = tiny_blip(tokenizer, seed=1).train()
    objective = build_objective({"itm": {}, "itm_kd": {}}, LossContext(32, 32))
    module = StudentWithObjective(student, objective)
    whole = inputs(make_batch(6))
    window = [{k: v[:3] for k, v in whole.items()}, {k: v[3:] for k, v in whole.items()}]
    teacher_out = teacher_output_over(teacher, window, objective.needs)
    assert teacher_out.itm_negatives.shape == (2, 6) and teacher_out.itm_logits.shape == (18, 2)
    cached = [module.cached_output(batch, teacher_chosen_inputs(teacher_out, start, 3)) for batch, start in zip(window, (0, 3))]
    torch.testing.assert_close(torch.cat([c.itm_negatives + start for c, start in zip(cached, (0, 3))], dim=1),
                               teacher_out.itm_negatives)
    loss, parts = module(window[1], teacher_out, cached, position=1, start=3)
    assert torch.isfinite(loss) and parts["loss/itm_kd"] > 0
    loss.backward()
    assert student.model.itm_head.weight.grad.abs().sum() > 0


def test_every_teacher_of_an_ensemble_scores_the_primary_teachers_itm_pairs(tokenizer, make_batch) -> None:
    first, second = tiny_blip(tokenizer, seed=0), tiny_blip(tokenizer, seed=2)
    batch = inputs(make_batch(6))
    outputs = TeacherEnsemble([first, second]).outputs(batch, frozenset({"itm_logits", "itm_negatives"}))
    own = first(**batch, output_itm=True)
    torch.testing.assert_close(outputs[0].itm_negatives, own.itm_negatives)
    # the second teacher's logits are of the first one's pairs, as it scores them when handed those negatives
    torch.testing.assert_close(outputs[1].itm_logits, second(**batch, output_itm=True, itm_negatives=own.itm_negatives).itm_logits)
    assert not torch.equal(outputs[1].itm_logits, second(**batch, output_itm=True).itm_logits)  # its own choice differs


def test_an_ensemble_member_without_an_itm_head_is_refused_when_itm_is_needed(tokenizer, teacher, make_batch) -> None:
    ensemble = TeacherEnsemble([tiny_blip(tokenizer, seed=0), teacher])
    with pytest.raises(ValueError, match=r"teacher 1 of the ensemble \(CLIPDualEncoder\) has no image-text matching head"):
        ensemble.outputs(inputs(make_batch(4)), frozenset({"itm_logits"}))
