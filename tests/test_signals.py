"""Named signals: the registered kinds of a dual encoder, and a test-only toy kind that travels through
concatenation over micro-batches, gathering across processes, ensemble combination, the teacher cache
and a loss that names it, with no change to the library (one `register_signal` call)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import build_clip, config_for, model_inputs, teacher_spec

from vldistill.teachers.cache.build import build_cache
from vldistill.teachers.cache.store import CacheReader
from vldistill.teachers.cache.cached import CachedTeacher, cache_blockers
from vldistill.config import load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.data.pairs import PairCollator
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.losses.base import LOSSES, DistillLoss, LossContext
from vldistill.losses.registry import build_objective, parse_loss_specs
from vldistill.models import signals as signals_module
from vldistill.models.clip import CLIPDualEncoder
from vldistill.teachers.ensemble import TeacherEnsemble, combine_outputs
from vldistill.models.signals import (
    SIGNALS,
    SignalKind,
    Signals,
    cat_rows,
    concat_signals,
    gather_signals,
    register_signal,
    request_flags,
)
from vldistill.losses.schedules import WeightingConfig
from vldistill.trained import TrainedModel

TOY = "toy_energy"


def toy_combine(values, weights):
    """Per-sample weighted mean over teachers, with the ensemble's image-row weights."""
    return sum(w.unsqueeze(-1) * v for v, w in zip(values, weights.image))


def toy_gather(value: torch.Tensor, keep_grad: bool) -> torch.Tensor:
    """A stand-in for a two-process all-gather: this process's rows, then the other's (shifted by 100)."""
    return torch.cat([value, value + 100.0])


class ToyTeacher(CLIPDualEncoder):
    """A CLIP dual encoder that also returns the toy signal: each sample's first image and text embedding
    components, (B, 2)."""

    toy_width = 2

    def forward(self, *args, **kwargs) -> Signals:
        out = super().forward(*args, **kwargs)
        return out.replace(**{TOY: torch.stack([out.image_embeds[:, 0], out.text_embeds[:, 0]], dim=1)})


class ToyLoss(DistillLoss):
    """Mean squared error between the student's first embedding components and the teacher's toy signal."""

    needs = frozenset({TOY})

    @dataclass
    class Params:
        pass

    def forward(self, student, teacher):
        mine = torch.stack([student.image_embeds[:, 0], student.text_embeds[:, 0]], dim=1)
        loss = F.mse_loss(mine, teacher[TOY])
        return loss, {"toy": loss.detach()}


@pytest.fixture
def toy_kind():
    """The toy kind and loss, registered for one test only."""
    kind = register_signal(SignalKind(
        name=TOY,
        description="(B, 2) first image and text embedding components (test only)",
        concat=cat_rows,
        gather=toy_gather,
        combine=toy_combine,
        cache_field="toy",
        cache_width=lambda model: getattr(model, "toy_width", None),
    ))
    LOSSES.register("toy")(ToyLoss)
    yield kind
    SIGNALS.unregister(TOY)
    LOSSES.unregister("toy")


def toy_teacher(tokenizer, seed: int) -> ToyTeacher:
    return ToyTeacher(build_clip(config_for(teacher_spec(), tokenizer), seed=seed).model)


def test_a_dual_encoder_returns_registered_signals_and_requests_the_extras(teacher, make_batch) -> None:
    out = teacher(**model_inputs(make_batch(3)), **request_flags(frozenset({"image_hidden_states"})))
    assert set(out) == {"image_embeds", "text_embeds", "logit_scale", "image_hidden_states", "text_hidden_states", "text_attention_mask"}
    assert request_flags(frozenset({"image_embeds"})) == {}
    assert request_flags(frozenset({"text_attentions", "image_hidden_states"})) == {"output_attentions": True, "output_hidden_states": True}
    assert request_flags(frozenset({"text_attentions"}), primary=False) == {}
    with pytest.raises(ValueError, match="unknown signal mystery_logits; registered signals: .*image_embeds"):
        Signals(mystery_logits=torch.zeros(2, 2))
    assert out.image_attentions is None and out.text_attentions is None  # not requested


