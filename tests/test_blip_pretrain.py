"""BLIP teachers pretrained here (`teacher.family: blip`): the config's family checks, the retrieval teacher
(ITC + ITM from scratch) and the captioning teacher (LM) trained on the tiny config's shapes and saved as plain
HF BLIP folders, their reuse by fingerprint, and `vldistill pretrain-teacher` writing both."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from accelerate.utils import set_seed
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from vldistill.cli import main
from vldistill.config import ConfigError, load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.losses import LossContext, build_objective
from vldistill.models.blip import BlipRetrievalEncoder
from vldistill.models.blip_caption import BlipCaptioner
from vldistill.models.inputs import inputs_for
from vldistill.models.spec import TowerSpec
from vldistill.teachers.assemble import load_teacher
from vldistill.train.blip_pretrain import (
    CAPTIONING_LOSSES, RETRIEVAL_LOSSES, captioning_fingerprint, new_captioning_teacher, new_retrieval_teacher,
)
from vldistill.train.runs import (
    TEXT_LENGTH, held_out_batch, obtain_captioning_teacher, obtain_teacher, pretrain_teacher, teacher_fingerprint,
)

TINY = packaged_config("tiny")
BLIP = ["teacher.family=blip", "teacher.train.steps=8", "teacher.train.log_every=1"]
DECODER = "teacher.model.decoder={layers: 1, width: 32, heads: 2, mlp_ratio: 2.0}"


def blip_config(*overrides: str):
    return load_config(TINY, [*BLIP, *overrides])


@pytest.fixture(scope="module")
def data():
    return load_data(blip_config().data, progress=False)


# ---------------------------------------------------------------- the config


def test_the_teacher_family_must_be_clip_or_blip():
    assert load_config(TINY).teacher.family == "clip"
    with pytest.raises(ConfigError, match=r"^teacher\.family must be one of clip, blip, got 'siglip'$"):
        load_config(TINY, ["teacher.family=siglip"])


def test_a_blip_teachers_fusion_layers_are_its_text_layers():
    text = "{layers: 2, width: 32, heads: 2, mlp_ratio: 2.0}"
    same = load_config(TINY, ["teacher.family=blip", f"teacher.model.fusion={text}"])
    assert same.teacher.retrieval_spec().fusion == same.teacher.model.text
    assert blip_config().teacher.retrieval_spec().fusion == TowerSpec(layers=2, width=32, heads=2, mlp_ratio=2.0)
    with pytest.raises(ConfigError, match=r"teacher\.model\.fusion .* must be null or equal teacher\.model\.text .*: "
                                          r"BLIP's fusion layers are its text encoder's layers"):
        load_config(TINY, ["teacher.family=blip", "teacher.model.fusion={layers: 1, width: 32, heads: 2}"])


def test_the_decoder_defaults_to_the_text_spec_and_a_clip_teacher_has_none():
    assert blip_config().teacher.decoder_spec() == blip_config().teacher.model.text
    assert blip_config(DECODER).teacher.decoder_spec() == TowerSpec(layers=1, width=32, heads=2, mlp_ratio=2.0)
    assert blip_config(DECODER).teacher.retrieval_spec().decoder is None  # the retrieval teacher has no decoder
    with pytest.raises(ConfigError, match=r"teacher\.model\.decoder is set, but a CLIP teacher has no decoder module"):
        load_config(TINY, [DECODER])


def test_a_two_tower_teacher_cannot_be_blip():
    with pytest.raises(ConfigError, match=r"teacher\.two_tower is a CLIP-style teacher: it cannot be pretrained as "
                                          r"teacher\.family blip"):
        load_config(TINY, ["teacher.family=blip", "teacher.two_tower={vision: v, text: t}"])


# ---------------------------------------------------------------- the retrieval teacher


@pytest.fixture(scope="module")
def retrieval(data, tmp_path_factory):
    """The tiny config's BLIP retrieval teacher after 8 steps (built once; tests must not change it)."""
    out = tmp_path_factory.mktemp("blip-teacher")
    return pretrain_teacher(blip_config(), data, out / "teacher", out / "logs", progress=False)


