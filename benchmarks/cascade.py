"""Cascade inference on saved models: sweep the threshold of a student -> teacher cascade on the zero-shot test
split for every confidence criterion and request size, and print ONE JSON line:

    {"student", "teacher", "dataset", "images", "classes", "threads", "target", "aim", "student_acc1",
     "teacher_acc1", "runs", "aim_met"}

`runs` holds one entry per (criterion, latency_batch): {"criterion", "latency_batch", "student_ms",
"teacher_ms", "met", "threshold", "acc1", "teacher_call_rate", "mean_latency_ms", "acc1_vs_teacher",
"latency_vs_teacher", "latency_model_max_error", "meets_aim"}: the recommended (cheapest) threshold that keeps
`target` of the teacher's acc1 and its figures (None where no threshold does), the student's and the teacher's
measured ms per image alone, and the largest relative error of the latency model against the real cascade
timed at its checked thresholds. Latency is measured per image of requests of `latency_batch` images (1: one
image at a time), interleaved over repeated trials (vldistill.deploy.latency.METHOD). `aim` is the issue's
aim: >= `target` of the teacher's acc1 at <= `aim.latency_vs_teacher` of its latency; `meets_aim` per run
and `aim_met` (any run) say whether it is reached. With --out DIR each run's cascade.json, cascade_summary.json
and cascade.png go to DIR/<criterion>-batch<N>/. Everything else goes to stderr.

    python benchmarks/cascade.py --student demo_out/student --teacher demo_out/teacher   # the demo's models
    python benchmarks/cascade.py --student S --teacher T --config my.yaml --latency-batch 1 64
    python benchmarks/cascade.py --tiny     # tiny random models built here: does it run? (CI, seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from transformers import CLIPModel

from vldistill.config import load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.data.grammar import vocabulary
from vldistill.data.tokenizer import build_word_tokenizer
from vldistill.deploy.cascade import CRITERIA, ZeroShotModel
from vldistill.deploy.cascade_eval import evaluate_cascade
from vldistill.deploy.report import format_cascade, write_cascade
from vldistill.models import CLIPDualEncoder, clip_config_from_spec
from vldistill.models.io import save_dual_encoder
from vldistill.models.loading import load_dual_encoder_any

AIM_LATENCY = 0.40  # the aim: the cascade at <= 40% of the teacher's mean latency


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The benchmark's flags; --student and --teacher, or --tiny."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default=None, help="student model folder")
    parser.add_argument("--teacher", default=None, help="teacher model folder")
    parser.add_argument("--config", default=None, help="experiment YAML whose test split is used (default: the demo's data)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the tiny config: checks the script runs")
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA), help="confidence criteria")
    parser.add_argument("--latency-batch", nargs="+", type=int, default=None,
                        help="request sizes latency is measured at (default: 1 and 64; 1 and 4 with --tiny)")
    parser.add_argument("--latency-images", type=int, default=None, help="images timed (default 256; 8 with --tiny)")
    parser.add_argument("--trials", type=int, default=None, help="timed passes (default 5; 2 with --tiny)")
    parser.add_argument("--points", type=int, default=21, help="thresholds per sweep (default 21)")
    parser.add_argument("--target", type=float, default=0.99, help="fraction of the teacher's acc1 to keep (default 0.99)")
    parser.add_argument("--out", default=None, help="also write each run's files under this folder")
    args = parser.parse_args(argv)
    if args.tiny and (args.student or args.teacher):
        parser.error("--tiny builds its own models: give --student and --teacher, or --tiny, not both")
    if not args.tiny and not (args.student and args.teacher):
        parser.error("give --student and --teacher (saved model folders), or --tiny")
    if args.config is None:
        args.config = str(packaged_config("tiny")) if args.tiny else None
    args.latency_batch = args.latency_batch or ([1, 4] if args.tiny else [1, 64])
    args.latency_images = args.latency_images or (8 if args.tiny else 256)
    args.trials = args.trials or (2 if args.tiny else 5)
    return args


def save_tiny_models(cfg, work: Path) -> tuple[Path, Path]:
    """The tiny config's teacher and student architectures with random (seeded) weights, saved as model folders."""
    tokenizer = build_word_tokenizer(vocabulary(), max_length=32)
    folders = []
    for seed, (name, spec) in enumerate((("student", cfg.student.model), ("teacher", cfg.teacher.model))):
        config = clip_config_from_spec(
            spec, image_size=cfg.data.image_size, vocab_size=len(tokenizer), max_text_length=32,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(seed)
        folders.append(save_dual_encoder(CLIPDualEncoder(CLIPModel(config)), tokenizer, work / name))
    return folders[0], folders[1]


def run(args: argparse.Namespace, student_path: str, teacher_path: str) -> dict:
    """Every (criterion, request size) sweep on the config's zero-shot test split; the JSON figures."""
    cfg = load_config(args.config)
    data = load_data(cfg.data, progress=False)
    if data.zeroshot is None:
        raise SystemExit(f"{data.name} has no zero-shot classes")
    heads = []
    for path in (student_path, teacher_path):
        model, tokenizer = load_dual_encoder_any(path)
        heads.append(ZeroShotModel.build(model, tokenizer, data.classnames, cfg.eval.templates or data.templates))
    runs, result = [], None
    for criterion in args.criteria:
        for batch in args.latency_batch:
            result = evaluate_cascade(
                *heads, data.zeroshot.images, data.zeroshot.labels, criterion=criterion, target=args.target,
                points=args.points, latency_images=args.latency_images, latency_batch=batch, trials=args.trials,
                batch_size=cfg.eval.batch_size, names={"student": student_path, "teacher": teacher_path}, dataset=data.name,
            )
            print(format_cascade(result), file=sys.stderr)
            if args.out:
                write_cascade(result, Path(args.out) / f"{criterion}-batch{batch}")
            runs.append(summarize_run(result, args.target))
    return {
        "student": student_path, "teacher": teacher_path, "dataset": data.name, "images": result["images"],
        "classes": result["classes"], "threads": torch.get_num_threads(), "target": args.target,
        "aim": {"acc1_vs_teacher": args.target, "latency_vs_teacher": AIM_LATENCY},
        "student_acc1": result["student"]["acc1"], "teacher_acc1": result["teacher"]["acc1"],
        "runs": runs, "aim_met": any(r["meets_aim"] for r in runs),
    }


def summarize_run(result: dict, target: float) -> dict:
    """One sweep's recommendation and timings, flat."""
    recommendation, latency = result["recommendation"], result["latency"]
    picked = {key: recommendation.get(key) for key in
              ("threshold", "acc1", "teacher_call_rate", "mean_latency_ms", "acc1_vs_teacher", "latency_vs_teacher")}
    errors = [abs(check["relative_error"]) for check in latency["checks"]]
    return {
        "criterion": result["criterion"], "latency_batch": latency["batch_size"],
        "student_ms": latency["student_ms"]["median"], "teacher_ms": latency["teacher_ms"]["median"],
        "met": recommendation["met"], **picked,
        "latency_model_max_error": max(errors) if errors else None,
        "meets_aim": bool(recommendation["met"] and recommendation["latency_vs_teacher"] is not None
                          and recommendation["latency_vs_teacher"] <= AIM_LATENCY),
    }


def main(argv: Optional[list[str]] = None) -> None:
    """Run the benchmark and print its JSON line."""
    args = parse_args(argv)
    if args.tiny:
        with tempfile.TemporaryDirectory() as work:
            student, teacher = save_tiny_models(load_config(args.config), Path(work))
            figures = run(args, str(student), str(teacher))
    else:
        figures = run(args, args.student, args.teacher)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
