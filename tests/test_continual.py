"""Continual re-distillation: shapes domains (data/domains.py), the prompt memory (models/prompt_memory.py), the
`continual` config section, `vldistill.continual.run_continual` end to end on the tiny config, and the benchmark's
summary on a hand-made example."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import build_clip, config_for, teacher_spec

from vldistill.binding import ConfigError
from vldistill.config import load_config, packaged_config
from vldistill.continual import CONTINUAL_SUMMARY, domain_accuracy, run_continual
from vldistill.data.bundle import load_data
from vldistill.data.domains import domain_classnames, filter_split
from vldistill.data.synthetic import make_split
from vldistill.fileio import write_text_atomic
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.prompt_memory import PROMPT_MEMORY_FILE, read_prompt_memory, remember, use_domain_prompts, write_prompt_memory
from vldistill.models.prompts import PromptConfig, PromptedDualEncoder
from vldistill.train.ewc import FISHER_FILE, load_fisher, save_fisher
from vldistill.train.runs import pretrain_teacher, train_student

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
OLD = {"shape": ["circle", "square", "triangle"]}
NEW = {"shape": ["cross", "diamond"]}


def test_a_domain_keeps_its_images_and_renumbers_their_labels_to_its_own_classes() -> None:
    split = make_split("test", 40, seed=3, image_size=16)
    kept = filter_split(split, {"shape": ["cross"], "colour": ["red", "blue"]})
    classes = domain_classnames({"shape": ["cross"], "colour": ["red", "blue"]})
    assert classes == ["small red cross", "small blue cross", "medium red cross", "medium blue cross",
                       "large red cross", "large blue cross"]
    expected = [i for i, a in enumerate(split.attributes) if a["shape"] == "cross" and a["colour"] in ("red", "blue")]
    assert len(kept) == len(expected) > 0
    assert np.array_equal(kept.images, split.images[expected])
    for label, attrs, caption in zip(kept.labels, kept.attributes, kept.captions):
        assert classes[label] == f"{attrs['size']} {attrs['colour']} cross" and caption.split()[1:4] == classes[label].split()
    with pytest.raises(ValueError, match="leaves no image of the test split"):
        filter_split(make_split("test", 2, seed=0, image_size=16), {"position": ["center"], "shape": ["cross"]}, "test split")


@pytest.mark.parametrize("override, message", [
    ("data.shapes_filter={shape: [hexagon]}", "data.shapes_filter.shape: unknown value 'hexagon'"),
    ("data.shapes_filter={hue: [red]}", "data.shapes_filter: unknown attribute 'hue'"),
    ("continual.ewc_lambda=-1", "continual.ewc_lambda must be a finite number >= 0"),
    ("continual.fisher_batches=0", "continual.fisher_batches must be >= 1"),
    ("continual.previous=/nonexistent/run", "continual.previous: '/nonexistent/run' is no run folder"),
    ("continual.domain=previous", "continual.domain and continual.previous_domain must differ"),
    ("continual.domain=a/b", "continual.domain must be a non-empty name without '/'"),
])
def test_the_config_refuses_bad_domains_and_continual_settings_by_key(override, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def prompted(tokenizer, seed: int) -> PromptedDualEncoder:
    base = build_clip(config_for(teacher_spec(), tokenizer), seed=0)
    return PromptedDualEncoder(base, PromptConfig(n_ctx=2), tokenizer=tokenizer, generator=torch.Generator().manual_seed(seed)).eval()


def test_the_prompt_memory_saves_reloads_and_swaps_a_domains_prompts_for_evaluation(tokenizer, tmp_path) -> None:
    model = prompted(tokenizer, seed=1)
    memory = remember({}, "old", model)
    with torch.no_grad():
        model.prompts.text.add_(torch.randn(model.prompts.text.shape, generator=torch.Generator().manual_seed(7)))  # as training on the new domain would; the memory keeps a copy
    assert not torch.equal(memory["old"]["prompts.text"], model.prompts.text.detach())
    memory = remember(memory, "new", model)
    folder = model.save_pretrained(tmp_path / "student")
    write_prompt_memory(folder, memory)
    loaded, loaded_tokenizer = load_dual_encoder_any(folder)
    read = read_prompt_memory(folder)
    assert list(read) == ["old", "new"]
    assert torch.equal(read["new"]["prompts.text"], loaded.prompts.text.detach())
    data = load_data(load_config(packaged_config("tiny"), ["data.shapes_filter={shape: [circle, square]}"]).data, progress=False)
    eval_cfg = load_config(packaged_config("tiny")).eval
    tokens = tokenizer(["a small red circle", "a large blue square"], padding=True, return_tensors="pt")
    with torch.no_grad():
        with_new = loaded.encode_text(tokens["input_ids"], tokens["attention_mask"])
        use_domain_prompts(loaded, read, "old")
        with_old = loaded.encode_text(tokens["input_ids"], tokens["attention_mask"])
        reference = prompted(tokenizer, seed=1)  # built with the old prompts
        expected = reference.encode_text(tokens["input_ids"], tokens["attention_mask"])
    assert torch.equal(loaded.prompts.text.detach(), memory["old"]["prompts.text"])
    torch.testing.assert_close(with_old, expected)
    assert (with_new - expected).abs().max() > 1e-3
    # Evaluated on a domain with the old prompts, it scores exactly what the model built with them scores.
    assert domain_accuracy(loaded, loaded_tokenizer, data, eval_cfg) == domain_accuracy(reference, tokenizer, data, eval_cfg)
    with pytest.raises(ValueError, match="holds no prompts of domain 'mid' \\(it holds: old, new\\)"):
        use_domain_prompts(loaded, read, "mid")
    assert read_prompt_memory(tmp_path) == {} and not (tmp_path / PROMPT_MEMORY_FILE).exists()


def test_continual_redistills_with_ewc_and_prompt_memory_and_reuses_its_fisher(tmp_path) -> None:
    tiny = packaged_config("tiny")
    common = ["distill.losses={clip: {weight: 1.0}, kd: {weight: 1.0, temperature: 2.0}}", "student.prompts={n_ctx: 2}",
              "distill.train.steps=3", "data.train_size=128", "data.test_size=64"]
    teacher_cfg = load_config(tiny, ["teacher.train.steps=3", "data.train_size=64"])
    teacher = pretrain_teacher(teacher_cfg, load_data(teacher_cfg.data, progress=False), tmp_path / "teacher", progress=False)
    old_cfg = load_config(tiny, [*common, f"teacher.path={teacher.path}", "data.shapes_filter={shape: [circle, square, triangle]}"])
    old = tmp_path / "old"
    write_text_atomic(old / "config.yaml", yaml.safe_dump(old_cfg.to_dict()))
    train_student(old_cfg, load_data(old_cfg.data, progress=False), teacher, old / "student", progress=False)
    settings = [f"continual.previous={old}", "continual.ewc_lambda=100.0", "continual.fisher_batches=2",
                "continual.previous_domain=round", "continual.domain=pointy", "data.shapes_filter={shape: [cross, diamond]}"]
    cfg = load_config(tiny, [*common, *settings])  # the teacher: the one the old student names
    summary = run_continual(cfg, tmp_path / "new", progress=False)
    assert summary == json.loads((tmp_path / "new" / CONTINUAL_SUMMARY).read_text())
    assert summary["domains"] == {"old": "round", "new": "pointy"} and summary["prompt_memory"] == ["pointy", "round"]
    assert summary["forgetting"] == pytest.approx(summary["acc1_before"]["round"] - summary["acc1_after"]["round"])
    log = [json.loads(line) for line in (tmp_path / "new" / "logs" / "distill.jsonl").read_text().splitlines()]
    assert log[-1]["loss/ewc"] > 0 and log[-1]["step"] == 3
    student, _ = load_dual_encoder_any(old / "student")
    fisher = load_fisher(tmp_path / "new" / FISHER_FILE, student, same_weights=True)  # at the old student's weights
    assert fisher.batches == 2 and "prompts.text" in fisher.fisher
    memory = read_prompt_memory(tmp_path / "new" / "student")
    assert torch.equal(memory["round"]["prompts.text"], student.prompts.text.detach())
    # The second run reads the saved Fisher instead of estimating it: a Fisher it could not have estimated
    # (zeros) makes the penalty vanish.
    info = load_fisher(tmp_path / "new" / FISHER_FILE)
    info.fisher = {n: torch.zeros_like(f) for n, f in info.fisher.items()}
    save_fisher(tmp_path / "again" / FISHER_FILE, info)
    run_continual(cfg, tmp_path / "again", progress=False)
    log = [json.loads(line) for line in (tmp_path / "again" / "logs" / "distill.jsonl").read_text().splitlines()]
    assert all(record["loss/ewc"] == 0.0 for record in log)


def benchmark():
    """benchmarks/continual.py as a module (its folder on the path for `_harness`)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("continual_benchmark", BENCHMARKS / "continual.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_the_benchmark_summary_computes_forgetting_and_the_share_ewc_keeps() -> None:
    runs = [
        {"before": {"old": 0.8, "new": 0.2}, "arms": {"plain": {"old": 0.4, "new": 0.9}, "ewc": {"old": 0.7, "new": 0.6}}},
        {"before": {"old": 0.6, "new": 0.3}, "arms": {"plain": {"old": 0.4, "new": 0.8}, "ewc": {"old": 0.44, "new": 0.7}}},
    ]
    figures = benchmark().summarize(runs)
    assert figures["old_acc1_before"]["mean"] == pytest.approx(0.7)
    assert figures["old_acc1_before"]["std"] == pytest.approx(0.1414213562)  # sample std of 0.8, 0.6
    assert figures["plain"]["forgetting"]["values"] == pytest.approx([0.4, 0.2])
    assert figures["ewc"]["forgetting"]["values"] == pytest.approx([0.1, 0.16])
    assert figures["ewc"]["new_acc1"]["mean"] == pytest.approx(0.65)
    # per seed: 1 - 0.1/0.4 = 0.75 and 1 - 0.16/0.2 = 0.2; of the means: 1 - 0.13/0.3
    assert figures["ewc_kept_share"]["values"] == pytest.approx([0.75, 0.2])
    assert figures["ewc_kept_share"]["mean"] == pytest.approx(0.475)
    assert figures["ewc_kept_share"]["of_means"] == pytest.approx(1 - 0.13 / 0.3)
    assert figures["aim_met"] is True and figures["ewc_memory"] is None
    runs[0]["arms"]["plain"]["old"] = runs[1]["arms"]["plain"]["old"] = 0.9  # plain forgot nothing (gained)
    figures = benchmark().summarize(runs)
    assert figures["ewc_kept_share"]["values"] == [None, None] and figures["ewc_kept_share"]["of_means"] is None
    assert figures["aim_met"] is False