def itc_itm_loss(model: BlipRetrievalEncoder, batch: dict) -> float:
    """ITC + ITM of `model` in eval mode on `batch` (its own hard negatives)."""
    objective = build_objective(RETRIEVAL_LOSSES, LossContext(model.embed_dim))
    with torch.no_grad():
        loss, _ = objective(model.eval()(**batch, output_itm=True), None)
    return float(loss)


def test_pretraining_lowers_the_retrieval_teachers_itc_and_itm_loss(retrieval, data):
    cfg = blip_config()
    history = retrieval.result.history
    assert [h["step"] for h in history] == list(range(1, 9))
    assert history[-1]["loss/total"] < history[0]["loss/total"]
    assert history[-1]["loss/itm"] < history[0]["loss/itm"]
    for h in history:
        assert h["loss/total"] == pytest.approx(h["loss/clip"] + h["loss/itm"], rel=1e-5)
    # the same initialization as the run's, scored before and after on a fixed held-out batch
    set_seed(cfg.seed)
    fresh = new_retrieval_teacher(cfg, retrieval.tokenizer, TEXT_LENGTH)
    preprocess = BatchPreprocessor.for_model(retrieval.tokenizer, fresh.input_spec)
    batch = inputs_for(held_out_batch(data, preprocess, 32, seed=0), "")
    assert itc_itm_loss(retrieval.model, batch) < itc_itm_loss(fresh, batch) - 0.02


def test_the_retrieval_teacher_is_a_plain_blip_folder(retrieval, data):
    cfg, folder = blip_config(), retrieval.path
    plain = BlipForImageTextRetrieval.from_pretrained(folder)
    vision, text = plain.config.vision_config, plain.config.text_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads, vision.intermediate_size) == (2, 32, 2, 64)
    assert (vision.image_size, vision.patch_size, vision.initializer_range) == (16, 8, 0.02)
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.max_position_embeddings) == (2, 32, 64, 32)
    assert plain.config.image_text_hidden_size == 32
    tokenizer = retrieval.tokenizer
    assert (text.vocab_size, text.pad_token_id) == (len(tokenizer), tokenizer.pad_token_id)
    # the text encoder reads the first token as BLIP's [CLS]: every text starts with the tokenizer's BOS
    assert (text.bos_token_id, text.sep_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert tokenizer(["a red circle"])["input_ids"][0][0] == tokenizer.bos_token_id
    for name, value in retrieval.model.model.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], value)
    metadata = json.loads((folder / "vldistill.json").read_text())
    assert metadata["role"] == "teacher" and metadata["fingerprint"] == teacher_fingerprint(cfg, data)
    loaded = load_teacher(str(folder))
    assert isinstance(loaded.model, BlipRetrievalEncoder) and len(loaded.tokenizer) == len(tokenizer)
    assert (folder.parent / "logs" / "teacher.jsonl").is_file()


def test_obtain_teacher_reuses_a_matching_blip_teacher_whatever_the_decoder(retrieval, data, caplog):
    weights = retrieval.path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="vldistill"):
        reused = obtain_teacher(blip_config(DECODER), data, retrieval.path, progress=False)
    assert reused.result is None and weights.stat().st_mtime_ns == before  # loaded, not trained
    assert "reusing the teacher in" in caplog.text
    assert isinstance(reused.model, BlipRetrievalEncoder)
    # a CLIP teacher of the same spec is another teacher
    assert teacher_fingerprint(load_config(TINY, BLIP[1:]), data) != teacher_fingerprint(blip_config(), data)


# ---------------------------------------------------------------- the captioning teacher


@pytest.fixture(scope="module")
def captioner(data, tmp_path_factory):
    """The tiny config's BLIP captioning teacher with a 1-layer decoder after 8 steps (built once)."""
    out = tmp_path_factory.mktemp("blip-captioner")
    return obtain_captioning_teacher(blip_config(DECODER), data, out / "captioner", out / "logs", progress=False)


