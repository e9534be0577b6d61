"""Int8 students (models/quantized.py, export/quantize.py, train/qat.py, `vldistill quantize`): int8 embeddings
close to fp32, the simulation used for QAT computing what the int8 kernels compute, the folder round trip, the
accuracy gate, and QAT + distillation through the training loop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from helpers import SMALL_SPEC, build_clip, config_for
from torch import nn

from vldistill.cli import main
from vldistill.config import load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.export.quantize import (
    QuantSimLinear, acc1_drop, check_max_drop, convert_qat, fake_quantize_activation, fake_quantize_weight,
    folder_bytes, load_quantized, prepare_qat,
)
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.io import read_metadata
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.quantized import Int8CLIPDualEncoder, Int8Recipe
from vldistill.train.qat import qat_config, train_qat
from vldistill.train.runs import obtain_teacher

TINY = str(packaged_config("tiny"))
RECIPES = [Int8Recipe("per-tensor"), Int8Recipe("per-channel")]


def embed(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of `batch` without gradients, the model in eval mode."""
    model.eval()
    with torch.no_grad():
        return model.encode_image(batch["pixel_values"]), model.encode_text(batch["input_ids"], batch["attention_mask"])


def linear_count(module: nn.Module) -> int:
    return sum(type(m) is nn.Linear for m in module.modules())


@pytest.fixture
def student(tokenizer):
    return build_clip(config_for(SMALL_SPEC, tokenizer), seed=1).eval()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.granularity)
def test_int8_embeddings_stay_close_to_fp32(teacher, make_batch, recipe):
    batch = make_batch(16)
    int8 = Int8CLIPDualEncoder.from_float(teacher, recipe)
    assert linear_count(int8.model) == 0
    assert sum(isinstance(m, nnqd.Linear) for m in int8.model.modules()) == linear_count(teacher.model)
    assert linear_count(teacher.model) > 0  # the float model is left as it was
    for fp32, quantized in zip(embed(teacher, batch), embed(int8, batch)):
        # measured on this tiny CLIP: min cosine 0.9998 (images) and 0.9979 (texts); max abs diff 1e-2 to 3e-2
        assert F.cosine_similarity(fp32, quantized).min() > 0.99
        assert (fp32 - quantized).abs().max() > 1e-3  # the weights really were rounded
    assert int8.num_parameters() == teacher.num_parameters()
    assert int8.architecture_spec() == teacher.architecture_spec() and int8.inheritable_clip() is None


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.granularity)
def test_the_qat_simulation_computes_what_the_int8_kernels_do(teacher, make_batch, recipe):
    """The float layers QAT trains compute the int8 model's embeddings to float rounding (1e-7 measured),
    where fp32 lies 1e-2 away: training sees the numbers the shipped model will produce."""
    batch = make_batch(16)
    simulated = prepare_qat(teacher, recipe)
    assert linear_count(simulated.model) == 0 and linear_count(teacher.model) > 0
    assert sum(isinstance(m, QuantSimLinear) for m in simulated.model.modules()) == linear_count(teacher.model)
    int8 = Int8CLIPDualEncoder.from_float(teacher, recipe)
    for sim, quantized in zip(embed(simulated, batch), embed(int8, batch)):
        assert torch.allclose(sim, quantized, atol=1e-5)


def test_fake_quantization_by_hand():
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0], requires_grad=True)
    # range [-1, 2] over 127 steps: scale 3/127, zero point round(127/3) = 42
    scale = 3 / 127
    expected = torch.tensor([-42, 0, round(0.5 / scale), 127 - 42]) * scale
    found = fake_quantize_activation(x)
    assert torch.allclose(found, expected, atol=1e-6)
    found.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))  # straight through
    w = torch.tensor([[1.0, -0.5], [0.25, 0.1]])
    # per tensor: scale 1/127.5; 1.0 -> 127.5 rounds to 128, clamped to 127; -0.5 -> -64; 0.25 -> 32; 0.1 -> 13
    assert torch.allclose(fake_quantize_weight(w, False), torch.tensor([[127, -64], [32, 13]]) / 127.5, atol=1e-7)
    # per channel: row 2 has its own scale 0.25/127.5: 0.25 -> 127 (clamped), 0.1 -> 51
    per_row = torch.tensor([[127 / 127.5, -64 / 127.5], [127 * 0.25 / 127.5, 51 * 0.25 / 127.5]])
    assert torch.allclose(fake_quantize_weight(w, True), per_row, atol=1e-7)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.granularity)
