"""The `vldistill` command line: thin subcommands over the library, each driven by one YAML config
plus `--set key.sub=value` overrides. Progress bars and the library's messages go to stderr (`--quiet`:
warnings and errors only), results to stdout."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import yaml
from transformers.utils import logging as transformers_logging

from vldistill.config import ConfigError, ExperimentConfig, check_caption_file_options, load_config, packaged_config
from vldistill.deploy.cascade import CRITERIA
from vldistill.distributed import process_rank
from vldistill.extras import MissingExtraError
from vldistill.train.loop import NonFiniteLossError
from vldistill.train.stop import TrainingStopped


def show_progress() -> bool:
    """Whether this process shows progress bars: only the first one when several run together
    (torchrun / accelerate launch), so each bar is printed once."""
    return process_rank()[0] == 0


def _progress(args: argparse.Namespace) -> bool:
    """Whether this command draws progress bars: on the first process, unless `--quiet`."""
    return show_progress() and not args.quiet


class MessageFormatter(logging.Formatter):
    """Library log records as CLI lines: `vldistill: message`, with `warning: ` or `error: ` after the
    prefix for those levels."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's line with its prefix."""
        kind = "error: " if record.levelno >= logging.ERROR else "warning: " if record.levelno >= logging.WARNING else ""
        return f"vldistill: {kind}{super().format(record)}"


