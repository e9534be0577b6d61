"""The teacher cache end to end: deterministic per-sample views, building a cache of a two-teacher
ensemble on the tiny config, reading it back in place of the teachers (checked against the online
ensemble), distilling from it without running a teacher, when it is refused (other settings or other
views), resuming a build, and probing the build's batch size."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from helpers import build_clip, config_for

from vldistill.teachers.cache import CacheCorruptError, CacheIncompleteError, CacheMismatchError, CacheReader, CacheViewMismatchError, CacheWriter
from vldistill.teachers.cache.build import PROBE_SIZES, build_cache, pick_batch_size
from vldistill.teachers.cache.cached import CachedTeacher
from vldistill.cli import main
from vldistill.config import ConfigError, OptimConfig, load_config, packaged_config
from vldistill.data.augment import AugmentConfig, apply_augment, sample_params
from vldistill.data.bundle import load_data
from vldistill.data import pairs as pairs_module
from vldistill.data.pairs import PairCollator, make_view, view_generator, view_hash
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.models import DualEncoderSpec, TowerSpec
from vldistill.teachers.ensemble import TeacherEnsemble
from vldistill.models.inputs import MODEL_INPUTS, inputs_for
from vldistill.models.io import read_metadata, save_dual_encoder
from vldistill.teachers.assemble import teacher_ensemble
from vldistill.train.runs import _batches, cached_teacher, obtain_teacher, train_student

AUGMENT = AugmentConfig(crop_prob=0.8, flip_prob=0.5, brightness=0.4, word_dropout_prob=0.2, paraphrase_prob=0.5)
AUGMENT_SET = "data.augment={crop_prob: 0.8, flip_prob: 0.5, brightness: 0.4, word_dropout_prob: 0.2, paraphrase_prob: 0.5}"
HALF_ULP = 2.0**-12  # fp16 rounding error bound for values in [-1, 1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config's data, its pretrained teacher, a second (8x8-image, 24-d) ensemble teacher on
    disk, and a two-view augmented cache of both."""
    root = tmp_path_factory.mktemp("cache")
    cfg = load_config(packaged_config("tiny"))
    data = load_data(cfg.data, progress=False)
    obtain_teacher(cfg, data, root / "teacher")
    spec = DualEncoderSpec(vision=TowerSpec(layers=1, width=16, heads=1, patch_size=4),
                           text=TowerSpec(layers=1, width=16, heads=1), projection_dim=24)
    teacher = obtain_teacher(load_config(packaged_config("tiny"), [f"teacher.path={root / 'teacher'}"]), data, root)
    config = config_for(spec, teacher.tokenizer)
    config.vision_config.image_size = 8
    save_dual_encoder(build_clip(config, seed=3), teacher.tokenizer, root / "other")
    overrides = [
        f"teacher.path={root / 'teacher'}", f"teacher.ensemble=[{{path: {root / 'other'}, weight: 0.5}}]",
        AUGMENT_SET, "cache.views=2", "cache.batch_size=64", "cache.shard_rows=200", f"cache.path={root / 'ens'}",
    ]
    ens_cfg = load_config(packaged_config("tiny"), overrides)
    ens_data = load_data(ens_cfg.data, progress=False)
    result = build_cache(ens_cfg, ens_data, teacher, root / "ens", progress=False)
    return {"root": root, "data": data, "teacher": teacher, "ens_cfg": ens_cfg, "ens_data": ens_data, "result": result}


def plain_cfg(tiny, *overrides: str):
    """The tiny config distilling from the tiny teacher, with a views=1 cache folder at root/plain."""
    return load_config(packaged_config("tiny"), [
        f"teacher.path={tiny['root'] / 'teacher'}", f"cache.path={tiny['root'] / 'plain'}", *overrides,
    ])


@pytest.fixture(scope="module")
def plain_cache(tiny):
    """A single-teacher, unaugmented, one-view cache at root/plain."""
    cfg = plain_cfg(tiny)
    return build_cache(cfg, tiny["data"], tiny["teacher"], tiny["root"] / "plain", progress=False)


def unpadded(batch, j: int) -> list[int]:
    """Sample j's token ids without padding."""
    return batch["input_ids"][j][batch["attention_mask"][j].bool()].tolist()


# ---------------------------------------------------------------- deterministic views