def test_the_folder_loads_back_as_the_same_int8_model(teacher, tokenizer, make_batch, recipe, tmp_path):
    int8 = Int8CLIPDualEncoder.from_float(teacher, recipe)
    folder = int8.save_pretrained(tmp_path / "int8", {"role": "test"}, tokenizer=tokenizer)
    fp32_folder = teacher.save_pretrained(tmp_path / "fp32", tokenizer=tokenizer)
    loaded, loaded_tokenizer = load_quantized(folder)
    generic, _ = load_dual_encoder_any(folder)  # what `vldistill eval DIR` loads
    assert type(generic) is Int8CLIPDualEncoder and loaded.recipe == recipe and read_metadata(folder) == {"role": "test"}
    assert loaded.input_spec == int8.input_spec
    assert loaded_tokenizer("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]
    batch = make_batch(8)
    for expected, found, again in zip(embed(int8, batch), embed(loaded, batch), embed(generic, batch)):
        assert torch.equal(expected, found) and torch.equal(expected, again)
    assert folder_bytes(folder) < 0.6 * folder_bytes(fp32_folder)
    with pytest.raises(ValueError, match="not an int8 model"):
        load_quantized(fp32_folder)


def test_a_damaged_int8_folder_fails_naming_the_tensor(teacher, tokenizer, tmp_path):
    folder = Int8CLIPDualEncoder.from_float(teacher).save_pretrained(tmp_path / "int8", tokenizer=tokenizer)
    tensors = load_file(str(folder / "model.int8.safetensors"))
    del tensors["logit_scale"]
    save_file(tensors, str(folder / "model.int8.safetensors"))
    with pytest.raises(FileNotFoundError, match="lacks logit_scale"):
        load_quantized(folder)


def test_the_gate_decision_and_its_inputs():
    figures = {"fp32": {"acc1": 0.80}, "int8": {"acc1": 0.785}}
    assert acc1_drop(figures, "int8") == pytest.approx(0.015)
    with pytest.raises(ValueError, match="needs zero-shot acc1"):
        acc1_drop({"fp32": {"acc1": None}, "int8": {"acc1": None}}, "int8")
    for bad in (1.5, -2.0):
        with pytest.raises(ValueError, match="--max-drop"):
            check_max_drop(bad)


def test_the_command_refuses_an_impossible_max_drop_and_accepts_a_generous_one(teacher, tokenizer, tmp_path, capsys):
    fp32 = teacher.save_pretrained(tmp_path / "fp32", tokenizer=tokenizer)
    base = ["quantize", str(fp32), "--method", "dynamic-int8", "--config", TINY]
    # -1: int8 would have to beat fp32 by 100 points of accuracy
    refused = ["--out", str(tmp_path / "refused"), "--max-drop", "-1", "--report", str(tmp_path / "refused.json")]
    assert main([*base, *refused]) == 1
    printed = capsys.readouterr().out
    assert "REFUSED" in printed and "fp32" in printed and "int8" in printed
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))  # nothing, not even staging
    report = json.loads((tmp_path / "refused.json").read_text())
    assert not report["accepted"] and report["out"] is None and report["max_drop"] == -1
    assert report["acc1_drop"] == pytest.approx(report["figures"]["fp32"]["acc1"] - report["figures"]["int8"]["acc1"])
    assert main([*base, "--out", str(tmp_path / "int8"), "--max-drop", "1", "--granularity", "per-channel"]) == 0
    assert "accepted" in capsys.readouterr().out
    report = read_metadata(tmp_path / "int8")["quantization"]
    assert report["accepted"] and report["candidate"] == "int8" and report["recipe"]["granularity"] == "per-channel"
    assert report["out"] == str(tmp_path / "int8")
    assert set(report["figures"]) == {"fp32", "int8"}
    for key in ("acc1", "image_retrieval_recall@1", "latency_ms_p50", "images_per_second", "size_bytes"):
        assert report["figures"]["int8"][key] is not None
    assert report["figures"]["int8"]["size_bytes"] < report["figures"]["fp32"]["size_bytes"]
    assert report["acc1_drop"] == pytest.approx(report["figures"]["fp32"]["acc1"] - report["figures"]["int8"]["acc1"])
    assert main(["eval", str(tmp_path / "int8"), "--config", TINY, "--out", str(tmp_path / "results")]) == 0


