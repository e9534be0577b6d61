"""The teacher cache stores a BLIP teacher's ITM: the logits of each sample's three pairs (its own, its image
with a hard negative caption, a hard negative image with its caption), the negatives drawn by the teacher
itself within its build batch (one view per batch), stored as cache rows; a training batch read from the cache
carries the negatives' inputs, so `itm_kd` trains without running the teacher. A cache of other ITM
settings is refused, and what a cache cannot hold is refused saying why."""

from __future__ import annotations

import pytest
import torch
from helpers import bert_word_tokenizer, tiny_blip

from vldistill.config import ConfigError, load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.data.pairs import PairCollator, make_view
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.losses.registry import parse_loss_specs
from vldistill.losses.schedules import WeightingConfig
from vldistill.models.blip_signals import ITM_NEGATIVE_KEY, ITM_NEGATIVE_ROWS
from vldistill.models.inputs import inputs_for
from vldistill.teachers.cache import CacheMismatchError, CacheReader
from vldistill.teachers.cache.build import RowCollator, ShardRows, build_cache, itm_batches
from vldistill.teachers.cache.cached import cache_blockers, serve_from_cache
from vldistill.teachers.cache.meta import cache_meta
from vldistill.train.loop import StudentWithObjective
from vldistill.train.runs import cached_teacher, plan_student_run
from vldistill.trained import TrainedModel

VIEWS = 2
AUGMENT_SET = "data.augment={crop_prob: 0.8, flip_prob: 0.5, brightness: 0.4, word_dropout_prob: 0.2, paraphrase_prob: 0.5}"
FP16 = {"rtol": 1e-3, "atol": 1e-3}  # float16 storage of logits of size ~1


def itm_config(root, *overrides: str):
    """The tiny config on 64 augmented training pairs, a 2-view cache at root/cache built in batches of 12
    rows (6 samples of one view) and shards of 30 rows, distilling itm_kd from it."""
    return load_config(packaged_config("tiny"), [
        "data.train_size=64", AUGMENT_SET, f"cache.views={VIEWS}", "cache.batch_size=12", "cache.shard_rows=30",
        f"cache.path={root / 'cache'}", "cache.mode=require", "distill.losses={itm_kd: {}}",
        "distill.train.batch_size=8", *overrides,
    ])


@pytest.fixture(scope="module")
def itm_cache(tmp_path_factory):
    """A tiny BLIP teacher and the 2-view cache of its embeddings and ITM over the tiny config's data (built once)."""
    root = tmp_path_factory.mktemp("itm")
    tokenizer = bert_word_tokenizer()
    teacher = TrainedModel(tiny_blip(tokenizer, seed=0), tokenizer, root / "teacher")
    cfg = itm_config(root)
    data = load_data(cfg.data, progress=False)
    build_cache(cfg, data, teacher, root / "cache", progress=False)
    return {"root": root, "cfg": cfg, "data": data, "teacher": teacher, "reader": CacheReader.open(root / "cache")}