def test_a_toy_signal_is_concatenated_combined_and_gathered_as_declared(toy_kind, tokenizer, make_batch, monkeypatch) -> None:
    batch = model_inputs(make_batch(6))
    model = toy_teacher(tokenizer, seed=0).eval()
    whole = model(**batch)
    halves = [model(**{k: v[rows] for k, v in batch.items()}) for rows in (slice(0, 2), slice(2, 6))]
    joined = concat_signals(halves)
    torch.testing.assert_close(joined[TOY], whole[TOY])
    torch.testing.assert_close(joined.image_embeds, whole.image_embeds)

    other = toy_teacher(tokenizer, seed=1).eval()
    ensemble = TeacherEnsemble([model, other], method="fixed", weights=[3.0, 1.0])
    combined = ensemble(batch)
    expected = 0.75 * whole[TOY] + 0.25 * other(**batch)[TOY]
    torch.testing.assert_close(combined[TOY], expected)
    torch.testing.assert_close(combine_outputs([whole, other(**batch)], "fixed", [3.0, 1.0])[TOY], expected)

    monkeypatch.setattr(signals_module, "gathering", lambda: True)
    gathered = gather_signals(Signals(**{TOY: whole[TOY], "text_attention_mask": batch["attention_mask"]}), keep_grad=False)
    torch.testing.assert_close(gathered[TOY], torch.cat([whole[TOY], whole[TOY] + 100.0]))
    assert gathered.text_attention_mask is batch["attention_mask"]  # a kind without a gather stays local


def test_a_loss_naming_the_toy_signal_trains_on_it(toy_kind, tokenizer, make_batch) -> None:
    batch = model_inputs(make_batch(5))
    teacher_out = toy_teacher(tokenizer, seed=0).eval()(**batch)
    student = build_clip(config_for(teacher_spec(), tokenizer), seed=7)
    objective = build_objective({"toy": {}}, LossContext(32, 32))
    assert objective.needs == frozenset({TOY})
    student_out = student(**batch)
    loss, parts = objective(student_out, teacher_out)
    mine = torch.stack([student_out.image_embeds[:, 0], student_out.text_embeds[:, 0]], dim=1).detach()
    assert loss.item() == pytest.approx(((mine - teacher_out[TOY]) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert student.model.visual_projection.weight.grad.abs().sum() > 0
    assert cache_blockers(parse_loss_specs({"toy": {}}), WeightingConfig()) == []  # the kind declares a cache field


def test_the_teacher_cache_stores_and_serves_the_toy_signal(toy_kind, tokenizer, tmp_path: Path) -> None:
    cfg = load_config(packaged_config("tiny"), ["cache.batch_size=64", "cache.dtype=float32"])
    data = load_data(cfg.data, progress=False)
    model = toy_teacher(tokenizer, seed=0).eval()
    build_cache(cfg, data, TrainedModel(model, tokenizer, tmp_path / "teacher"), tmp_path / "cache", progress=False)
    reader = CacheReader.open(tmp_path / "cache")
    assert reader.fields["teacher0/toy"] == (2, "float32")
    cached = CachedTeacher(reader, [1.0], "fixed", [{"logit_scale": float(model.logit_scale), "logit_bias": None}])
    assert cached.held_signals(0) == ["image_embeds", "text_embeds", TOY]
    collator = PairCollator(BatchPreprocessor.for_model(tokenizer, model.input_spec), seed=cfg.seed)
    batch = collator([data.train[i] for i in (3, 200, 17)])
    got = cached(batch, frozenset({TOY}))
    want = model(**model_inputs(batch))
    np.testing.assert_allclose(got[TOY].numpy(), want[TOY].detach().numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="not image_hidden_states"):
        cached(batch, frozenset({"image_hidden_states"}))


def test_blip_itm_signals_concatenate_block_by_block_with_shifted_negatives() -> None:
    def micro(rows: int, start: float) -> Signals:
        logits = torch.arange(start, start + 3 * rows * 2).reshape(3 * rows, 2)
        negatives = torch.stack([torch.arange(rows).roll(1), torch.arange(rows).roll(-1)])
        return Signals(itm_logits=logits, itm_negatives=negatives)

    a, b = micro(2, 0.0), micro(3, 100.0)
    joined = concat_signals([a, b])
    blocks = joined.itm_logits.reshape(3, 5, 2)
    for block in range(3):  # each block holds micro-batch a's rows, then b's
        torch.testing.assert_close(blocks[block], torch.cat([a.itm_logits.reshape(3, 2, 2)[block], b.itm_logits.reshape(3, 3, 2)[block]]))
    assert joined.itm_negatives.tolist() == [[1, 0, 4, 2, 3], [1, 0, 3, 4, 2]]
    assert request_flags(frozenset({"itm_logits"}))["output_itm"] is True