def test_qat_trains_through_the_loop_and_converts(teacher, student, tokenizer, tmp_path):
    teacher_dir = teacher.save_pretrained(tmp_path / "teacher", tokenizer=tokenizer)
    cfg = qat_config(load_config(TINY, [f"teacher.path={teacher_dir}", "distill.train.log_every=1"]), steps=3, lr=1e-3)
    assert (cfg.distill.train.steps, cfg.distill.train.lr, cfg.distill.train.warmup_steps) == (3, 1e-3, 0)
    data = load_data(cfg.data, progress=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    int8, result = train_qat(cfg, data, obtain_teacher(cfg, data, tmp_path), student, tmp_path / "qat", progress=False)
    assert result.steps == 3 and [r["step"] for r in result.history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in result.history)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # the given student is untouched
    assert linear_count(int8.model) == 0
    assert sum(isinstance(m, nnqd.Linear) for m in int8.model.modules()) == linear_count(student.model)
    # trained: the float tensors moved, and so did the int8 weights beyond what rounding the old ones gives
    assert not torch.equal(int8.model.vision_model.post_layernorm.weight, student.model.vision_model.post_layernorm.weight)
    ptq = Int8CLIPDualEncoder.from_float(student)
    fc1 = [m.model.vision_model.encoder.layers[0].mlp.fc1.weight().int_repr() for m in (int8, ptq)]
    assert not torch.equal(*fc1)


def test_qat_command_ships_the_fine_tuned_int8_model(teacher, student, tokenizer, tmp_path):
    teacher_dir = teacher.save_pretrained(tmp_path / "teacher", tokenizer=tokenizer)
    student_dir = student.save_pretrained(tmp_path / "student", {"role": "student"}, tokenizer=tokenizer)
    args = ["quantize", str(student_dir), "--method", "qat", "--out", str(tmp_path / "qat"), "--max-drop", "1",
            "--steps", "2", "--config", TINY, "--set", f"teacher.path={teacher_dir}", "-q"]
    assert main(args) == 0
    metadata = read_metadata(tmp_path / "qat")
    assert metadata["role"] == "student" and metadata["qat"]["steps"] == 2 and metadata["qat"]["lr"] == pytest.approx(2e-4)
    assert set(metadata["quantization"]["figures"]) == {"fp32", "int8", "qat_int8"}
    assert metadata["quantization"]["candidate"] == "qat_int8"
    assert isinstance(load_quantized(tmp_path / "qat")[0], Int8CLIPDualEncoder)


def test_bad_requests_fail_before_any_work(student, tokenizer, tmp_path):
    student_dir = student.save_pretrained(tmp_path / "student", tokenizer=tokenizer)
    base = ["quantize", str(student_dir), "--out", str(tmp_path / "q"), "--config", TINY]
    assert main([*base, "--method", "qat"]) == 2  # tiny.yaml sets no teacher.path
    assert main([*base, "--method", "dynamic-int8", "--steps", "5"]) == 2
    assert not (tmp_path / "q").exists()
    same = ["quantize", str(student_dir), "--out", str(student_dir), "--config", TINY, "--method", "dynamic-int8"]
    assert main(same) == 2 and isinstance(load_dual_encoder_any(student_dir)[0], CLIPDualEncoder)


def test_convert_qat_keeps_the_trained_weights(student):
    prepared = prepare_qat(student)
    with torch.no_grad():
        prepared.model.text_projection.weight.mul_(2.0)
    converted = convert_qat(prepared)
    assert isinstance(prepared.model.text_projection, QuantSimLinear)  # the trained model is left as it is
    doubled = 2 * student.model.text_projection.weight.detach()
    error = (converted.model.text_projection.weight().dequantize() - doubled).abs().max()
    assert error <= doubled.abs().max() / 255 + 1e-6  # half an int8 step of the doubled weights


@pytest.mark.slow  # a fresh interpreter
def test_quantization_works_without_torchao(tmp_path):
    """torchao (the deploy extra) is not needed: importing vldistill and quantizing run with it hidden."""
    script = (
        "import sys; sys.modules['torchao'] = None\n"
        "from vldistill.cli import main\n"
        "from vldistill.export.quantize import prepare_qat\n"
        "from vldistill.models.quantized import Int8CLIPDualEncoder\n"
        "from transformers import CLIPConfig, CLIPModel\n"
        "from vldistill.models.clip import CLIPDualEncoder\n"
        "config = CLIPConfig(text_config={'hidden_size': 16, 'intermediate_size': 32, 'num_hidden_layers': 1,\n"
        "    'num_attention_heads': 1}, vision_config={'hidden_size': 16, 'intermediate_size': 32,\n"
        "    'num_hidden_layers': 1, 'num_attention_heads': 1, 'image_size': 16, 'patch_size': 8}, projection_dim=8)\n"
        "model = CLIPDualEncoder(CLIPModel(config))\n"
        "Int8CLIPDualEncoder.from_float(model); prepare_qat(model)\n"
        "assert 'torchao' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
