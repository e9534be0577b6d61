"""`vldistill demo --family blip`: DLIP-style distillation of a BLIP-style model on the embedded data.

A BLIP model here is what Salesforce publishes for each task: an image-text retrieval model (vision tower,
text encoder whose layers also fuse the image by cross-attention, ITC and ITM heads) and a captioning model
(vision tower, text decoder). Each is pretrained here (or reused) as a teacher, then compressed module by
module (`student.model`: vision, text, decoder) into the same four arms as the CLIP demo, each arm changing one
thing: the distilled student (`distill.losses` / `distill.caption_losses`), the same student with the task
losses alone (ITC + ITM; LM) and the same from random weights. Evaluated side by side: zero-shot accuracy and
R@1 from the contrastive ranking, R@1 after ITM re-ranking of the top `eval.rerank_k`, BLEU-4 and CIDEr-D of
greedy captions; the cost of each: parameters, FLOPs per image / text / ITM pair / caption, image throughput
and captions per second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from vldistill.config import ExperimentConfig
from vldistill.data.bundle import load_data
from vldistill.data.tokenizer import make_tokenize
from vldistill.demo import difference, retention, train_arms
from vldistill.eval.caption_suite import (
    CAPTION_SUMMARY_KEYS, caption_length, compare_caption_speed, evaluate_captioner, speed_images,
)
from vldistill.eval.suite import ITM_SUMMARY_KEYS, SUMMARY_KEYS, evaluate_model, pixel_batches
from vldistill.export import write_card
from vldistill.fileio import write_text_atomic
from vldistill.profile.blip_heads import caption_flops, itm_flops
from vldistill.profile.environment import environment
from vldistill.profile.stats import ProfileSettings, format_profile, profile_targets, target_from_model
from vldistill.profile.throughput import count_parameters, speedup
from vldistill.report import write_run_report
from vldistill.train.blip_pretrain import CAPTIONING_LOSSES, RETRIEVAL_LOSSES
from vldistill.train.runs import obtain_captioning_teacher, obtain_teacher
from vldistill.trained import TrainedModel

BLIP_KEYS = (*SUMMARY_KEYS, *ITM_SUMMARY_KEYS, *CAPTION_SUMMARY_KEYS)
CAPTIONER_DIR = "captioner"  # the captioning arms' folders and logs, beside the retrieval arms'


def _distinct(arms: dict[str, TrainedModel], inherit: bool) -> dict[str, TrainedModel]:
    """The arms that are separate runs (scratch is the baseline run when the student does not inherit)."""
    return {name: trained for name, trained in arms.items() if name != "scratch" or inherit}


def _caption_costs(data, captioners: dict[str, TrainedModel], progress: bool) -> dict[str, Any]:
    """Per captioner: FLOPs per caption and captions per second (interleaved), on the first test images."""
    any_model = next(iter(captioners.values())).model
    pixels, length = speed_images(any_model, data), caption_length(any_model)
    speed = compare_caption_speed({name: trained.model for name, trained in captioners.items()}, data, progress)
    return {
        name: {"flops_per_caption": caption_flops(trained.model, pixels[:4], length), "speed": speed[name]}
        for name, trained in captioners.items()
    }


def _itm_flops(data, trained: TrainedModel) -> float:
    """FLOPs per pair of the ITM head on the first test images and their captions."""
    model = trained.model
    spec = model.input_spec
    tokens = make_tokenize(trained.tokenizer, spec.max_text_length, spec.text_padding)(data.test.captions[:4])
    pixels = next(pixel_batches(data.test.images[:4], spec, 4))
    return itm_flops(model, pixels, tokens["input_ids"], tokens["attention_mask"])


def run_blip_demo(cfg: ExperimentConfig, out_dir: Path, progress: bool = True, measure_memory: bool = True) -> dict:
    """Obtain (pretrain or reuse) the BLIP retrieval and captioning teachers, train the three students of each
    (see the module docstring), evaluate and profile all of them and write `summary.json` (the CLIP demo's
    shape; each model's figures also hold the ITM re-ranked R@1, BLEU-4, CIDEr-D, the captioner's parameters,
    FLOPs per caption and per ITM pair, and captions per second), results records, model cards and
    `report.html`."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    logs, results = out_dir / "logs", out_dir / "results"
    (logs / CAPTIONER_DIR).mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    data = load_data(cfg.data, progress=progress)
    teacher = obtain_teacher(cfg, data, out_dir / "teacher", logs, progress)
    arms = train_arms(cfg, data, teacher, out_dir, logs, progress, RETRIEVAL_LOSSES)
    caption_teacher = obtain_captioning_teacher(
        cfg, data, out_dir / CAPTIONER_DIR / "teacher", logs / CAPTIONER_DIR, progress
    )
    captioners = train_arms(
        cfg, data, caption_teacher, out_dir / CAPTIONER_DIR, logs / CAPTIONER_DIR, progress, CAPTIONING_LOSSES
    )
    retrieval_arms = _distinct(arms, cfg.student.inherit)
    caption_arms = _distinct(captioners, cfg.student.inherit)
    models = {
        name: evaluate_model(trained.model, trained.tokenizer, data, cfg.eval, name, results, progress, throughput=False)["summary"]
        for name, trained in retrieval_arms.items()
    }
    profile = profile_targets(
        [target_from_model(name, trained.model, trained.tokenizer, trained.path) for name, trained in retrieval_arms.items()],
        ProfileSettings(batch_size=cfg.eval.throughput_batch_size, memory=measure_memory),
        progress,
    )
    costs = _caption_costs(data, caption_arms, progress)
    for name, trained in caption_arms.items():
        captioning = evaluate_captioner(trained.model, data, cfg.eval, f"{CAPTIONER_DIR}-{name}", results, progress)
        figures = models[name]
        figures.update({key: captioning["summary"][key] for key in CAPTION_SUMMARY_KEYS})
        figures["retrieval_params"] = figures["params"]
        figures["captioner_params"] = count_parameters(trained.model)
        figures["params"] = figures["retrieval_params"] + figures["captioner_params"]
        figures["flops_per_caption"] = costs[name]["flops_per_caption"]
        figures["flops_per_itm_pair"] = _itm_flops(data, retrieval_arms[name])
        figures.update(costs[name]["speed"].as_dict("captions"))
        figures.update(profile.models[name].throughput["image"].as_dict())
        figures["profile"] = profile.models[name].as_dict()
    models.setdefault("scratch", models["baseline"])  # without inheritance, scratch is the baseline run
    image_speed = {name: figures.throughput["image"] for name, figures in profile.models.items()}
    summary = {
        "family": "blip",
        "wall_seconds": time.perf_counter() - start,
        "models": models,
        "student_retention_percent": retention(models["student"], models["teacher"], BLIP_KEYS),
        "student_minus_baseline": difference(models["student"], models["baseline"], BLIP_KEYS),
        "baseline_minus_scratch": difference(models["baseline"], models["scratch"], BLIP_KEYS),
        "compression": models["teacher"]["params"] / models["student"]["params"],
        "image_speedup": speedup(image_speed["student"], image_speed["teacher"]),
        "caption_speedup": speedup(costs["student"]["speed"], costs["teacher"]["speed"]),
        "profile": {key: value for key, value in profile.as_dict().items() if key not in ("models", "environment")},
        "train_seconds": {
            **{name: m.result.seconds for name, m in retrieval_arms.items() if m.result},
            **{f"{CAPTIONER_DIR}-{name}": m.result.seconds for name, m in caption_arms.items() if m.result},
        },
        "teacher_train_pairs": len(data.train),
        "student_train_pairs": cfg.distill.train_pairs or len(data.train),
        "scratch_is_baseline": not cfg.student.inherit,
        "rerank_k": cfg.eval.rerank_k,
        "seed": cfg.seed,
        "environment": environment(),
        "retrieval_match": cfg.eval.retrieval_match,
        "dataset": data.name,
        "data_quality": data.quality.summary(),
    }
    write_card(arms["student"].path, {key: models["student"][key] for key in (*SUMMARY_KEYS, *ITM_SUMMARY_KEYS)}, data.name)
    write_card(captioners["student"].path, {key: models["student"][key] for key in CAPTION_SUMMARY_KEYS}, data.name)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_run_report(out_dir)
    return summary


