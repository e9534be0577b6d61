"""Distillation runs from the other teacher families: a SigLIP primary teacher (its own max-length
padded inputs), and an ensemble of a CLIP teacher with a two-tower teacher over a BERT text encoder
(another tokenizer, image size and embedding size)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_siglip, tiny_vision

from vldistill.config import load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.models.io import read_metadata
from vldistill.models.siglip import SiglipDualEncoder
from vldistill.models.two_tower import TwoTowerDualEncoder
from vldistill.data.pairs import PairCollator
from vldistill.teachers.assemble import teacher_ensemble
from vldistill.train.runs import obtain_teacher, train_student

KD_LOSSES = "distill.losses={clip: {weight: 1.0}, kd: {weight: 1.0}, feature: {weight: 1.0}}"


def test_distill_from_a_siglip_teacher(tmp_path, tokenizer):
    siglip = SiglipDualEncoder(tiny_siglip(tokenizer), tokenizer=tokenizer)
    siglip.save_pretrained(tmp_path / "siglip")
    cfg = load_config(packaged_config("tiny"), [f"teacher.path={tmp_path / 'siglip'}", "student.inherit=false", KD_LOSSES])
    data = load_data(cfg.data, progress=False)
    teacher = obtain_teacher(cfg, data, tmp_path / "unused")
    assert isinstance(teacher.model, SiglipDualEncoder) and teacher.model.input_spec.text_padding == "max_length"
    student = train_student(cfg, data, teacher, tmp_path / "student")
    assert student.result.steps == cfg.distill.train.steps
    assert student.model.model.config.text_config.vocab_size == len(tokenizer)
    assert student.model.input_spec.image_mean == (0.5, 0.5, 0.5)  # the teacher's normalization


def test_distill_from_clip_plus_two_tower_bert_ensemble(tmp_path, bert_dir):
    cfg = load_config(packaged_config("tiny"))
    data = load_data(cfg.data, progress=False)
    obtain_teacher(cfg, data, tmp_path / "clip")  # pretrains the tiny CLIP teacher
    torch.manual_seed(0)
    vision = tiny_vision()
    vision.save_pretrained(tmp_path / "vision")
    two_tower = TwoTowerDualEncoder.from_backbones(str(tmp_path / "vision"), str(bert_dir), projection_dim=24)
    two_tower.save_pretrained(tmp_path / "two_tower")
    cfg = load_config(packaged_config("tiny"), [
        f"teacher.path={tmp_path / 'clip'}",
        f"teacher.ensemble=[{{path: {tmp_path / 'two_tower'}, weight: 1.0}}]",
        "teacher.combine=average",
        KD_LOSSES,
    ])
    primary = obtain_teacher(cfg, data, tmp_path / "unused")
    ensemble, extra = teacher_ensemble(cfg, primary, primary.model.input_spec)
    assert ensemble.input_keys == ["", "teacher1"] and ensemble.embed_dim == 32 + 24
    batch = PairCollator(extra["teacher1"])([(data.train[0].image, "a red circle", None)])
    assert batch["input_ids"][0, 0].item() == 4  # the BERT teacher's own tokenizer: [CLS] first (the CLIP one's bos is 2)
    student = train_student(cfg, data, primary, tmp_path / "student")
    assert student.result.steps == cfg.distill.train.steps
    assert read_metadata(tmp_path / "student")["combine"] == "average"


def test_pretrain_two_tower_heads_then_distill_from_it(tmp_path, bert_dir):
    from vldistill.cli import main
    from vldistill.config import ConfigError

    tiny_vision().save_pretrained(tmp_path / "vision")
    tower = ["--set", f"teacher.two_tower={{vision: {tmp_path / 'vision'}, text: {bert_dir}, projection_dim: 16}}"]
    tiny = str(packaged_config("tiny"))
    assert main(["pretrain-teacher", tiny, "--out", str(tmp_path / "t"), *tower]) == 0
    teacher = TwoTowerDualEncoder.from_pretrained(tmp_path / "t" / "teacher")
    fresh = TwoTowerDualEncoder.from_backbones(str(tmp_path / "vision"), str(bert_dir), projection_dim=16)
    # LiT: the locked text encoder is unchanged, the heads were trained.
    assert all(torch.equal(a, b) for a, b in zip(teacher.text.parameters(), fresh.text.parameters()))
    assert read_metadata(tmp_path / "t" / "teacher")["role"] == "teacher"
    distill = ["--set", f"teacher.path={tmp_path / 't' / 'teacher'}", "--set", "student.inherit=false"]
    assert main(["distill", tiny, "--out", str(tmp_path / "d"), *distill]) == 0
    assert (tmp_path / "d" / "student" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="teacher.two_tower.text is required"):
        load_config(None, [f"teacher.two_tower={{vision: {tmp_path / 'vision'}}}"])