def test_view_generator_is_seeded_by_seed_index_and_view_only() -> None:
    digest = hashlib.blake2b(b"7:42:3", digest_size=8).digest()
    expected = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    draws = torch.rand(5, generator=view_generator(7, 42, 3))
    assert torch.equal(draws, torch.rand(5, generator=expected))
    assert not torch.equal(draws, torch.rand(5, generator=view_generator(7, 42, 4)))
    assert not torch.equal(draws, torch.rand(5, generator=view_generator(8, 42, 3)))


def test_views_do_not_depend_on_batch_composition_or_order(tiny) -> None:
    pairs = tiny["data"].train
    preprocess = BatchPreprocessor.for_model(tiny["teacher"].tokenizer, tiny["teacher"].model.input_spec)
    collator = PairCollator(preprocess, augment=AUGMENT, seed=5)
    in_order = collator.collate([pairs[i] for i in range(8)], [1] * 8)
    shuffled_ids = [6, 2, 7, 0, 5, 3, 1, 4]
    mixed = collator.collate([pairs[i] for i in [100, *shuffled_ids, 200]], [0, *[1] * 8, 2])
    for position, i in enumerate(shuffled_ids, start=1):
        assert torch.equal(mixed["pixel_values"][position], in_order["pixel_values"][i])
        assert unpadded(mixed, position) == unpadded(in_order, i)
    assert mixed["sample_index"].tolist() == [100, *shuffled_ids, 200] and mixed["view"].tolist() == [0, *[1] * 8, 2]
    # Each view is the augmentation replayed from params drawn with view_generator(seed, i, v).
    i = 3
    sample = pairs[i]
    params = sample_params(view_generator(5, i, 1), AUGMENT, 16, sample.caption, sample.attributes)
    image, caption = apply_augment(sample.image, sample.caption, params, sample.attributes)
    assert torch.equal(in_order["pixel_values"][i], preprocess(image[None], [caption])["pixel_values"][0])
    assert unpadded(in_order, i) == unpadded(preprocess(image[None], [caption]), 0)
    assert inputs_for(in_order, "").keys() == set(MODEL_INPUTS)  # sample_index and view never reach a model


def test_views_differ_with_augmentation_and_coincide_without(tiny) -> None:
    pairs = tiny["data"].train
    differ = sum(
        not torch.equal(make_view(pairs[i], AUGMENT, 0, 0)[0], make_view(pairs[i], AUGMENT, 0, 1)[0]) for i in range(16)
    )
    assert differ >= 14  # crop (p 0.8) and brightness (always drawn) make almost every view pair differ
    for augment in (None, AugmentConfig()):
        for i in range(4):
            views = [make_view(pairs[i], augment, 0, v) for v in range(3)]
            assert all(torch.equal(image, pairs[i].image) and caption == pairs[i].caption for image, caption in views)


def test_epoch_e_uses_view_e_or_e_mod_views(tiny) -> None:
    data = tiny["data"]
    preprocess = BatchPreprocessor.for_model(tiny["teacher"].tokenizer, tiny["teacher"].model.input_spec)
    optim = OptimConfig(steps=7, batch_size=128, warmup_steps=0)  # 2 batches an epoch
    fresh = [b["view"].unique().tolist() for b in _batches(data, preprocess, optim, 0, AUGMENT)]
    assert fresh == [[0], [0], [1], [1], [2], [2], [3]]
    cached = [b["view"].unique().tolist() for b in _batches(data, preprocess, optim, 0, AUGMENT, views=2)]
    assert cached == [[0], [0], [1], [1], [0], [0], [1]]


# ---------------------------------------------------------------- build and read


def test_cache_layout_and_meta(tiny) -> None:
    result, cfg = tiny["result"], tiny["ens_cfg"]
    reader = CacheReader.open(result.path, verify=True)
    assert result.rows == reader.total_rows == 256 * 2 and result.shards_total == 3
    assert reader.fields == {
        "teacher0/image": (32, "float16"), "teacher0/text": (32, "float16"),
        "teacher1/image": (24, "float16"), "teacher1/text": (24, "float16"), "view_hash": (1, "int64"),
    }
    assert result.bytes_per_sample == 2 * ((32 + 32 + 24 + 24) * 2 + 8)  # two views, fp16, an int64 hash
    meta = reader.meta
    assert meta["transform"]["views"] == 2 and meta["transform"]["seed"] == cfg.seed
    assert meta["transform"]["augment"]["flip_prob"] == 0.5
    assert meta["transform"]["input_specs"]["1"]["image_size"] == 8
    assert meta["data"]["fingerprint"] == tiny["ens_data"].fingerprint
    assert meta["teachers"]["0"]["class"] == "CLIPDualEncoder"
    assert meta["teachers"]["0"]["logit_scale"] == pytest.approx(float(tiny["teacher"].model.logit_scale), rel=1e-7)
    params = tiny["teacher"].model.state_dict()
    digest = hashlib.sha256()
    for key in sorted(params):
        tensor = params[key].contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    assert meta["teachers"]["0"]["sha256"] == digest.hexdigest()