def format_blip_table(models: dict[str, dict]) -> str:
    """A fixed-width table per model: parameters (retrieval + captioning), acc1, R@1 both ways from the
    contrastive ranking and after ITM re-ranking, BLEU-4, CIDEr-D and captions per second."""
    header = (
        f"{'model':<10}{'params':>11}{'acc1':>7}{'T->I':>7}{'I->T':>7}{'T->I itm':>10}{'I->T itm':>10}"
        f"{'BLEU-4':>8}{'CIDEr':>7}{'capt/s':>8}"
    )
    rows = [
        f"{name:<10}{m['params']:>11,}{m['acc1']:>7.3f}{m['image_retrieval_recall@1']:>7.3f}"
        f"{m['text_retrieval_recall@1']:>7.3f}{m['itm_image_retrieval_recall@1']:>10.3f}"
        f"{m['itm_text_retrieval_recall@1']:>10.3f}{m['bleu4']:>8.3f}{m['cider']:>7.3f}{m['captions_per_second']:>8,.0f}"
        for name, m in models.items()
    ]
    return "\n".join([header, *rows])


def format_blip_summary(summary: dict) -> str:
    """The BLIP demo's report as text: its table, what distillation and inheritance changed, retention and
    cost, the retrieval models' profile table and wall time."""
    lines = [format_blip_table(summary["models"])]
    pairs = f"teachers trained on {summary['teacher_train_pairs']:,} pairs, students on {summary['student_train_pairs']:,}"
    lines.append(f"{pairs}; retrieval hits: {summary['retrieval_match']}; ITM re-ranks the top {summary['rerank_k']}")
    for label, key in (("distilled minus baseline (what the teachers added)", "student_minus_baseline"),
                       ("baseline minus scratch (what inheritance added)", "baseline_minus_scratch")):
        gap = summary[key]
        lines.append(
            f"{label}: acc1 {gap['acc1']:+.3f}, T->I R@1 {gap['image_retrieval_recall@1']:+.3f} "
            f"(ITM {gap['itm_image_retrieval_recall@1']:+.3f}), I->T R@1 {gap['text_retrieval_recall@1']:+.3f} "
            f"(ITM {gap['itm_text_retrieval_recall@1']:+.3f}), CIDEr {gap['cider']:+.3f}"
        )
    keep, models = summary["student_retention_percent"], summary["models"]
    teacher, student = models["teacher"], models["student"]
    lines.append(
        f"student keeps {keep['acc1']:.1f}% of teacher acc1, {keep['itm_image_retrieval_recall@1']:.1f}% / "
        f"{keep['itm_text_retrieval_recall@1']:.1f}% of its ITM re-ranked T->I / I->T R@1, {keep['cider']:.1f}% of "
        f"its CIDEr, with {100 * student['params'] / teacher['params']:.1f}% of its parameters, "
        f"{100 * student['flops_per_caption'] / teacher['flops_per_caption']:.1f}% of its FLOPs per caption and "
        f"{100 * student['flops_per_itm_pair'] / teacher['flops_per_itm_pair']:.1f}% per ITM pair; "
        f"{summary['image_speedup']['median']:.1f}x the image throughput, "
        f"{summary['caption_speedup']['median']:.1f}x the captions per second"
    )
    profile = {**summary["profile"], "models": {name: m["profile"] for name, m in models.items()}}
    lines.append(format_profile(profile))
    lines.append(f"wall time: {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)
