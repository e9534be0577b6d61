"""The student folder (vldistill.export): a card for every saved student, whichever command made it, with
how it was distilled and, once evaluated, its measured metrics as a `model-index`."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import CLIPModel

from vldistill.cli import main
from vldistill.config import load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.eval.results import read_result
from vldistill.export import student_card, write_card
from vldistill.models.io import read_metadata
from vldistill.train.runs import obtain_teacher, train_student

TINY = str(packaged_config("tiny"))
MODELS = Path(__file__).resolve().parents[1] / "src" / "vldistill" / "models"

METADATA = {
    "role": "student",
    "teacher": "org/teacher",
    "ensemble": [{"path": "org/other", "weight": 0.5}],
    "combine": "average",
    "teacher_cache": None,
    "losses": {"clip": {"weight": 1.0}, "kd": {"weight": 2.0, "temperature": {"kind": "cosine", "start": 5.0, "end": 1.0}}},
    "weighting": {"kind": "fixed", "every": 50},
    "inherit": True,
    "seed": 7,
    "train_pairs": 1000,
    "steps": 300,
    "params": 1234567,
    "teacher_params": 7654321,
    "vldistill": "0.0.0",
}


def test_card_from_metadata_says_how_the_student_was_distilled():
    card = student_card(METADATA, "student")
    assert card.data.base_model == "org/teacher"
    assert card.data.pipeline_tag == "zero-shot-image-classification" and card.data.library_name == "transformers"
    assert card.data.tags == ["vldistill", "clip", "knowledge-distillation", "kd"]
    assert card.data.eval_results is None and "model-index" not in card.content
    text = card.text
    assert "- Losses: clip (weight 1), kd (weight 2, temperature cosine 5 -> 1)" in text
    assert "- Further teachers: `org/other` (weight 0.5), combined by average" in text
    assert "- Training pairs: 1,000" in text and "- Steps: 300" in text and "- Seed: 7" in text
    assert "- Initialization: inherited from the teacher's layers" in text
    assert "- Parameters: 1,234,567 (teacher: 7,654,321)" in text
    assert "Not evaluated yet" in text and "teacher signals" not in text.lower()
    assert "- Training pairs: all of a streamed source" in student_card({**METADATA, "train_pairs": None}, "s").text


def test_card_metrics_fill_the_model_index_and_skip_unmeasured_ones():
    card = student_card(METADATA, "student", {"acc1": 0.5, "image_retrieval_recall@1": 0.25, "text_retrieval_recall@1": None},
                        "shapes")
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"acc1", "image_retrieval_recall@1"}
    assert results["acc1"].metric_value == 0.5 and results["acc1"].task_type == "zero-shot-image-classification"
    assert results["image_retrieval_recall@1"].task_type == "image-text-retrieval"
    assert results["acc1"].dataset_name == "shapes"
    assert "| acc1 | 0.5000 |" in card.text and "text_retrieval_recall@1" not in card.content
    with pytest.raises(ValueError, match="needs the dataset"):
        student_card(METADATA, "student", {"acc1": 0.5})


def test_write_card_needs_the_run_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vldistill\.json: no run metadata"):
        write_card(tmp_path, {"acc1": 0.5}, "shapes")


def test_train_student_writes_a_card_without_metrics(tmp_path):
    cfg = load_config(packaged_config("tiny"))
    data = load_data(cfg.data, progress=False)
    teacher = obtain_teacher(cfg, data, tmp_path / "t", progress=False)
    student = train_student(cfg, data, teacher, tmp_path / "student", progress=False)
    card = ModelCard.load(tmp_path / "student" / "README.md")
    assert card.data.base_model == str(teacher.path)
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "- Losses: clip (weight 1), kd (weight 1, temperature 2), feature (weight 1, distance cosine)" in card.text
    assert f"- Steps: {cfg.distill.train.steps}" in card.text and f"- Training pairs: {len(data.train)}" in card.text
    metadata = read_metadata(tmp_path / "student")
    assert metadata["params"] == sum(p.numel() for p in student.model.parameters())
    assert metadata["teacher_params"] == sum(p.numel() for p in teacher.model.parameters())
    assert metadata["steps"] == cfg.distill.train.steps and metadata["train_pairs"] == len(data.train)
    plain = CLIPModel.from_pretrained(tmp_path / "student")  # still a plain transformers folder
    for name, value in student.model.model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value), name


def test_cli_distill_card_holds_the_measured_metrics(tmp_path, pretrained_teacher, capsys):
    assert main(["distill", TINY, "--out", str(tmp_path), "--set", f"teacher.path={pretrained_teacher}"]) == 0
    capsys.readouterr()
    card = ModelCard.load(tmp_path / "student" / "README.md")
    assert card.data.base_model == str(pretrained_teacher)
    measured = {r.metric_type: r.metric_value for r in card.data.eval_results}
    classification = read_result(tmp_path / "results" / "student_zeroshot_classification.json")["metrics"]
    retrieval = read_result(tmp_path / "results" / "student_zeroshot_retrieval.json")["metrics"]
    assert measured == {
        "acc1": classification["acc1"],
        "image_retrieval_recall@1": retrieval["image_retrieval_recall@1"],
        "text_retrieval_recall@1": retrieval["text_retrieval_recall@1"],
    }
    assert {r.dataset_name for r in card.data.eval_results} == {"shapes"}
    assert "- Losses: clip (weight 1)" in card.text  # the training facts survive the rewrite


def test_cli_distill_without_eval_keeps_the_training_card(tmp_path, pretrained_teacher, capsys):
    args = ["distill", TINY, "--out", str(tmp_path), "--no-eval", "--set", f"teacher.path={pretrained_teacher}"]
    assert main(args) == 0
    card = ModelCard.load(tmp_path / "student" / "README.md")
    assert card.data.eval_results is None and card.data.base_model == str(pretrained_teacher)


def test_sweep_run_folders_have_their_cards(tmp_path, pretrained_teacher, capsys):
    args = ["sweep", TINY, "--out", str(tmp_path), "--set", f"teacher.path={pretrained_teacher}",
            "--set", "sweep.losses=[kd]"]
    assert main(args) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    for run in result["runs"]:
        card = ModelCard.load(tmp_path / "runs" / run["name"] / "seed0" / "README.md")
        assert card.data.base_model == str(pretrained_teacher) and card.data.model_name == f"{run['name']}-seed0"
        measured = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert measured["image_retrieval_recall@1"] == pytest.approx(run["image_retrieval_recall@1"])
        assert f"- Losses: {'clip (weight 1)' if run['name'] == 'clip' else 'clip (weight 1), kd (weight 1'}" in card.text


def test_models_never_import_export():
    """export/ builds on models/ (it writes their folders); a model module importing export/ would turn that around."""
    imported = set()
    for path in MODELS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add((path.name, node.module))
            elif isinstance(node, ast.Import):
                imported.update((path.name, alias.name) for alias in node.names)
    assert any(module == "vldistill.models.io" for _, module in imported)  # the walk sees vldistill imports
    assert [pair for pair in imported if pair[1].startswith("vldistill.export")] == []
