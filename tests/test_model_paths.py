"""A model or teacher path that holds no model ends every command with one error line naming it (exit
status 2), never a traceback from the hub client; a string that reads as a hub id still goes to the hub."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
from helpers import build_clip, config_for, teacher_spec, tiny_vision
from transformers.utils import logging as transformers_logging

from vldistill import cli
from vldistill.cli import main
from vldistill.config import packaged_config
from vldistill.models.io import save_dual_encoder
from vldistill.models.locate import ModelNotFoundError, local_folder
from vldistill.models.two_tower import TwoTowerDualEncoder

TINY = str(packaged_config("tiny"))


@pytest.fixture
def offline_hub(monkeypatch):
    """The hub client refuses every request at once, as when huggingface.co cannot be reached (without
    the retries and waits of a real network failure)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def not_models(root: Path, tokenizer) -> dict[str, tuple[Path, str]]:
    """Paths that hold no model, each with the words its error line must say."""
    empty = root / "empty"
    empty.mkdir()
    not_a_model = root / "settings"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(json.dumps({"learning_rate": 0.1}))
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    no_weights = root / "no_weights"
    config_for(teacher_spec(), tokenizer).save_pretrained(no_weights)
    a_file = root / "model.safetensors"
    a_file.write_bytes(b"")
    return {
        "missing": (root / "nonexistent", "no such model folder"),
        "empty": (empty, "is not a model folder: it has"),
        "config without model_type": (not_a_model, "config.json names no model_type"),
        "config not JSON": (broken, "config.json is not valid JSON"),
        "no weights": (no_weights, "holds no model weights (model.safetensors or pytorch_model.bin)"),
        "a file": (a_file, "is a file, not a model folder"),
    }


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    """Neither data generation nor transformers draw progress bars on stderr, so the error line is all there is."""
    monkeypatch.setattr(cli, "show_progress", lambda: False)
    transformers_logging.disable_progress_bar()
    yield
    transformers_logging.enable_progress_bar()


