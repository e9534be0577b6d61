"""`vldistill eval MODEL` on every supported folder kind (a CLIP student distilled from a SigLIP teacher,
a SigLIP model, a two-tower model): each is loaded through the adapter registry and scored with the
inputs of its own input spec (image mean/std, text length and padding), giving the records that
evaluating the model in memory gives."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import SIGLIP_TEXT_LENGTH, tiny_siglip, tiny_vision
from torch.testing import assert_close
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vldistill.cli import main
from vldistill.config import load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.eval.results import read_result
from vldistill.eval.suite import evaluate_model
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.inputs import CLIP_MEAN, CLIP_STD
from vldistill.models.siglip import SiglipDualEncoder
from vldistill.models.two_tower import TwoTowerDualEncoder
from vldistill.train.runs import obtain_teacher, train_student

TINY = str(packaged_config("tiny"))
TASKS = ("zeroshot_retrieval", "zeroshot_classification")


def normalized_by_hand(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (N, H, W, 3) images as (N, 3, H, W) floats: x / 255, minus `mean`, over `std`, per channel."""
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def spy_on(monkeypatch, cls) -> dict[str, list]:
    """Record what `cls.encode_image` / `cls.encode_text` receive and return, on every instance."""
    seen = {"pixels": [], "images": [], "input_ids": []}
    encode_image, encode_text = cls.encode_image, cls.encode_text

    def image(self, pixel_values):
        embeds = encode_image(self, pixel_values)
        seen["pixels"].append(pixel_values.clone())
        seen["images"].append(embeds.detach().clone())
        return embeds

    def text(self, input_ids, attention_mask=None):
        seen["input_ids"].append(input_ids.clone())
        return encode_text(self, input_ids, attention_mask)

    monkeypatch.setattr(cls, "encode_image", image)
    monkeypatch.setattr(cls, "encode_text", text)
    return seen


def eval_through_cli(folder, out, capsys) -> tuple[dict[str, dict], int]:
    """Run `vldistill eval FOLDER --config tiny`; the records it wrote and the parameter count it printed."""
    assert main(["eval", str(folder), "--config", TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    params = int(re.search(r"^([\d,]+) parameters", printed, re.MULTILINE).group(1).replace(",", ""))
    return {task: read_result(out / f"{folder.name}_{task}.json") for task in TASKS}, params


def same_records(found: dict[str, dict], model, tokenizer, data, cfg) -> None:
    """The metrics of `found` are those of evaluating `model` in memory on the same data."""
    expected = evaluate_model(model, tokenizer, data, cfg.eval, "in_memory", progress=False)["records"]
    assert set(expected) == set(TASKS)
    for task in TASKS:
        assert found[task]["metrics"] == expected[task]["metrics"]
    per_class = found["zeroshot_classification"]["per_class"]
    assert per_class == expected["zeroshot_classification"]["per_class"]
    assert [entry["class"] for entry in per_class] == data.classnames
    assert sum(entry["samples"] for entry in per_class) == len(data.zeroshot.labels)
    present = [entry["acc1"] for entry in per_class if entry["samples"]]
    assert sum(present) / len(present) == pytest.approx(found["zeroshot_classification"]["metrics"]["mean_per_class_recall"])


def test_eval_scores_a_siglip_teacher_student_with_siglip_normalization(tmp_path, tokenizer, monkeypatch, capsys):
    SiglipDualEncoder(tiny_siglip(tokenizer), tokenizer=tokenizer).save_pretrained(tmp_path / "siglip")
    cfg = load_config(TINY, [f"teacher.path={tmp_path / 'siglip'}", "student.inherit=false", "distill.train.steps=2"])
    data = load_data(cfg.data, progress=False)
    student = train_student(cfg, data, obtain_teacher(cfg, data, tmp_path / "unused"), tmp_path / "student")
    processor = json.loads((tmp_path / "student" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == processor["image_std"] == [0.5, 0.5, 0.5]  # SigLIP's, saved with the student

    seen = spy_on(monkeypatch, CLIPDualEncoder)
    records, params = eval_through_cli(tmp_path / "student", tmp_path / "results", capsys)
    first = seen["pixels"][0]  # the first batch of test images, as the loaded student received them
    siglip_normalized = normalized_by_hand(data.test.images[: len(first)], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert_close(first, siglip_normalized)
    assert (first - normalized_by_hand(data.test.images[: len(first)], CLIP_MEAN, CLIP_STD)).abs().max() > 0.1
    assert max(ids.shape[1] for ids in seen["input_ids"]) <= SIGLIP_TEXT_LENGTH  # the teacher's text length
    with torch.no_grad():  # the loaded student is the one trained
        assert_close(student.model.eval().encode_image(first), seen["images"][0])
    assert params == sum(p.numel() for p in student.model.parameters())
    same_records(records, student.model, student.tokenizer, data, cfg)


def test_eval_of_a_siglip_folder_uses_its_normalization_and_full_length_texts(tmp_path, tokenizer, monkeypatch, capsys):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    siglip = SiglipDualEncoder(tiny_siglip(tokenizer), mean, std, tokenizer=tokenizer)
    siglip.save_pretrained(tmp_path / "siglip")
    seen = spy_on(monkeypatch, SiglipDualEncoder)
    records, params = eval_through_cli(tmp_path / "siglip", tmp_path / "results", capsys)
    data = load_data(load_config(TINY).data, progress=False)
    first = seen["pixels"][0]
    assert_close(first, normalized_by_hand(data.test.images[: len(first)], mean, std))
    assert {ids.shape[1] for ids in seen["input_ids"]} == {SIGLIP_TEXT_LENGTH}  # padded to the full length
    assert params == sum(p.numel() for p in siglip.parameters())
    same_records(records, siglip, tokenizer, data, load_config(TINY))


def test_eval_of_a_two_tower_folder(tmp_path, bert_dir, monkeypatch, capsys):
    mean, std = (0.1, 0.2, 0.3), (0.3, 0.3, 0.3)
    vision = tmp_path / "vision"
    tiny_vision().save_pretrained(vision)
    CLIPImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=list(mean), image_std=list(std)
    ).save_pretrained(vision)
    torch.manual_seed(0)
    model = TwoTowerDualEncoder.from_backbones(vision, bert_dir, projection_dim=8).eval()
    model.save_pretrained(tmp_path / "two_tower")
    seen = spy_on(monkeypatch, TwoTowerDualEncoder)
    records, params = eval_through_cli(tmp_path / "two_tower", tmp_path / "results", capsys)
    data = load_data(load_config(TINY).data, progress=False)
    first = seen["pixels"][0]
    assert_close(first, normalized_by_hand(data.test.images[: len(first)], mean, std))
    assert all(ids[:, 0].eq(model.tokenizer.cls_token_id).all() for ids in seen["input_ids"])  # its own tokenizer
    assert params == sum(p.numel() for p in model.parameters())  # backbones, heads and logit scale
    same_records(records, model, model.tokenizer, data, load_config(TINY))