@contextmanager
def cli_logging(quiet: bool) -> Iterator[None]:
    """While the block runs, write the library's log records to stderr: INFO and up (WARNING and up when
    `quiet`) on the first process, errors only on the others (they would repeat the first one's messages).
    `quiet` also hides transformers' progress bars (e.g. "Loading weights"). The `vldistill` logger's level,
    handlers and propagation, and transformers' bar setting, are restored afterwards."""
    logger = logging.getLogger("vldistill")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(MessageFormatter())
    saved = logger.level, logger.propagate
    first = process_rank()[0] == 0
    logger.setLevel(logging.ERROR if not first else logging.WARNING if quiet else logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False
    bars = transformers_logging.is_progress_bar_enabled()
    if quiet:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if bars:
            transformers_logging.enable_progress_bar()


def _config(args: argparse.Namespace, default: Optional[str] = None) -> ExperimentConfig:
    path = args.config if args.config is not None else (packaged_config(default) if default else None)
    return load_config(path, args.overrides)


def _save_config(cfg: ExperimentConfig, out_dir: Path) -> None:
    from vldistill.fileio import write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


DEMO_CONFIGS = {"clip": "demo", "blip": "demo_blip"}


def cmd_demo(args: argparse.Namespace) -> int:
    """Teacher, distilled student and baseline on the embedded data, with a printed table: CLIP models, or
    BLIP retrieval and captioning models (`--family blip`, or a config whose teacher.family is blip)."""
    from vldistill.demo import format_summary, run_demo
    from vldistill.demo_blip import format_blip_summary, run_blip_demo

    cfg = _config(args, default=DEMO_CONFIGS[args.family or "clip"])
    if args.family is not None and cfg.teacher.family != args.family:
        raise ConfigError(f"--family {args.family}, but the config's teacher.family is {cfg.teacher.family}")
    if cfg.teacher.family == "blip":
        print(format_blip_summary(run_blip_demo(cfg, Path(args.out), progress=_progress(args))))
    else:
        print(format_summary(run_demo(cfg, Path(args.out), progress=_progress(args))))
    print(f"wrote {Path(args.out) / 'summary.json'} and the student to {Path(args.out) / 'student'}")
    return 0


def cmd_pretrain_teacher(args: argparse.Namespace) -> int:
    """Pretrain the config's teacher on the embedded data: a CLIP with the CLIP loss, or for teacher.family blip a
    BLIP retrieval teacher (ITC + ITM) and, beside it, a BLIP captioning teacher (LM)."""
    from vldistill.data.bundle import load_data
    from vldistill.train.runs import pretrain_captioning_teacher, pretrain_teacher

    cfg = _config(args)
    out = Path(args.out)
    _save_config(cfg, out)
    progress = _progress(args)
    data = load_data(cfg.data, progress=progress)
    pretrain_teacher(cfg, data, out / "teacher", log_dir=out / "logs", progress=progress)
    print(f"teacher saved to {out / 'teacher'}")
    if cfg.teacher.family == "blip":
        pretrain_captioning_teacher(cfg, data, out / "teacher-captioner", log_dir=out / "logs", progress=progress)
        print(f"captioning teacher saved to {out / 'teacher-captioner'}")
    print(f"data quality: {data.quality.report()}")
    return 0


def cmd_region_distill(args: argparse.Namespace) -> int:
    """Open-vocabulary region distillation (ViLD): print the table of the teacher and the region students."""
    from vldistill.region_distill import format_region_summary, run_region_distill

    cfg = _config(args)
    summary = run_region_distill(cfg, Path(args.out), progress=_progress(args))
    print(format_region_summary(summary))
    print(f"summary: {Path(args.out) / 'summary.json'}")
    return 0


def cmd_prompt_distill(args: argparse.Namespace) -> int:
    """Prompt distillation (PromptKD) with base-to-novel evaluation: print its table, write summary.json."""
    from vldistill.prompt_distill import format_prompt_summary, run_prompt_distill

    cfg = _config(args)
    summary = run_prompt_distill(cfg, Path(args.out), progress=_progress(args))
    if not summary:
        return 0  # not the first process: it trained; the first evaluates and prints
    print(format_prompt_summary(summary))
    print(f"summary: {Path(args.out) / 'summary.json'}")
    return 0


def cmd_continual(args: argparse.Namespace) -> int:
    """Continual re-distillation: the student of continual.previous distilled further on this config's data (a new
    domain) with EWC and prompt memory; print and write continual.json."""
    from vldistill.continual import CONTINUAL_SUMMARY, run_continual

    summary = run_continual(_config(args), Path(args.out), progress=_progress(args))
    print(json.dumps(summary, indent=2))
    print(f"summary: {Path(args.out) / CONTINUAL_SUMMARY}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Distill the config's student from `teacher.path`, evaluate it beside the teacher and write summary.json
    and report.html."""
    from vldistill.data.bundle import load_data
    from vldistill.distill_run import summarize_distill
    from vldistill.report import write_run_report
    from vldistill.train.runs import obtain_teacher, train_student

    cfg = _config(args)
    if cfg.teacher.path is None:
        raise ConfigError("teacher.path is not set: point it at a CLIP folder or hub id (e.g. from `vldistill pretrain-teacher`)")
    out = Path(args.out)
    _save_config(cfg, out)
    progress = _progress(args)
    data = load_data(cfg.data, progress=progress)
    teacher = obtain_teacher(cfg, data, out / "teacher", progress=progress)
    student = train_student(
        cfg, data, teacher, out / "student", log_path=out / "logs" / "distill.jsonl", resume=args.resume,
        progress=progress,
    )
    if process_rank()[0] != 0:
        return 0  # the first process saves, reports and evaluates
    print(f"student saved to {student.path}")
    print(f"data quality: {data.quality.report()}")
    summary = summarize_distill(cfg, data, teacher, student, out, evaluate=not args.no_eval, progress=progress)
    if not args.no_eval:
        print(json.dumps({**summary["models"]["student"], "retention_percent": summary["student_retention_percent"]}, indent=2))
    report = write_run_report(out)
    if report is not None:
        print(f"report: {report}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Run the teachers once over every training pair and view; store their embeddings for distillation."""
    from vldistill.teachers.cache.build import build_cache
    from vldistill.data.bundle import load_data
    from vldistill.teachers.assemble import load_teacher

    cfg = _config(args)
    if cfg.teacher.path is None:
        raise ConfigError("teacher.path is not set: point it at the teacher to cache (e.g. from `vldistill pretrain-teacher`)")
    out = args.out if args.out is not None else cfg.cache.path
    if out is None:
        raise ConfigError("no cache folder: pass --out CACHE_DIR or set cache.path")
    teacher = load_teacher(cfg.teacher.path, cfg.teacher.trust_remote_code)
    progress = _progress(args)
    result = build_cache(cfg, load_data(cfg.data, progress=progress), teacher, Path(out), progress=progress)
    if process_rank()[0] != 0:
        return 0  # the first process reports
    print(result.summary())
    print(f"distill from it with --set cache.path={out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a saved model on the config's test split, or on the pairs of `--data` (e.g. a Karpathy
    split file or COCO captions); print its retrieval recalls both ways (and zero-shot accuracy when
    the config has classes, ITM re-ranked recalls for a BLIP retrieval model), or a captioning model's
    BLEU-4 and CIDEr, and write CLIP_benchmark-style records."""
    from vldistill.data.bundle import load_data, load_test_data
    from vldistill.eval.caption_suite import evaluate_captioner
    from vldistill.eval.results import format_records
    from vldistill.eval.suite import evaluate_model
    from vldistill.models.contract import Captioner
    from vldistill.models.loading import load_dual_encoder_any

    if args.data is None and (args.split is not None or args.images is not None):
        raise ConfigError("--split and --images apply to the file given with --data")
    overrides = args.overrides
    if args.data is not None and args.config is None:
        overrides = ["eval.retrieval_match=pair", *overrides]  # as the benchmarks are scored, unless --set
    cfg = load_config(args.config, overrides)
    if args.data is not None:
        check_caption_file_options(args.data, args.split, args.images, ("--data", "--split", "--images"))
    model, tokenizer = load_dual_encoder_any(args.model)
    name = args.name or Path(args.model).name
    progress = _progress(args)
    if args.data is not None:
        data_cfg = dataclasses.replace(
            cfg.data, dataset="files", test=args.data, test_split=args.split, test_image_root=args.images,
            image_size=model.input_spec.image_size,
        )
        data = load_test_data(data_cfg, progress=progress)
    else:
        data = load_data(cfg.data, progress=progress)
    out = Path(args.out)
    if isinstance(model, Captioner):
        evaluation = evaluate_captioner(model, data, cfg.eval, name, out, progress=progress)
    else:
        evaluation = evaluate_model(model, tokenizer, data, cfg.eval, name, out, progress=progress)
    print(format_records(evaluation["records"]))
    summary = evaluation["summary"]
    speed = f", {summary['images_per_second']:.0f} images/s" if "images_per_second" in summary else ""
    print(f"{summary['params']:,} parameters{speed}")
    if data.quality.total:
        print(f"data quality: {data.quality.report()}")
    print(f"wrote {', '.join(str(out / f'{name}_{task}.json') for task in evaluation['records'])}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """One distillation per loss and per named combination from a shared teacher; writes ablation.json."""
    from vldistill.sweep import format_ablation_table, run_sweep

    cfg = _config(args)
    out = Path(args.out)
    _save_config(cfg, out)
    result = run_sweep(cfg, out, progress=_progress(args))
    print(format_ablation_table(result["runs"]))
    print(f"wrote {out / 'ablation.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Render one self-contained HTML page of the run folders (figures embedded): to --out, or to RUN_DIR/report.html
    for a single run."""
    from vldistill.report import REPORT_FILE, write_report

    if args.out is None and len(args.runs) > 1:
        raise ConfigError("several run folders: name the page with --out FILE.html")
    out = Path(args.out) if args.out is not None else Path(args.runs[0]) / REPORT_FILE
    report = write_report(args.runs, out)
    print(f"wrote {out}: {len(report.sections)} sections ({', '.join(s.title for s in report.sections)}), "
          f"{report.figures} figures, {len(report.html.encode('utf-8')):,} bytes")
    return 0


def cmd_cascade_eval(args: argparse.Namespace) -> int:
    """Sweep the threshold of a student -> teacher cascade on zero-shot classification (the config's test split,
    or `--data` with the config's data.classes); write cascade.json, cascade_summary.json and cascade.png; print
    the table and the cheapest threshold that keeps `--target` of the teacher's acc1."""
    from vldistill.data.bundle import load_data, load_test_data
    from vldistill.data.templates import expand_templates
    from vldistill.deploy.cascade import ZeroShotModel
    from vldistill.deploy.cascade_eval import check_target, evaluate_cascade
    from vldistill.deploy.report import format_cascade, write_cascade
    from vldistill.models.loading import load_dual_encoder_any

    if args.data is None and (args.split is not None or args.images is not None):
        raise ConfigError("--split and --images apply to the file given with --data")
    check_target(args.target)
    cfg = load_config(args.config, args.overrides)
    if args.data is not None:
        check_caption_file_options(args.data, args.split, args.images, ("--data", "--split", "--images"))
    student, student_tokenizer = load_dual_encoder_any(args.student)
    teacher, teacher_tokenizer = load_dual_encoder_any(args.teacher)
    progress = _progress(args)
    if args.data is not None:
        size = max(student.input_spec.image_size, teacher.input_spec.image_size)
        data_cfg = dataclasses.replace(
            cfg.data, dataset="files", test=args.data, test_split=args.split, test_image_root=args.images, image_size=size,
        )
        data = load_test_data(data_cfg, progress=progress)
    else:
        data = load_data(cfg.data, progress=progress)
    if data.zeroshot is None:
        raise ConfigError(f"{data.name} has no zero-shot classes: set data.classes to a folder of class folders")
    templates = expand_templates(cfg.eval.templates) if cfg.eval.templates else data.templates
    heads = [ZeroShotModel.build(model, tokenizer, data.classnames, templates, cfg.eval.batch_size)
             for model, tokenizer in ((student, student_tokenizer), (teacher, teacher_tokenizer))]
    result = evaluate_cascade(
        *heads, data.zeroshot.images, data.zeroshot.labels, criterion=args.criterion, target=args.target,
        points=args.points, latency_images=args.latency_images, latency_batch=args.latency_batch, trials=args.trials,
        batch_size=cfg.eval.batch_size, names={"student": args.student, "teacher": args.teacher}, dataset=data.name,
    )
    written = write_cascade(result, args.out)
    print(format_cascade(result))
    print(f"wrote {', '.join(str(path) for path in written)}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile saved models side by side (parameters and FLOPs per tower, latency at batch 1, throughput,
    peak memory, size on disk); print the table and write the JSON with --out."""
    import torch

    from vldistill.fileio import write_text_atomic
    from vldistill.profile.stats import ProfileSettings, format_profile, profile_folders

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = ProfileSettings(
        batch_size=args.batch_size, rounds=args.rounds, latency_calls=args.latency_calls,
        text_length=args.text_length, memory=not args.no_memory,
    )
    report = profile_folders(args.models, settings, progress=_progress(args)).as_dict()
    print(format_profile(report))
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a saved model as an ONNX image/text encoder pair checked in onnxruntime against PyTorch; with
    --int8, add onnxruntime dynamic-int8 graphs if they keep zero-shot acc1 on the config's test data within
    --max-drop of fp32 (else exit non-zero with both figures)."""
    from vldistill.data.bundle import load_data
    from vldistill.export.onnx import add_int8, export_onnx
    from vldistill.models.loading import load_dual_encoder_any, model_type_of

    if not args.int8 and (args.config is not None or args.overrides):
        raise ConfigError("--config and --set choose the data the --int8 gate evaluates on: give them with --int8")
    cfg = load_config(args.config, args.overrides)
    model, tokenizer = load_dual_encoder_any(args.model)
    out = Path(args.out)
    description = export_onnx(model, tokenizer, out, source=args.model, model_type=model_type_of(args.model))
    check = description["check"]
    print(
        f"wrote {out} (opset {description['opset']}); onnxruntime against PyTorch at batch {check['batch_size']}, "
        f"text length {check['text_length']}: max abs diff {check['max_abs_diff']['image']:.2g} (image), "
        f"{check['max_abs_diff']['text']:.2g} (text)"
    )
    if args.int8:
        progress = _progress(args)
        data = load_data(dataclasses.replace(cfg.data, image_size=model.input_spec.image_size), progress=progress)
        gate = add_int8(out, data, cfg.eval, args.max_drop, progress=progress)
        print(
            f"wrote {out / 'int8'}: zero-shot acc1 on {gate['data']} {gate['int8']['acc1']:.4f} (int8) against "
            f"{gate['fp32']['acc1']:.4f} (fp32), a drop of {gate['acc1_drop']:.4f} <= --max-drop {args.max_drop:g}"
        )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize a saved float CLIP student to int8 (post-training, or QAT + distillation from teacher.path), measure
    it beside fp32 (acc1, R@1, latency, size) and write it only if its zero-shot acc1 drops at most --max-drop;
    exit 1 with the figures otherwise."""
    from vldistill.data.bundle import load_data
    from vldistill.export.quantize import quantize_dynamic_int8
    from vldistill.fileio import write_text_atomic
    from vldistill.models.quantized import Int8Recipe
    from vldistill.train.qat import qat_config, quantize_with_qat

    if args.method != "qat" and (args.steps is not None or args.lr is not None):
        raise ConfigError("--steps and --lr set the QAT fine-tune: use them with --method qat")
    cfg = load_config(args.config, args.overrides)
    recipe, progress = Int8Recipe(args.granularity), _progress(args)
    data = load_data(cfg.data, progress=progress)
    if args.method == "qat":
        report = quantize_with_qat(
            qat_config(cfg, args.steps, args.lr), data, args.model, args.out, recipe=recipe, max_drop=args.max_drop,
            progress=progress,
        )
    else:
        report = quantize_dynamic_int8(
            args.model, args.out, data, cfg.eval, recipe=recipe, max_drop=args.max_drop, progress=progress
        )
    print(report.format())
    if args.report is not None:
        write_text_atomic(args.report, json.dumps(report.as_dict(), indent=2) + "\n")
        print(f"wrote the figures to {args.report}")
    if not report.accepted:
        return 1
    print(f"wrote {report.out}; load it with vldistill.export.quantize.load_quantized or `vldistill eval {report.out}`")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print registered names of one kind, one per line."""
    from vldistill.config import DATASETS
    from vldistill.losses import LOSSES

    kinds = {
        "losses": LOSSES.names(),
        "datasets": list(DATASETS),
        "configs": sorted(p.stem for p in packaged_config("demo").parent.glob("*.yaml")),
    }
    print("\n".join(kinds[args.kind]))
    return 0


def cmd_templates_search(args: argparse.Namespace) -> int:
    """Choose zero-shot prompt templates for a model by greedy search on held-out labelled images of the
    config's classes (never the test split); write them one per line and print acc1 of the default vs the
    chosen templates (eval/template_search.py)."""
    from vldistill.data.bundle import load_data
    from vldistill.eval.template_search import format_search, search_templates
    from vldistill.fileio import write_text_atomic
    from vldistill.models.contract import Captioner
    from vldistill.models.loading import load_dual_encoder_any

    cfg = load_config(args.config, args.overrides)
    path = args.model or cfg.teacher.path
    if path is None:
        raise ConfigError("give --model: the config has no teacher.path to choose templates for")
    model, tokenizer = load_dual_encoder_any(path)
    if isinstance(model, Captioner):
        raise ValueError(f"{path} is a captioning model: zero-shot templates need a dual encoder")
    progress = _progress(args)
    data = load_data(cfg.data, progress=progress)
    result = search_templates(
        model, tokenizer, data, cfg.eval, args.domains, args.max_templates, args.share, cfg.data.seed, progress=progress,
    )
    write_text_atomic(args.out, "".join(f"{template}\n" for template in result.templates))
    print(format_search(result))
    print(f"wrote {args.out}; evaluate with it: --set 'eval.templates=[file:{args.out}]'")
    return 0


def cmd_templates_list(args: argparse.Namespace) -> int:
    """Print the template library's domains: name, number of templates, description."""
    from vldistill.data.templates import library_domains, template_library

    library = template_library()
    for domain, description in library_domains().items():
        print(f"{domain:<10} {len(library[domain]):>4}  {description}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """Decode every sample of a pair source (or a config's data.train and data.test) once and report bad input."""
    from vldistill.data.quality import DataQuality
    from vldistill.data.sources import open_pairs, scan

    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    image_size = args.image_size
    if Path(args.path).suffix.lower() in (".yaml", ".yml"):
        data = load_config(args.path).data
        roles = (("train", data.train, data.train_split, data.train_image_root), ("test", data.test, data.test_split, data.test_image_root))
        sources = [(path, split, root, role) for role, path, split, root in roles if path]
        if not sources:
            raise ConfigError(f"{args.path}: data.train and data.test are not set (data.dataset is {data.dataset})")
        image_size = image_size or data.image_size
    else:
        sources = [(args.path, None, None, None)]
    failed, progress, checked = False, _progress(args), set()
    for path, split, root, role in sources:
        quality = DataQuality(threshold=args.threshold)
        source = open_pairs(path, image_size or 224, quality, split, root, default_split=role)
        read = getattr(source, "split", None)  # the split read from a Karpathy split file
        if (path, read, root) in checked:
            continue  # data.train and data.test are the same pairs
        checked.add((path, read, root))
        scan(source, progress=progress)
        print(f"{path}{f' ({read} split)' if read else ''}: {quality.report()}")
        failed |= quality.over_threshold()
    return 1 if failed else 0


def _add_config_args(parser: argparse.ArgumentParser, config_positional: bool) -> None:
    if config_positional:
        parser.add_argument("config", help="experiment YAML file")
    else:
        parser.add_argument("--config", default=None, help="experiment YAML file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set distill.train.steps=100 (repeatable)",
    )


QUIET_HELP = "no progress bars and no informational messages on stderr (warnings and errors still show)"


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    """`--quiet` after a subcommand's name; unset there (SUPPRESS) unless given, so a `--quiet` before
    the name holds."""
    parser.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand; `--quiet` is accepted before or after the subcommand."""
    parser = argparse.ArgumentParser(prog="vldistill", description=__doc__)
    parser.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, config_positional: bool = True, out: Optional[str] = None):
        parser = sub.add_parser(name, help=help)
        _add_quiet(parser)
        _add_config_args(parser, config_positional)
        parser.add_argument("--out", required=out is None, default=out, help="output folder")
        parser.set_defaults(func=func)
        return parser

    demo = command("demo", cmd_demo, "teacher -> distilled student vs baseline, on the embedded data", False, "demo_out")
    demo.add_argument(
        "--family", choices=sorted(DEMO_CONFIGS), default=None,
        help="clip (default): CLIP teacher and students; blip: BLIP retrieval and captioning teachers and students "
        "(DLIP), with ITM re-ranked retrieval and CIDEr (default config: the packaged demo_blip.yaml)",
    )
    command("pretrain-teacher", cmd_pretrain_teacher, "pretrain a teacher (CLIP; or BLIP retrieval + captioning)")
    distill = command("distill", cmd_distill, "distill a student from teacher.path")
    distill.add_argument("--no-eval", action="store_true", help="skip evaluating the student at the end")
    distill.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="PATH",
        help="continue from the newest checkpoint in OUT/student-checkpoints, or from PATH; 'auto': from the "
        "newest if there is one, else start (for commands a scheduler may restart)",
    )
    command(
        "prompt-distill", cmd_prompt_distill,
        "prompt distillation (PromptKD) on unlabeled images of the base classes; base-to-novel evaluation",
    )
    command(
        "region-distill", cmd_region_distill,
        "open-vocabulary region distillation (ViLD-text / ViLD-image) on boxes; base/novel accuracy and AP50",
    )
    command(
        "continual", cmd_continual,
        "re-distill continual.previous's student on a new domain (EWC penalty, prompt memory); old/new-domain accuracy",
    )
    evaluate = command("eval", cmd_eval, "zero-shot, retrieval or captioning evaluation of a saved model", False, "results")
    evaluate.add_argument("model", help="model folder (or hub id)")
    evaluate.add_argument("--name", default=None, help="model name in the results (default: folder name)")
    evaluate.add_argument(
        "--data", default=None, metavar="FILE",
        help="evaluate on this file's pairs instead of the config's test split: a Karpathy split file "
        "(dataset_coco.json, dataset_flickr30k.json), a COCO captions_*.json, or any pair source "
        "(retrieval hits: pair, unless --config or --set eval.retrieval_match says otherwise)",
    )
    evaluate.add_argument("--split", default=None, help="the Karpathy split to read from --data (default: test)")
    evaluate.add_argument(
        "--images", default=None, metavar="DIR", help="the folder --data's image paths are under (default: its folder)"
    )
    cache = sub.add_parser("cache", help="run the teachers once and store their embeddings (resumable)")
    _add_config_args(cache, config_positional=True)
    _add_quiet(cache)
    cache.add_argument("--out", default=None, metavar="CACHE_DIR", help="cache folder (default: cache.path)")
    cache.set_defaults(func=cmd_cache)
    command("sweep", cmd_sweep, "ablation: one run per loss and per named combination")
    cascade = command("cascade-eval", cmd_cascade_eval, "sweep a student -> teacher cascade's threshold", False)
    cascade.add_argument("--student", required=True, help="student model folder (or hub id)")
    cascade.add_argument("--teacher", required=True, help="teacher model folder (or hub id)")
    cascade.add_argument(
        "--data", default=None, metavar="FILE",
        help="test pairs from this file instead of the config's test split; zero-shot classes from data.classes",
    )
    cascade.add_argument("--split", default=None, help="the Karpathy split to read from --data (default: test)")
    cascade.add_argument("--images", default=None, metavar="DIR", help="the folder --data's image paths are under")
    cascade.add_argument("--criterion", choices=CRITERIA, default="max_prob",
                         help="the student's confidence: top probability, top-1 minus top-2, or 1 - entropy / ln C")
    cascade.add_argument("--target", type=float, default=0.99,
                         help="the fraction of the teacher's acc1 the recommended threshold must keep (default 0.99)")
    cascade.add_argument("--points", type=int, default=21, help="thresholds swept, at evenly spaced call rates (default 21)")
    cascade.add_argument("--latency-images", type=int, default=100, help="images the latency is timed on (default 100)")
    cascade.add_argument("--latency-batch", type=int, default=1,
                         help="images per request when timing latency (default 1: one image at a time)")
    cascade.add_argument("--trials", type=int, default=5, help="timed passes over the latency images (default 5)")

    report = sub.add_parser("report", help="one self-contained HTML page of run folders (figures embedded)")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (demo, distill, sweep, ...)")
    report.add_argument("--out", default=None, metavar="FILE.html",
                        help="the page to write (default: RUN_DIR/report.html for a single run)")
    _add_quiet(report)
    report.set_defaults(func=cmd_report)

    profile = sub.add_parser("profile", help="parameters, FLOPs, latency, throughput, memory and size of models, side by side")
    profile.add_argument("models", nargs="+", metavar="MODEL", help="model folders (or hub ids), the first is the reference")
    profile.add_argument("--out", default=None, metavar="FILE.json", help="also write the figures to this JSON file")
    profile.add_argument("--batch-size", type=int, default=32, help="batch of the throughput and memory figures (default 32)")
    profile.add_argument("--rounds", type=int, default=9, help="timed rounds, every model in each (default 9)")
    profile.add_argument("--latency-calls", type=int, default=10,
                         help="single-input calls per tower, model and round for latency p50/p95 (default 10)")
    profile.add_argument("--text-length", type=int, default=None,
                         help="tokens per text (default: each model's maximum, e.g. 77 for CLIP)")
    profile.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    profile.add_argument("--no-memory", action="store_true", help="skip peak memory (one fresh process per model)")
    _add_quiet(profile)
    profile.set_defaults(func=cmd_profile)

    export = command("export", cmd_export, "export a model as ONNX image/text encoders (checked; optional int8)", False)
    export.add_argument("model", help="model folder (or hub id)")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    export.add_argument(
        "--int8", action="store_true",
        help="also write onnxruntime dynamic-int8 graphs to OUT/int8, kept only if zero-shot acc1 on the config's "
        "test data (--config/--set; default: the demo's shapes) drops at most --max-drop",
    )
    export.add_argument("--max-drop", type=float, default=0.01,
                        help="largest acc1 drop int8 may cost, as a fraction (default 0.01 = 1 point)")

    quantize = command("quantize", cmd_quantize, "int8 student (post-training or QAT + KD), kept only if accurate", False)
    quantize.add_argument("model", help="float CLIP student folder")
    quantize.add_argument("--method", choices=["dynamic-int8", "qat"], required=True,
                          help="dynamic-int8: quantize the weights as they are; qat: fine-tune with int8 simulated, "
                          "distilling from teacher.path with distill.losses (needs --config), then quantize")
    quantize.add_argument("--max-drop", type=float, default=0.01,
                          help="largest zero-shot acc1 drop below fp32 to accept, as a fraction (default 0.01 = 1 point; "
                          "negative: demand a gain)")
    quantize.add_argument("--granularity", choices=["per-tensor", "per-channel"], default="per-tensor",
                          help="one int8 weight scale per tensor or per output channel (default per-tensor)")
    quantize.add_argument("--steps", type=int, default=None, help="QAT fine-tune steps (default 100)")
    quantize.add_argument("--lr", type=float, default=None, help="QAT learning rate (default distill.train.lr / 10)")
    quantize.add_argument("--report", default=None, metavar="FILE.json",
                          help="also write the figures and the verdict here (refused models too)")

    data = sub.add_parser("data", help="inspect pair data").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="decode every sample once; count bad input by kind (exit 1 over the threshold)")
    check.add_argument("path", help="manifest (.jsonl/.csv), image folder, save_to_disk folder, or experiment YAML (its data manifests)")
    check.add_argument("--threshold", type=float, default=0.01, help="largest acceptable bad share (default 0.01)")
    check.add_argument("--image-size", type=int, default=None, help="decode size (default: the config's data.image_size, else 224)")
    _add_quiet(check)
    check.set_defaults(func=cmd_data_check)

    templates = sub.add_parser("templates", help="the prompt template library; search templates for a model")
    templates = templates.add_subparsers(dest="templates_command", required=True)
    search = templates.add_parser(
        "search", help="greedy template search on held-out labelled images of the classes (never the test split)"
    )
    _add_config_args(search, config_positional=True)
    _add_quiet(search)
    search.add_argument("--out", required=True, metavar="FILE.txt", help="the chosen templates, one per line")
    search.add_argument("--model", default=None, help="model folder (or hub id) (default: teacher.path)")
    search.add_argument("--domains", nargs="+", default=None, metavar="DOMAIN",
                        help="library domains of the candidates (default: all; see `vldistill templates list`)")
    search.add_argument("--max-templates", type=int, default=None, help="stop after this many templates (default: no limit)")
    search.add_argument("--share", type=float, default=0.5,
                        help="without a labelled val split (shapes has one): the share of each class's images of "
                        "data.classes searched on, seeded by data.seed (default 0.5)")
    search.set_defaults(func=cmd_templates_search)
    template_list = templates.add_parser("list", help="the library's domains and their number of templates")
    _add_quiet(template_list)
    template_list.set_defaults(func=cmd_templates_list)

    listing = sub.add_parser("list", help="list registered losses, datasets or packaged configs")
    listing.add_argument("kind", choices=["losses", "datasets", "configs"])
    _add_quiet(listing)
    listing.set_defaults(func=cmd_list)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; configuration and input errors print one clear line and exit with status 2
    (set VLDISTILL_DEBUG=1 to see the traceback instead); a run stopped by SIGTERM exits with 143
    after checkpointing. The library's messages go to stderr (see `cli_logging`)."""
    args = build_parser().parse_args(argv)
    try:
        with cli_logging(args.quiet):
            return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, NonFiniteLossError, MissingExtraError) as error:
        if os.environ.get("VLDISTILL_DEBUG"):
            raise
        print(f"vldistill: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:  # a clean stop on SIGTERM: the shell's code for that signal
        print(f"vldistill: {stopped}", file=sys.stderr)
        return 128 + stopped.signal_number


if __name__ == "__main__":
    sys.exit(main())