def views_of(env, rows) -> tuple[torch.Tensor, list[str]]:
    """The uint8 images and captions of the given cache rows, regenerated."""
    pairs, cfg = env["data"].train, env["cfg"]
    made = [make_view(pairs[int(r) // VIEWS], cfg.data.augment, cfg.seed, int(r) % VIEWS) for r in rows]
    return torch.stack([image for image, _ in made]), [caption for _, caption in made]


def test_build_batches_hold_one_view_of_at_least_two_samples() -> None:
    assert itm_batches(0, 10, 2, 4, samples=5) == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]  # a lone last row joins
    assert itm_batches(0, 12, 2, 4, samples=6) == [[0, 2, 4, 6], [8, 10], [1, 3, 5, 7], [9, 11]]
    assert itm_batches(30, 33, 2, 12, samples=64) == [[30, 32], [31, 29]]  # a lone sample borrows its neighbour's row
    assert itm_batches(0, 1, 1, 8, samples=3) == [[0, 1]]
    with pytest.raises(ValueError, match="at least 2 training pairs"):
        itm_batches(0, 1, 1, 8, samples=1)


def test_the_cache_holds_the_itm_logits_the_teacher_gives_its_own_hard_negatives(itm_cache) -> None:
    reader, teacher = itm_cache["reader"], itm_cache["teacher"].model
    assert reader.fields["teacher0/itm"] == (6, "float16") and reader.fields["teacher0/itm_negatives"] == (2, "int64")
    assert reader.meta["itm"] == {"seed": 0, "sampling": "blip-hard-negatives-per-view-build-batch-v1"}
    # The first build batch (view 0 of samples 0, 2, ..., 10 of the 30-row shard 0) drawn again by the teacher.
    cfg, pairs = itm_cache["cfg"], itm_cache["data"].train
    preprocess = BatchPreprocessor.for_model(teacher.tokenizer, teacher.input_spec)
    collate = RowCollator(PairCollator(preprocess, augment=cfg.data.augment, seed=cfg.seed))
    rows = itm_batches(0, 30, VIEWS, 12, len(pairs))[0]
    assert rows == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]
    batch = collate([ShardRows(pairs, VIEWS, 0, 128)[r] for r in rows])
    with torch.no_grad():
        live = teacher(**inputs_for(batch, ""), output_itm=True)
    expected_rows = torch.tensor(rows)[live.itm_negatives].t()
    stored = torch.from_numpy(reader.rows("teacher0/itm_negatives", rows))
    assert torch.equal(stored, expected_rows)
    # Every stored triple equals the teacher's ITM logits on those pairs, recomputed here from the regenerated views.
    some = [0, 5, 31, 64, 127]
    negatives = reader.rows("teacher0/itm_negatives", some)
    images, captions = views_of(itm_cache, some)
    neg_images, _ = views_of(itm_cache, negatives[:, 1])
    _, neg_captions = views_of(itm_cache, negatives[:, 0])
    pixels = preprocess(torch.cat([images, images, neg_images]), [*captions, *neg_captions, *captions])
    with torch.no_grad():
        logits, _ = teacher.itm_logits(
            teacher.model.vision_model(pixel_values=pixels["pixel_values"]).last_hidden_state, pixels["input_ids"], pixels["attention_mask"]
        )
    want = logits.reshape(3, len(some), 2).transpose(0, 1)
    got = torch.from_numpy(reader.rows("teacher0/itm", some)).float().reshape(len(some), 3, 2)
    torch.testing.assert_close(got, want, **FP16)
    assert want[:, 0].std() > 1e-3  # the logits differ from pair to pair: the check is not vacuous


def test_the_negatives_are_other_samples_of_the_same_view_with_other_captions(itm_cache) -> None:
    reader = itm_cache["reader"]
    rows = torch.arange(reader.total_rows)
    negatives = torch.from_numpy(reader.rows("teacher0/itm_negatives", rows.numpy()))
    assert (negatives >= 0).all() and (negatives < reader.total_rows).all()
    for column in (0, 1):
        assert not (negatives[:, column] // VIEWS == rows // VIEWS).any()  # never the row's own sample
        assert (negatives[:, column] % VIEWS == rows % VIEWS).all()  # the negatives of view v are of view v
    _, captions = views_of(itm_cache, rows)
    _, negative_captions = views_of(itm_cache, negatives[:, 0])
    assert all(a != b for a, b in zip(captions, negative_captions))


def test_a_batch_from_the_cache_carries_the_negatives_and_itm_kd_matches_the_live_teacher(itm_cache, tmp_path) -> None:
    env = itm_cache
    plan = plan_student_run(env["cfg"], env["data"], env["teacher"], tmp_path / "student")
    assert plan.from_cache
    batch = next(iter(plan.batches))
    size = len(batch["sample_index"])
    negatives = inputs_for(batch, ITM_NEGATIVE_KEY)
    assert set(negatives) == {"pixel_values", "input_ids", "attention_mask"}
    assert negatives["pixel_values"].shape == batch["pixel_values"].shape and len(negatives["input_ids"]) == size
    stored = env["reader"].rows("teacher0/itm_negatives", (batch["sample_index"] * VIEWS + batch["view"]).numpy())
    assert torch.equal(batch[ITM_NEGATIVE_ROWS], torch.from_numpy(stored))
    needs = plan.objective.needs
    cached = plan.teachers(batch, needs)
    assert cached.itm_logits.shape == (3 * size, 2) and cached.itm_negatives is None
    with torch.no_grad():
        live = env["teacher"].model(**inputs_for(batch, ""), output_itm=True, itm_negative_inputs=negatives)
    torch.testing.assert_close(cached.itm_logits, live.itm_logits, **FP16)
    module = StudentWithObjective(plan.student, plan.objective).eval()
    from_cache, _ = module(batch, cached)
    from_teacher, _ = module(batch, live)
    assert from_cache.item() == pytest.approx(from_teacher.item(), rel=1e-3, abs=1e-5)
    assert from_cache.item() > 1e-4
    with pytest.raises(ValueError, match="must carry the negatives' inputs"):
        plan.teachers({k: v for k, v in batch.items() if not k.startswith(ITM_NEGATIVE_KEY)}, needs)


def test_a_cache_of_other_itm_settings_is_refused(itm_cache) -> None:
    env = itm_cache
    teacher = env["teacher"]
    teacher.model.itm_seed = 1
    try:
        with pytest.raises(CacheMismatchError, match=r"meta\.itm\.seed: cache has 0, expected 1"):
            cached_teacher(env["cfg"], env["data"], teacher)
    finally:
        teacher.model.itm_seed = 0
    meta = cache_meta(env["cfg"], env["data"], [teacher])
    assert meta["itm"]["seed"] == 0 and cached_teacher(env["cfg"], env["data"], teacher).holds_itm()


def test_what_the_cache_cannot_hold_is_refused_saying_why(itm_cache) -> None:
    weighting = WeightingConfig()
    (tokens,) = cache_blockers(parse_loss_specs({"lm_kd": {}}), weighting, "distill.caption_losses")
    assert tokens.startswith("distill.caption_losses.lm_kd needs the teacher's token_logits, which a cache does not store")
    assert "distribution over the whole vocabulary" in tokens
    (maps,) = cache_blockers(parse_loss_specs({"hidden": {"towers": ["fusion"]}}), weighting)
    assert "fusion_hidden_states, which a cache does not store: per-layer maps" in maps
    assert cache_blockers(parse_loss_specs({"itm_kd": {}}), weighting) == []
    (ensemble,) = cache_blockers(parse_loss_specs({"itm_kd": {}}), weighting, teachers=2)
    assert "itm_logits, itm_negatives, which a cache stores for a lone teacher only" in ensemble
    cfg = itm_cache["cfg"]
    with pytest.raises(ConfigError, match="a lone teacher only"):
        serve_from_cache(cfg.cache, cfg.distill.loss_specs, cfg.distill.weighting, teachers=2)
