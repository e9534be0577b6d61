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
from vldistill.distributed import process_rank
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


def cmd_demo(args: argparse.Namespace) -> int:
    """Teacher, distilled student and baseline on the embedded data, with a printed table."""
    from vldistill.demo import format_summary, run_demo

    cfg = _config(args, default="demo")
    summary = run_demo(cfg, Path(args.out), progress=_progress(args))
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / 'summary.json'} and the student to {Path(args.out) / 'student'}")
    return 0


def cmd_pretrain_teacher(args: argparse.Namespace) -> int:
    """Pretrain the config's teacher with the CLIP loss on the embedded data."""
    from vldistill.data.bundle import load_data
    from vldistill.train.runs import pretrain_teacher

    cfg = _config(args)
    out = Path(args.out)
    _save_config(cfg, out)
    progress = _progress(args)
    data = load_data(cfg.data, progress=progress)
    pretrain_teacher(cfg, data, out / "teacher", log_dir=out / "logs", progress=progress)
    print(f"teacher saved to {out / 'teacher'}")
    print(f"data quality: {data.quality.report()}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Distill the config's student from `teacher.path` and evaluate it."""
    from vldistill.data.bundle import load_data
    from vldistill.eval.suite import SUMMARY_KEYS, evaluate_model
    from vldistill.export import write_card
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
    if not args.no_eval:
        evaluation = evaluate_model(student.model, student.tokenizer, data, cfg.eval, "student", out / "results", progress)
        summary = evaluation["summary"]
        write_card(student.path, {key: summary[key] for key in SUMMARY_KEYS}, data.name)
        print(json.dumps(summary, indent=2))
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
    the config has classes) and write CLIP_benchmark-style records."""
    from vldistill.data.bundle import load_data, load_test_data
    from vldistill.eval.results import format_records
    from vldistill.eval.suite import evaluate_model
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
    evaluation = evaluate_model(model, tokenizer, data, cfg.eval, name, out, progress=progress)
    print(format_records(evaluation["records"]))
    summary = evaluation["summary"]
    print(f"{summary['params']:,} parameters, {summary['images_per_second']:.0f} images/s")
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

    command("demo", cmd_demo, "teacher -> distilled student vs baseline, on the embedded data", False, "demo_out")
    command("pretrain-teacher", cmd_pretrain_teacher, "pretrain a teacher with the CLIP loss")
    distill = command("distill", cmd_distill, "distill a student from teacher.path")
    distill.add_argument("--no-eval", action="store_true", help="skip evaluating the student at the end")
    distill.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="PATH",
        help="continue from the newest checkpoint in OUT/student-checkpoints, or from PATH; 'auto': from the "
        "newest if there is one, else start (for commands a scheduler may restart)",
    )
    evaluate = command("eval", cmd_eval, "zero-shot and retrieval evaluation of a saved model", False, "results")
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

    data = sub.add_parser("data", help="inspect pair data").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="decode every sample once; count bad input by kind (exit 1 over the threshold)")
    check.add_argument("path", help="manifest (.jsonl/.csv), image folder, save_to_disk folder, or experiment YAML (its data manifests)")
    check.add_argument("--threshold", type=float, default=0.01, help="largest acceptable bad share (default 0.01)")
    check.add_argument("--image-size", type=int, default=None, help="decode size (default: the config's data.image_size, else 224)")
    _add_quiet(check)
    check.set_defaults(func=cmd_data_check)

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
    except (ConfigError, FileNotFoundError, ValueError, NonFiniteLossError) as error:
        if os.environ.get("VLDISTILL_DEBUG"):
            raise
        print(f"vldistill: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:  # a clean stop on SIGTERM: the shell's code for that signal
        print(f"vldistill: {stopped}", file=sys.stderr)
        return 128 + stopped.signal_number


if __name__ == "__main__":
    sys.exit(main())