def test_cached_teacher_matches_the_online_ensemble(tiny) -> None:
    cfg, data, primary = tiny["ens_cfg"], tiny["ens_data"], tiny["teacher"]
    online, extra = teacher_ensemble(cfg, primary, primary.model.input_spec)
    online.eval()
    cached = cached_teacher(cfg, data, primary)
    assert isinstance(cached, CachedTeacher) and cached.embed_dim == online.embed_dim == 56
    preprocess = BatchPreprocessor.for_model(primary.tokenizer, primary.model.input_spec)
    collator = PairCollator(preprocess, augment=cfg.data.augment, seed=cfg.seed, extra=extra, views=2)
    pairs = data.train
    for epoch, ids in ((0, [5, 200, 17, 3, 255, 64]), (3, [5, 0, 128, 99])):
        collator.set_epoch(epoch)  # epoch 3 reads view 1
        batch = collator([pairs[i] for i in ids])
        want, got = online(batch), cached(batch)
        for name in ("image_embeds", "text_embeds"):
            assert getattr(got, name).dtype == torch.float32
            torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=2 * HALF_ULP, rtol=0)
        assert got.logit_scale.item() == pytest.approx(want.logit_scale.item(), rel=1e-6)
        torch.testing.assert_close(got.logits_per_image(), want.logits_per_image(), atol=0.02, rtol=0)
        # The stored rows are each teacher's fp16 output for row sample * 2 + view.
        rows = np.array(ids) * 2 + epoch % 2
        stored = cached.reader.rows("teacher1/text", rows)
        assert np.abs(stored.astype(np.float32) - online.outputs(batch)[1].text_embeds.numpy()).max() <= 2 * HALF_ULP


# ---------------------------------------------------------------- distillation from the cache


def test_distill_from_cache_never_runs_a_teacher(tiny, plain_cache, monkeypatch, tmp_path) -> None:
    cfg = plain_cfg(tiny)
    teacher = copy.deepcopy(tiny["teacher"])

    def never(*args, **kwargs):
        raise AssertionError("a teacher was run")

    teacher.model.forward = never
    monkeypatch.setattr(TeacherEnsemble, "outputs", never)
    student = train_student(cfg, tiny["data"], teacher, tmp_path / "student")
    assert student.result.steps == cfg.distill.train.steps == 8
    assert read_metadata(tmp_path / "student")["teacher_cache"] == str(tiny["root"] / "plain")
    monkeypatch.undo()
    # The same run with the teacher online follows the same losses, up to the cache's fp16 rounding.
    online_cfg = plain_cfg(tiny, "cache.path=null")
    online = train_student(online_cfg, tiny["data"], tiny["teacher"], tmp_path / "online")
    assert read_metadata(tmp_path / "online")["teacher_cache"] is None
    assert len(student.result.history) == len(online.result.history) == 2  # steps 4 and 8
    for cached_row, online_row in zip(student.result.history, online.result.history):
        for key in ("loss/clip", "loss/kd", "loss/feature", "loss/total"):
            assert cached_row[key] == pytest.approx(online_row[key], rel=1e-3, abs=1e-5)


def test_student_on_the_first_pairs_reads_their_rows_of_a_whole_set_cache(tiny, plain_cache, tmp_path) -> None:
    """distill.train_pairs: the cache holds every training pair; the student's batches read the rows of
    its first N, and follow the online run's losses on those pairs."""
    cached = train_student(plain_cfg(tiny, "distill.train_pairs=64"), tiny["data"], tiny["teacher"], tmp_path / "c")
    online = train_student(
        plain_cfg(tiny, "distill.train_pairs=64", "cache.path=null"), tiny["data"], tiny["teacher"], tmp_path / "o"
    )
    assert read_metadata(tmp_path / "c")["teacher_cache"] == str(tiny["root"] / "plain")
    for cached_row, online_row in zip(cached.result.history, online.result.history, strict=True):
        assert cached_row["loss/kd"] == pytest.approx(online_row["loss/kd"], rel=1e-3, abs=1e-5)