def error_line(capsys) -> str:
    """The one line the command wrote to stderr (failing when there are more)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("vldistill: error: ")
    return lines[0]


CASES = ["missing", "empty", "config without model_type", "config not JSON", "no weights", "a file"]


@pytest.mark.parametrize("case", CASES)
def test_eval_of_a_path_without_a_model_prints_one_line(case, tmp_path, tokenizer, capsys):
    path, says = not_models(tmp_path, tokenizer)[case]
    assert main(["eval", str(path), "--config", TINY, "--out", str(tmp_path / "results")]) == 2
    line = error_line(capsys)
    assert str(path) in line and says in line
    assert not (tmp_path / "results").exists()


def test_eval_of_another_model_type_names_it(tmp_path, capsys):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "model.safetensors").write_bytes(b"")
    assert main(["eval", str(folder), "--config", TINY, "--out", str(tmp_path / "results")]) == 2
    assert error_line(capsys) == (
        f"vldistill: error: {folder} holds a model of type 'bert', which is not a supported dual encoder; supported "
        "model types: blip (an HF BlipForImageTextRetrieval or BlipForConditionalGeneration), clip (an HF "
        "CLIPModel), clip-int8 (a vldistill int8 CLIP folder: clip_int8.json), onnx (a "
        "vldistill ONNX export folder: onnx_pair.json), prompted (a vldistill CLIP or SigLIP with learnable prompts: "
        "prompted.json), siglip (an HF SiglipModel), two-tower (a vldistill two-tower "
        "folder: two_tower.json)"
    )


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no/such/model", "a/b/c"])
def test_paths_that_cannot_be_hub_ids_never_reach_the_hub(path, offline_hub, capsys, tmp_path):
    assert main(["eval", path, "--config", TINY, "--out", str(tmp_path / "r")]) == 2
    assert error_line(capsys) == f"vldistill: error: {path}: no such model folder (and not a hub id like org/name)"


def test_a_hub_id_goes_to_the_hub_and_says_when_it_cannot_be_reached(offline_hub, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # no local folder called org/name
    assert local_folder("org/name") is None  # read as a hub id, not refused as a path
    assert main(["eval", "org/name", "--config", TINY, "--out", str(tmp_path / "r")]) == 2
    line = error_line(capsys)
    assert line.startswith("vldistill: error: org/name is neither a local folder nor a model the Hugging Face hub can serve: ")
    # distill's teacher path too
    assert main(["distill", TINY, "--out", str(tmp_path / "d"), "--set", "teacher.path=org/name"]) == 2
    assert "org/name is neither a local folder nor a model the Hugging Face hub can serve" in error_line(capsys)


def test_a_folder_named_like_a_hub_id_is_read_locally(tmp_path, monkeypatch, tokenizer, capsys):
    monkeypatch.chdir(tmp_path)
    save_dual_encoder(build_clip(config_for(teacher_spec(), tokenizer)), tokenizer, tmp_path / "org" / "name")
    assert local_folder("org/name") == Path("org/name")
    assert main(["eval", "org/name", "--config", TINY, "--out", str(tmp_path / "r")]) == 0


@pytest.mark.parametrize("case", ["missing", "empty", "config without model_type", "no weights"])
def test_distill_with_a_teacher_path_without_a_model_prints_one_line(case, tmp_path, tokenizer, capsys):
    path, says = not_models(tmp_path, tokenizer)[case]
    out = tmp_path / "run"
    assert main(["distill", TINY, "--out", str(out), "--set", f"teacher.path={path}"]) == 2
    line = error_line(capsys)
    assert str(path) in line and says in line
    assert not (out / "student").exists()


@pytest.mark.parametrize("command", ["demo", "sweep", "cache"])
def test_every_command_names_a_missing_teacher_path(command, tmp_path, capsys):
    missing = tmp_path / "teacher"
    config = ["--config", TINY] if command == "demo" else [TINY]
    assert main([command, *config, "--out", str(tmp_path / "out"), "--set", f"teacher.path={missing}"]) == 2
    assert error_line(capsys) == f"vldistill: error: {missing}: no such model folder (and not a hub id like org/name)"


def test_distill_names_a_missing_ensemble_teacher(tmp_path, tokenizer, capsys):
    save_dual_encoder(build_clip(config_for(teacher_spec(), tokenizer)), tokenizer, tmp_path / "teacher")
    missing = tmp_path / "second"
    args = ["distill", TINY, "--out", str(tmp_path / "run"), "--set", f"teacher.path={tmp_path / 'teacher'}",
            "--set", f"teacher.ensemble=[{{path: {missing}, weight: 1.0}}]"]
    assert main(args) == 2
    assert error_line(capsys) == f"vldistill: error: {missing}: no such model folder (and not a hub id like org/name)"


def test_pretrain_teacher_names_a_two_tower_backbone_without_a_model(tmp_path, capsys):
    empty, missing, vision = tmp_path / "empty", tmp_path / "missing", tmp_path / "vision"
    empty.mkdir()
    tiny_vision().save_pretrained(vision)
    for towers, named, says in [
        ((empty, missing), empty, "it has no config.json"),  # the vision backbone loads first
        ((vision, missing), missing, "no such model folder"),
    ]:
        two_tower = f"teacher.two_tower={{vision: {towers[0]}, text: {towers[1]}}}"
        assert main(["pretrain-teacher", TINY, "--out", str(tmp_path / "out"), "--set", two_tower]) == 2
        line = error_line(capsys)
        assert str(named) in line and says in line


def test_a_damaged_two_tower_folder_names_what_it_lacks(tmp_path):
    folder = tmp_path / "two_tower"
    folder.mkdir()
    config = {"format": "vldistill-two-tower", "version": 1, "projection_dim": 8, "vision_pooling": "cls",
              "text_pooling": "mean"}
    (folder / "two_tower.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError, match=rf"^{folder} is a damaged two-tower folder: it has no vision$"):
        TwoTowerDualEncoder.from_pretrained(folder)
