"""`vldistill distill` with a BLIP retrieval teacher builds a BLIP student from `student.model` (per module,
inheriting when `student.inherit`), trains it with the task and distillation losses of both heads, saves a
plain HF BLIP folder with its model card, and `vldistill eval` scores it; the teacher cache serves its
embeddings and ITM logits and refuses its fusion layers; a captioning teacher builds a captioning student instead
(tests/test_blip_caption_distill.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import bert_word_tokenizer, tiny_blip, tiny_captioner
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from vldistill.cli import main
from vldistill.config import ConfigError, load_config, packaged_config
from vldistill.models.blip import BlipRetrievalEncoder
from vldistill.models.blip_caption import BlipCaptioner
from vldistill.models.contract import BuildsStudents
from vldistill.models.loading import load_dual_encoder_any
from vldistill.teachers.assemble import load_teacher
from vldistill.teachers.cache.cached import serve_from_cache
from vldistill.train.runs import build_student, plan_student_run

TINY = str(packaged_config("tiny"))
LOSSES = "distill.losses={clip: {}, itm: {}, kd: {}, itm_kd: {}}"


@pytest.fixture(scope="module")
def blip_teacher(tmp_path_factory) -> Path:
    """A saved tiny BlipForImageTextRetrieval over the tiny config's 16x16 shapes, with a BERT-style word
    tokenizer over their words (built once; tests must not change it)."""
    folder = tmp_path_factory.mktemp("blip") / "teacher"
    return tiny_blip(bert_word_tokenizer(), seed=0).save_pretrained(folder, {"role": "teacher"})


def tiny_config(teacher: Path, *overrides: str):
    return load_config(TINY, [f"teacher.path={teacher}", *overrides])


def distill_args(out: Path, teacher: Path, *extra: str) -> list[str]:
    return ["distill", TINY, "--out", str(out), "--quiet", "--set", f"teacher.path={teacher}", "--set", LOSSES,
            "--set", "distill.train.steps=2", "--set", "distill.train.batch_size=8",
            "--set", "distill.train.log_every=1", *extra]


def test_a_blip_teacher_builds_a_blip_student_per_module_inheriting_its_layers(blip_teacher):
    cfg = tiny_config(blip_teacher)
    primary = load_teacher(str(blip_teacher))
    assert isinstance(primary.model, BuildsStudents)
    student = build_student(cfg, primary, inherit=True)
    assert isinstance(student, BlipRetrievalEncoder) and isinstance(student.model, BlipForImageTextRetrieval)
    vision, text = student.model.config.vision_config, student.model.config.text_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads, vision.intermediate_size) == (1, 16, 1, 32)
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size) == (1, 16, 1, 32)
    assert student.embed_dim == 16 and student.input_spec == primary.model.input_spec
    assert student.tokenizer is primary.tokenizer
    # student layer 0 of each module is the teacher's last layer (every k-th, ending at the last), leading channels
    teacher_state, student_state = primary.model.model.state_dict(), student.model.state_dict()
    for key in ("vision_model.encoder.layers.{}.mlp.fc1.weight", "text_encoder.encoder.layer.{}.crossattention.self.query.weight"):
        torch.testing.assert_close(student_state[key.format(0)], teacher_state[key.format(1)][: 32 if "fc1" in key else 16, :16])
    fresh = build_student(cfg, primary, inherit=False)
    assert not torch.equal(fresh.model.itm_head.weight, student.model.itm_head.weight)
    torch.testing.assert_close(student.model.itm_head.weight, primary.model.model.itm_head.weight[:, :16])


def test_the_teacher_cache_serves_itm_and_refuses_fusion_layers(blip_teacher, tmp_path, caplog):
    fusion = "distill.losses={itm_kd: {}, hidden: {towers: [fusion]}}"
    cfg = tiny_config(blip_teacher, f"cache.path={tmp_path / 'cache'}", fusion)
    refused = r"distill\.losses\.hidden needs the teacher's fusion_hidden_states.*, which a cache does not store: per-layer maps"
    assert not serve_from_cache(cfg.cache, cfg.distill.loss_specs, cfg.distill.weighting)  # auto: run online
    assert re.search(refused, caplog.text)
    cfg = tiny_config(blip_teacher, f"cache.path={tmp_path / 'cache'}", "cache.mode=require", fusion)
    with pytest.raises(ConfigError, match=refused):
        plan_student_run(cfg, None, load_teacher(str(blip_teacher)), tmp_path / "student")  # decided before data
    served = tiny_config(blip_teacher, f"cache.path={tmp_path / 'cache'}", LOSSES)
    assert serve_from_cache(served.cache, served.distill.loss_specs, served.distill.weighting)


def test_a_captioning_teacher_builds_a_captioning_student_not_a_retrieval_one(tmp_path):
    folder = tiny_captioner(bert_word_tokenizer(), seed=0).save_pretrained(tmp_path / "captioner")
    student = build_student(tiny_config(folder), load_teacher(str(folder)), inherit=False)
    assert isinstance(student, BlipCaptioner) and isinstance(student.model, BlipForConditionalGeneration)
    assert not isinstance(student, BlipRetrievalEncoder)


def test_a_blip_student_distills_from_the_teacher_cache_of_its_embeddings_and_itm(blip_teacher, tmp_path):
    """The cache holds the BLIP teacher's ITC embeddings and ITM logits: kd and itm_kd read them, the ITM task
    loss needs no teacher."""
    cache = tmp_path / "cache"
    assert main(["cache", TINY, "--quiet", "--set", f"teacher.path={blip_teacher}", "--out", str(cache)]) == 0
    out = tmp_path / "run"
    assert main(distill_args(out, blip_teacher, "--no-eval", "--set", f"cache.path={cache}", "--set", "cache.mode=require",
                             "--set", LOSSES)) == 0
    assert json.loads((out / "student" / "vldistill.json").read_text())["teacher_cache"] == str(cache)
    steps = [json.loads(line) for line in (out / "logs" / "distill.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s["loss/kd"] >= 0 and 0.5 < s["loss/itm"] < 1.0 and s["loss/itm_kd"] > 0 for s in steps)


@pytest.fixture(scope="module")
def blip_run(blip_teacher, tmp_path_factory) -> Path:
    """The folder of a 2-step `vldistill distill` of the tiny config's student from the BLIP teacher with the
    ITC and ITM task and distillation losses, in micro-batches of 4, evaluated beside the teacher (built once;
    tests must not change it)."""
    out = tmp_path_factory.mktemp("blip-run") / "run"
    assert main(distill_args(out, blip_teacher, "--set", "distill.train.accumulation_steps=2")) == 0
    return out


def test_distill_summarizes_the_blip_student_beside_its_teacher(blip_run):
    summary = json.loads((blip_run / "summary.json").read_text())
    teacher, student = summary["models"]["teacher"], summary["models"]["student"]
    assert summary["steps"] == 2 and student["params"] < teacher["params"]
    assert summary["compression"] == pytest.approx(teacher["params"] / student["params"], rel=1e-3)
    for model in (teacher, student):
        assert 0 <= model["image_retrieval_recall@1"] <= 1 and 0 <= model["text_retrieval_recall@1"] <= 1
    assert (blip_run / "report.html").is_file()


def test_distill_logs_finite_itc_and_itm_losses_every_step(blip_run):
    steps = [json.loads(line) for line in (blip_run / "logs" / "distill.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for step in steps:
        parts = [step[f"loss/{name}"] for name in ("clip", "itm", "kd", "itm_kd")]
        assert all(torch.isfinite(torch.tensor(parts)))
        # ITM cross-entropy of a nearly untrained head over 1 positive and 2 negatives per pair: about ln 2
        assert 0.5 < step["loss/itm"] < 1.0 and step["loss/itm_kd"] >= 0
        assert step["loss/total"] == pytest.approx(sum(parts), rel=1e-5)


def test_the_student_is_a_plain_blip_folder_with_its_card_that_loads_back(blip_run):
    folder = blip_run / "student"
    plain = BlipForImageTextRetrieval.from_pretrained(folder)  # a plain transformers folder
    assert plain.config.vision_config.hidden_size == 16 and plain.config.text_config.num_hidden_layers == 1
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_processor_type"] == "BlipImageProcessor"
    metadata = json.loads((folder / "vldistill.json").read_text())
    assert metadata["architecture"] == "BlipForImageTextRetrieval" and metadata["inherit"] is True
    assert metadata["params"] == sum(p.numel() for p in plain.parameters()) < metadata["teacher_params"]
    card = (folder / "README.md").read_text()
    assert "BlipForImageTextRetrieval.from_pretrained" in card and "CLIPModel" not in card
    assert "pipeline_tag:" not in card and "- blip\n" in card  # no transformers pipeline runs BLIP retrieval
    model, tokenizer = load_dual_encoder_any(folder)
    assert isinstance(model, BlipRetrievalEncoder) and tokenizer.cls_token == "[CLS]"
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[name], value)


def test_eval_scores_the_saved_blip_student(blip_run, tmp_path):
    folder = blip_run / "student"
    assert main(["eval", str(folder), "--config", TINY, "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    record = json.loads((tmp_path / "eval" / "student_zeroshot_retrieval.json").read_text())
    assert (record["model"], record["images"], record["captions"]) == ("student", 96, 96)
    for way in ("image", "text"):
        recalls = [record["metrics"][f"{way}_retrieval_recall@{k}"] for k in (1, 5, 10)]
        assert 0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1 and recalls[2] > 0


def test_the_student_of_a_blip_run_is_saved_the_same_with_and_without_accumulation(blip_teacher, tmp_path):
    """Two micro-batches of 4 take the step one batch of 8 takes (the contrastive losses see the whole window)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(distill_args(whole, blip_teacher, "--no-eval", "--set", "distill.losses={clip: {}, kd: {}}")) == 0
    assert main(distill_args(split, blip_teacher, "--no-eval", "--set", "distill.losses={clip: {}, kd: {}}",
                             "--set", "distill.train.accumulation_steps=2")) == 0
    logged = [[json.loads(line)["loss/total"] for line in (run / "logs" / "distill.jsonl").read_text().splitlines()]
              for run in (whole, split)]
    assert logged[1] == pytest.approx(logged[0], rel=1e-5)
    a = BlipForImageTextRetrieval.from_pretrained(whole / "student").state_dict()
    b = BlipForImageTextRetrieval.from_pretrained(split / "student").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    inherited = build_student(tiny_config(blip_teacher), load_teacher(str(blip_teacher)), inherit=True).model.state_dict()
    assert not torch.allclose(a["vision_proj.weight"], inherited["vision_proj.weight"])  # the runs did train