def test_hidden_state_loss_runs_online_in_auto_and_fails_in_require(tiny, plain_cache, caplog, tmp_path) -> None:
    losses = "distill.losses={clip: {weight: 1.0}, kd: {weight: 1.0}, hidden: {weight: 1.0}}"
    cfg = plain_cfg(tiny, losses)
    student = train_student(cfg, tiny["data"], tiny["teacher"], tmp_path / "auto", progress=False)
    [warning] = [r for r in caplog.records if r.name == "vldistill.teachers.cache.cached"]
    assert warning.levelno == logging.WARNING
    assert ("running the teachers online: distill.losses.hidden needs the teacher's image_hidden_states, text_hidden_states, "
            "which a cache does not store: per-layer maps of every token") in warning.getMessage()
    assert student.result.steps == 8 and read_metadata(tmp_path / "auto")["teacher_cache"] is None
    with pytest.raises(ConfigError, match=r"cache.mode is require.*distill\.losses\.hidden needs the teacher's image_hidden_states.*which a cache does not store"):
        train_student(plain_cfg(tiny, losses, "cache.mode=require"), tiny["data"], tiny["teacher"], tmp_path / "req")
    assert not (tmp_path / "req").exists()
    with pytest.raises(ConfigError, match="cache.mode is require, but cache.path is not set"):
        train_student(plain_cfg(tiny, "cache.path=null", "cache.mode=require"), tiny["data"], tiny["teacher"], tmp_path / "r")


def test_cache_of_other_teacher_or_data_is_refused(tiny, plain_cache, tmp_path) -> None:
    other = copy.deepcopy(tiny["teacher"])
    with torch.no_grad():
        other.model.model.visual_projection.weight[0, 0] += 1e-3
    with pytest.raises(CacheMismatchError, match=r"meta\.teachers\.0\.sha256: cache has '[0-9a-f]+'") as caught:
        cached_teacher(plain_cfg(tiny), tiny["data"], other)
    assert len(caught.value.differences) == 1  # the weights, nothing else
    flipped = plain_cfg(tiny, "data.augment.flip_prob=0.5")
    with pytest.raises(CacheMismatchError, match=r"meta\.transform\.augment\.flip_prob: cache has 0\.0, expected 0\.5"):
        train_student(flipped, load_data(flipped.data, progress=False), tiny["teacher"], tmp_path / "s")
    smaller = plain_cfg(tiny, "data.train_size=128")
    with pytest.raises(CacheMismatchError, match=r"meta\.data\.settings\.train_size: cache has 256, expected 128"):
        cached_teacher(smaller, load_data(smaller.data, progress=False), tiny["teacher"])
    with pytest.raises(CacheMismatchError, match=r"meta\.transform\.views: cache has 1, expected 3"):
        cached_teacher(plain_cfg(tiny, "cache.views=3"), tiny["data"], tiny["teacher"])


def test_interrupted_build_resumes_to_the_same_cache(tiny, monkeypatch, tmp_path) -> None:
    cfg = plain_cfg(tiny, "cache.shard_rows=96", "cache.batch_size=40", f"cache.path={tmp_path / 'resumed'}")
    data, teacher = tiny["data"], tiny["teacher"]
    record_shard = CacheWriter.record_shard

    def fail_after_first(self, index, files):
        if index > 0:
            raise KeyboardInterrupt("interrupted")
        record_shard(self, index, files)

    monkeypatch.setattr(CacheWriter, "record_shard", fail_after_first)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, data, teacher, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    with pytest.raises(CacheIncompleteError, match="holds 1 of 3 shards"):
        train_student(cfg, data, teacher, tmp_path / "student")
    resumed = build_cache(cfg, data, teacher, tmp_path / "resumed", progress=False)
    assert (resumed.shards_written, resumed.shards_total) == (2, 3)
    loaded_by_a_worker = plain_cfg(tiny, "cache.shard_rows=96", "cache.batch_size=40", "cache.num_workers=1")
    whole = build_cache(loaded_by_a_worker, data, teacher, tmp_path / "whole", progress=False)
    assert whole.shards_written == 3

    def files(folder):
        manifest = json.loads((folder / "manifest.json").read_text())
        return [shard["files"] for shard in manifest["shards"]], manifest["meta"]

    assert files(tmp_path / "resumed") == files(tmp_path / "whole")
    assert build_cache(cfg, data, teacher, tmp_path / "whole", progress=False).shards_written == 0


