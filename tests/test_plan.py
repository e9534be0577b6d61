"""The plan of a student run (train.runs.plan_student_run): the teachers' source follows the losses (the cache
for embedding-only losses, online for a hidden-state loss), and a resumed plan's batches start at its step."""

from __future__ import annotations

import pytest
import torch

from vldistill.teachers.cache.build import build_cache
from vldistill.teachers.cache.cached import CachedTeacher
from vldistill.config import load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.teachers.ensemble import TeacherEnsemble
from vldistill.train.runs import obtain_teacher, plan_student_run

EMBEDDING_LOSSES = "distill.losses={clip: {weight: 1.0}, kd: {weight: 1.0}}"
HIDDEN_LOSSES = "distill.losses={clip: {weight: 1.0}, kd: {weight: 1.0}, hidden: {weight: 1.0}}"
HALF_ULP = 2.0**-12  # fp16 rounding error bound for values in [-1, 1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config's data, its pretrained teacher and an unaugmented one-view cache of it."""
    root = tmp_path_factory.mktemp("plan")
    cfg = load_config(packaged_config("tiny"))
    data = load_data(cfg.data, progress=False)
    teacher = obtain_teacher(cfg, data, root / "teacher", progress=False)
    cached = load_config(packaged_config("tiny"), [f"teacher.path={root / 'teacher'}", f"cache.path={root / 'cache'}"])
    build_cache(cached, data, teacher, root / "cache", progress=False)
    return {"root": root, "data": data, "teacher": teacher}


def cfg_for(tiny, *overrides: str):
    return load_config(packaged_config("tiny"), [
        f"teacher.path={tiny['root'] / 'teacher'}", f"cache.path={tiny['root'] / 'cache'}", *overrides,
    ])


def test_embedding_losses_read_the_cache_and_a_hidden_state_loss_runs_the_teacher(tiny, tmp_path) -> None:
    cached = plan_student_run(cfg_for(tiny, EMBEDDING_LOSSES), tiny["data"], tiny["teacher"], tmp_path / "c")
    online = plan_student_run(cfg_for(tiny, HIDDEN_LOSSES), tiny["data"], tiny["teacher"], tmp_path / "o")
    assert cached.from_cache and isinstance(cached.teachers, CachedTeacher)
    assert not online.from_cache and isinstance(online.teachers, TeacherEnsemble)
    assert set(cached.losses) == {"clip", "kd"} and set(online.losses) == {"clip", "kd", "hidden"}
    assert cached.checkpointer is None and cached.resume is None and cached.start_step == 0
    # Both read the same first batch; the cache gives the teacher's embeddings on it up to fp16 rounding.
    first_cached, first_online = next(iter(cached.batches)), next(iter(online.batches))
    assert torch.equal(first_cached["sample_index"], first_online["sample_index"])
    assert torch.equal(first_cached["pixel_values"], first_online["pixel_values"])
    with torch.no_grad():
        from_cache = cached.teachers(first_cached, cached.objective.needs)
        from_teacher = online.teachers.eval()(first_online, frozenset())
    assert from_cache.image_embeds.shape == (cached.optim.batch_size, tiny["teacher"].model.embed_dim)
    torch.testing.assert_close(from_cache.image_embeds.float(), from_teacher.image_embeds, atol=2 * HALF_ULP, rtol=0)
    torch.testing.assert_close(from_cache.text_embeds.float(), from_teacher.text_embeds, atol=2 * HALF_ULP, rtol=0)


def test_a_resumed_plan_starts_its_batches_at_the_checkpoint_step(tiny, tmp_path) -> None:
    cfg = cfg_for(tiny, EMBEDDING_LOSSES, "distill.checkpoint.every=2")
    first = plan_student_run(cfg, tiny["data"], tiny["teacher"], tmp_path / "run" / "student")
    assert first.checkpointer is not None and first.checkpointer.every == 2
    first.train("distill student", progress=False)
    checkpoint = tmp_path / "run" / "student-checkpoints" / "checkpoint-00000006"
    resumed = plan_student_run(cfg, tiny["data"], tiny["teacher"], tmp_path / "run" / "student", resume=str(checkpoint))
    assert resumed.resume is not None and resumed.start_step == 6
    fresh = plan_student_run(cfg, tiny["data"], tiny["teacher"], tmp_path / "fresh" / "student")
    expected = list(fresh.batches)
    remaining = list(resumed.batches)
    assert len(expected) == cfg.distill.train.steps == 8 and len(remaining) == 2
    for got, want in zip(remaining, expected[6:], strict=True):
        assert torch.equal(got["sample_index"], want["sample_index"])
        assert torch.equal(got["pixel_values"], want["pixel_values"])