def test_pretraining_lowers_the_captioning_teachers_lm_loss(captioner, data):
    cfg = blip_config(DECODER)
    history = captioner.result.history
    assert len(history) == 8 and history[-1]["loss/lm"] < history[0]["loss/lm"] - 0.1
    set_seed(cfg.seed)
    fresh = new_captioning_teacher(cfg, captioner.tokenizer, TEXT_LENGTH)
    preprocess = BatchPreprocessor.for_model(captioner.tokenizer, fresh.input_spec)
    batch = inputs_for(held_out_batch(data, preprocess, 32, seed=0), "")
    objective = build_objective(CAPTIONING_LOSSES, LossContext(0))
    with torch.no_grad():
        losses = [float(objective(model.eval()(**batch), None)[0]) for model in (fresh, captioner.model)]
    assert losses[1] < losses[0] - 0.1


def test_the_captioning_teacher_loads_in_plain_transformers_and_generates(captioner, data):
    folder, tokenizer = captioner.path, captioner.tokenizer
    plain = BlipForConditionalGeneration.from_pretrained(folder).eval()
    vision, text = plain.config.vision_config, plain.config.text_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.patch_size, vision.initializer_range) == (2, 32, 8, 0.02)
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size) == (1, 32, 2, 64)
    assert (text.vocab_size, text.bos_token_id, text.sep_token_id) == (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    metadata = json.loads((folder / "vldistill.json").read_text())
    assert metadata["role"] == "teacher" and metadata["fingerprint"] == captioning_fingerprint(blip_config(DECODER), data)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = plain.generate(pixel_values=pixels, max_new_tokens=6, do_sample=False)
    assert ids.shape[0] == 2 and 2 <= ids.shape[1] <= 7
    assert bool((ids[:, 0] == tokenizer.bos_token_id).all()) and int(ids.max()) < len(tokenizer)
    loaded = load_teacher(str(folder))
    assert isinstance(loaded.model, BlipCaptioner)
    captions = loaded.model.generate_captions(pixels, max_length=6)
    assert len(captions) == 2 and all(word in tokenizer.get_vocab() for c in captions for word in c.split())


def test_a_matching_captioning_teacher_is_reused_and_a_new_decoder_retrains(captioner, data, caplog):
    weights = captioner.path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="vldistill"):
        reused = obtain_captioning_teacher(blip_config(DECODER), data, captioner.path, progress=False)
    assert reused.result is None and weights.stat().st_mtime_ns == before
    assert "reusing the captioning teacher in" in caplog.text
    assert isinstance(reused.model, BlipCaptioner)
    two_layers = blip_config(DECODER.replace("layers: 1", "layers: 2"), "teacher.train.steps=2")
    assert captioning_fingerprint(two_layers, data) != captioning_fingerprint(blip_config(DECODER), data)
    folder = captioner.path.parent / "other"
    (captioner.path.parent / "other").mkdir()
    (folder / "vldistill.json").write_text((captioner.path / "vldistill.json").read_text())  # the old fingerprint
    retrained = obtain_captioning_teacher(two_layers, data, folder, progress=False)
    assert retrained.result is not None and retrained.result.steps == 2
    assert BlipForConditionalGeneration.from_pretrained(folder).config.text_config.num_hidden_layers == 2


# ---------------------------------------------------------------- the command


def test_pretrain_teacher_writes_the_retrieval_and_the_captioning_teacher(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain-teacher", str(TINY), "--out", str(out), "--quiet", "--set", "teacher.family=blip",
            "--set", "teacher.train.steps=2", "--set", "teacher.train.batch_size=8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"teacher saved to {out / 'teacher'}" in printed
    assert f"captioning teacher saved to {out / 'teacher-captioner'}" in printed
    assert isinstance(load_teacher(str(out / "teacher")).model, BlipRetrievalEncoder)
    assert isinstance(load_teacher(str(out / "teacher-captioner")).model, BlipCaptioner)
    assert sorted(p.name for p in (out / "logs").glob("*.jsonl")) == ["captioner.jsonl", "teacher.jsonl"]


def test_a_clip_config_has_no_captioning_teacher(data, tmp_path):
    with pytest.raises(ValueError, match=r"^a captioning teacher is pretrained for teacher\.family blip, not 'clip'$"):
        obtain_captioning_teacher(load_config(TINY), data, tmp_path / "captioner", progress=False)
    assert not (tmp_path / "captioner").exists()