# ---------------------------------------------------------------- CLI and config


def test_cli_cache_builds_and_reports(tiny, tmp_path, capsys) -> None:
    tiny_yaml = str(packaged_config("tiny"))
    assert main(["cache", tiny_yaml, "--out", str(tmp_path / "c"), "--set", f"teacher.path={tiny['root'] / 'teacher'}"]) == 0
    out = capsys.readouterr().out
    assert "256 rows (256 pairs x 1 views)" in out and "136 bytes per sample" in out
    assert CacheReader.open(tmp_path / "c").total_rows == 256
    assert main(["cache", tiny_yaml, "--out", str(tmp_path / "d")]) == 2
    assert "teacher.path is not set" in capsys.readouterr().err


def test_cli_quiet_drops_info_and_progress_bars_but_not_warnings_or_errors(tiny, tmp_path, capsys) -> None:
    """`vldistill cache` logs its auto batch size and draws a bar on stderr; with `--quiet` (before or after
    the subcommand) stderr is empty while stdout keeps the result. A distillation that cannot use the cache
    still warns under --quiet, without the training bar; and errors print."""
    args = ["cache", str(packaged_config("tiny")), "--set", f"teacher.path={tiny['root'] / 'teacher'}",
            "--set", "cache.batch_size=auto"]
    assert main([*args, "--out", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr()
    assert re.search(r"^vldistill: cache.batch_size auto: using \d+ ", loud.err, re.MULTILINE)
    assert "teacher cache: 100%" in loud.err and "256 rows" in loud.out
    for n, quiet in enumerate(([*args, "--quiet"], ["--quiet", *args])):
        assert main([*quiet, "--out", str(tmp_path / f"quiet{n}")]) == 0
        silent = capsys.readouterr()
        assert silent.err == "" and "256 rows" in silent.out
    distill = ["distill", str(packaged_config("tiny")), "--quiet", "--no-eval", "--out", str(tmp_path / "run"),
               "--set", f"teacher.path={tiny['root'] / 'teacher'}", "--set", f"cache.path={tmp_path / 'loud'}",
               "--set", "distill.losses={clip: {weight: 1.0}, hidden: {weight: 1.0}}"]
    assert main(distill) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"vldistill: warning: teacher cache {tmp_path / 'loud'} not used, running")
    assert main(["cache", str(packaged_config("tiny")), "--quiet", "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err == "vldistill: error: teacher.path is not set: point it at the teacher to cache (e.g. from `vldistill pretrain-teacher`)\n"


@pytest.mark.parametrize("override, message", [
    ("cache.views=0", "cache.views must be >= 1"),
    ("cache.dtype=int8", "cache.dtype must be one of float16, float32"),
    ("cache.mode=maybe", "cache.mode must be one of auto, require"),
    ("cache.num_workers=-1", "cache.num_workers must be >= 0"),
    ("cache.shards=3", "unknown config key 'cache.shards'"),
    ("cache.batch_size=0", "cache.batch_size must be a positive int or 'auto', got 0"),
    ("cache.batch_size=fast", "cache.batch_size must be a positive int or 'auto', got 'fast'"),
    ("cache.batch_size=1.5", r"cache.batch_size must be int or str, got 1.5"),
    ("cache.batch_size=true", r"cache.batch_size must be int or str, got True"),
])
def test_cache_config_errors_name_the_key(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(packaged_config("tiny"), [override])


def test_cache_batch_size_takes_an_int_or_auto() -> None:
    assert load_config(packaged_config("tiny"), ["cache.batch_size=auto"]).cache.batch_size == "auto"
    assert load_config(packaged_config("tiny"), ["cache.batch_size=32"]).cache.batch_size == 32


# ---------------------------------------------------------------- view fingerprints


def test_view_hash_is_a_stable_63_bit_blake2b_of_image_and_caption() -> None:
    image = torch.arange(48, dtype=torch.uint8).reshape(4, 4, 3)
    digest = hashlib.blake2b(b"4x4x3:" + bytes(range(48)) + "a red circle".encode(), digest_size=8).digest()
    expected = int.from_bytes(digest, "little") >> 1
    assert view_hash(image, "a red circle") == expected == view_hash(image.clone(), "a red circle")
    assert 0 <= expected < 2**63
    assert view_hash(image.flip(1), "a red circle") == view_hash(image.flip(1).contiguous(), "a red circle") != expected
    assert view_hash(image, "a red circle.") != expected
    assert view_hash(image.reshape(2, 8, 3), "a red circle") != expected  # same bytes, other shape
    with pytest.raises(ValueError, match="must be uint8"):
        view_hash(image.float(), "a red circle")


def test_collated_and_cached_view_hashes_are_those_of_the_views(tiny) -> None:
    cfg, pairs = tiny["ens_cfg"], tiny["ens_data"].train
    preprocess = BatchPreprocessor.for_model(tiny["teacher"].tokenizer, tiny["teacher"].model.input_spec)
    collator = PairCollator(preprocess, augment=cfg.data.augment, seed=cfg.seed)
    ids, views = [9, 0, 131], [1, 0, 1]
    batch = collator.collate([pairs[i] for i in ids], views)
    expected = [view_hash(*make_view(pairs[i], cfg.data.augment, cfg.seed, v)) for i, v in zip(ids, views)]
    assert batch["view_hash"].dtype == torch.long and batch["view_hash"].tolist() == expected
    assert inputs_for(batch, "").keys() == set(MODEL_INPUTS)  # the hash never reaches a model
    stored = CacheReader.open(tiny["result"].path).rows("view_hash", np.array(ids) * 2 + np.array(views))
    assert stored[:, 0].tolist() == expected


def test_views_changed_after_the_build_are_refused(tiny, monkeypatch) -> None:
    cfg, data = tiny["ens_cfg"], tiny["ens_data"]
    cached = cached_teacher(cfg, data, tiny["teacher"])
    preprocess = BatchPreprocessor.for_model(tiny["teacher"].tokenizer, tiny["teacher"].model.input_spec)
    _, extra = teacher_ensemble(cfg, tiny["teacher"], tiny["teacher"].model.input_spec)
    collator = PairCollator(preprocess, augment=cfg.data.augment, seed=cfg.seed, extra=extra, views=2)
    pairs = data.train
    collator.set_epoch(1)
    cached(collator([pairs[i] for i in (12, 40)]))  # the views the cache was built from pass
    augment = pairs_module.apply_augment

    def other_version(image, caption, params, attributes=None):  # e.g. another vldistill's augmentation
        image, caption = augment(image, caption, params, attributes)
        return image, caption + " ."

    monkeypatch.setattr(pairs_module, "apply_augment", other_version)
    with pytest.raises(CacheViewMismatchError, match=(
        r"sample 12 view 1 is not the view the teachers saw .*2 of 2 views in the batch differ\): the cache was "
        r"built from other views \(e\.g\. another vldistill version's augmentation\) and must be rebuilt"
    )):
        cached(collator([pairs[i] for i in (12, 40)]))
    batch = collator([pairs[i] for i in (12, 40)])
    del batch["view_hash"]
    with pytest.raises(ValueError, match="needs 'view_hash'"):
        cached(batch)


def test_a_tampered_view_hash_is_refused_at_distillation(tiny, plain_cache, tmp_path) -> None:
    reader = CacheReader.open(plain_cache.path)
    arrays = {name: reader.rows(name, np.arange(reader.total_rows)) for name in reader.fields}
    arrays["view_hash"][7, 0] ^= 1
    writer = CacheWriter.open(tmp_path / "tampered", reader.meta, reader.fields, reader.total_rows, reader.shard_rows)
    writer.write_shard(0, arrays)
    writer.finish()
    cfg = plain_cfg(tiny, f"cache.path={tmp_path / 'tampered'}")
    with pytest.raises(CacheViewMismatchError, match=r"sample 7 view 0 is not the view the teachers saw.*must be rebuilt"):
        train_student(cfg, tiny["data"], tiny["teacher"], tmp_path / "student")
    # A cache without fingerprints (made before they were stored) is refused up front.
    old = {name: spec for name, spec in reader.fields.items() if name != "view_hash"}
    writer = CacheWriter.open(tmp_path / "old", reader.meta, old, reader.total_rows, reader.shard_rows)
    writer.write_shard(0, {name: arrays[name] for name in old})
    writer.finish()
    with pytest.raises(ValueError, match=r"lacks the fields view_hash; delete the folder"):
        cached_teacher(plain_cfg(tiny, f"cache.path={tmp_path / 'old'}"), tiny["data"], tiny["teacher"])


def test_a_flipped_bit_stops_distillation_naming_the_shard(tiny, plain_cache, tmp_path, capsys) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(plain_cache.path, damaged)
    shard = damaged / "teacher0__text-00000.npy"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    cfg = plain_cfg(tiny, f"cache.path={damaged}", "cache.mode=require")
    with pytest.raises(CacheCorruptError, match=r"shard 0 file teacher0__text-00000\.npy is corrupt: its sha256"):
        train_student(cfg, tiny["data"], tiny["teacher"], tmp_path / "student")
    assert not (tmp_path / "student").exists()
    args = ["distill", str(packaged_config("tiny")), "--out", str(tmp_path / "cli"), "--no-eval",
            "--set", f"teacher.path={tiny['root'] / 'teacher'}", "--set", f"cache.path={damaged}"]
    capsys.readouterr()
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"vldistill: error: teacher cache at {damaged}: shard 0 file teacher0__text-00000\.npy is corrupt: .*", last)


# ---------------------------------------------------------------- batch size probing


def fake_timing(rates: dict, calls: list):
    """A measure function returning (or raising) `rates[size]`, recording each size asked for."""

    def measure(size: int) -> float:
        calls.append(size)
        if isinstance(rates[size], Exception):
            raise rates[size]
        return rates[size]

    return measure


@pytest.mark.parametrize("rates, probed, best", [
    ({64: 100.0, 128: 190.0, 256: 300.0, 512: 310.0, 1024: 900.0}, [64, 128, 256, 512], 512),  # +3%: stop
    ({64: 100.0, 128: 190.0, 256: 300.0, 512: 315.0, 1024: 900.0}, [64, 128, 256, 512, 1024], 1024),  # +5%: go on
    ({64: 100.0, 128: 150.0, 256: 200.0, 512: RuntimeError("CUDA out of memory"), 1024: 900.0}, [64, 128, 256, 512], 256),
    ({64: 100.0, 128: 90.0, 256: 900.0, 512: 900.0, 1024: 900.0}, [64, 128], 64),  # slower: stop, keep 64
    ({64: 100.0, 128: 200.0, 256: 400.0, 512: 800.0, 1024: 1600.0}, [64, 128, 256, 512, 1024], 1024),
])
def test_pick_batch_size_probes_until_no_gain_or_error(rates, probed, best) -> None:
    calls = []
    chosen, measured = pick_batch_size(fake_timing(rates, calls), PROBE_SIZES)
    assert calls == probed and chosen == best
    assert measured == {size: rates[size] for size in probed if not isinstance(rates[size], Exception)}


def test_pick_batch_size_raises_when_the_smallest_batch_fails() -> None:
    with pytest.raises(RuntimeError, match="the teachers failed on a probe batch of 64: out of memory"):
        pick_batch_size(fake_timing({64: RuntimeError("out of memory")}, []), PROBE_SIZES)


def test_auto_batch_size_build_logs_the_choice(tiny, plain_cache, tmp_path, caplog) -> None:
    cfg = plain_cfg(tiny, "cache.batch_size=auto", f"cache.path={tmp_path / 'auto'}")
    caplog.set_level(logging.INFO, logger="vldistill")
    result = build_cache(cfg, tiny["data"], tiny["teacher"], tmp_path / "auto", progress=False)
    [record] = [r for r in caplog.records if r.name == "vldistill.teachers.cache.build"]
    assert record.levelno == logging.INFO
    out = record.getMessage()
    assert re.search(r"cache.batch_size auto: using (64|128|256) \(\d+ images/s; probed 64: \d+", out)
    assert not re.search(r"\b(512|1024): ", out)  # the cache has 256 rows: larger sizes are not probed
    auto, plain = CacheReader.open(result.path), CacheReader.open(plain_cache.path)
    rows = np.arange(plain.total_rows)
    assert np.array_equal(auto.rows("view_hash", rows), plain.rows("view_hash", rows))
    assert np.allclose(auto.rows("teacher0/image", rows), plain.rows("teacher0/image", rows), atol=2 * HALF_ULP)
