"""Profile model folders side by side (what `vldistill profile` measures) and print ONE JSON line:

    {"flops_convention", "memory_method", "text_input", "settings", "environment", "models",
     "relative_to_first", "seconds"}

Per model (`models`, in the order given): parameters per tower, FLOPs of one image and one text (2 per
multiply-add, `flops_convention`), latency p50/p95 at batch 1, throughput at --batch-size, peak memory of a
fresh process loading the model and embedding one batch (`memory_method`), and bytes of weight files; all
models timed in the same rounds. `relative_to_first`: every later model against the first (parameters and
FLOPs as fractions, speed-ups per tower at batch 1 and at the batch, medians of per-round ratios): where
fewer FLOPs did not buy the same speed-up. `seconds` is the wall time of the whole profile. The table goes
to stderr. Run it alone on the machine: other work changes the timings.

    python benchmarks/profile_models.py demo_out/teacher demo_out/student demo_out/baseline
    python benchmarks/profile_models.py T S --batch-size 64 --rounds 15 --threads 1
    python benchmarks/profile_models.py --tiny    # two tiny CLIPs built here, 2 rounds (CI, seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import CLIPModel

from vldistill.config import load_config, packaged_config
from vldistill.data.grammar import vocabulary
from vldistill.data.tokenizer import build_word_tokenizer
from vldistill.models import CLIPDualEncoder, clip_config_from_spec
from vldistill.profile.stats import ProfileSettings, format_profile, profile_folders


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", metavar="MODEL", help="model folders; the first is the reference")
    parser.add_argument("--tiny", action="store_true", help="profile the tiny config's teacher and student, built here")
    parser.add_argument("--batch-size", type=int, default=None, help="throughput and memory batch (default 32; 4 with --tiny)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9; 2 with --tiny)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory figures")
    args = parser.parse_args(argv)
    if bool(args.models) == args.tiny:
        parser.error("give model folders, or --tiny (not both)")
    return args


def save_tiny_models(folder: Path) -> list[str]:
    """The tiny config's teacher and student architectures with random weights, saved as CLIP folders."""
    cfg = load_config(packaged_config("tiny"))
    tokenizer = build_word_tokenizer(vocabulary(), max_length=32)
    paths = []
    for name, spec in (("teacher", cfg.teacher.model), ("student", cfg.student.model)):
        config = clip_config_from_spec(
            spec, image_size=cfg.data.image_size, vocab_size=len(tokenizer), max_text_length=32,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(0)
        paths.append(str(CLIPDualEncoder(CLIPModel(config)).save_pretrained(folder / name, tokenizer=tokenizer)))
    return paths


def main(argv: Optional[list[str]] = None) -> None:
    """Profile the models and print the JSON line."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = ProfileSettings(
        batch_size=args.batch_size or (4 if args.tiny else 32),
        rounds=args.rounds or (2 if args.tiny else 9),
        latency_calls=3 if args.tiny else 10,
        memory=not args.no_memory,
    )
    with tempfile.TemporaryDirectory() as work:
        paths = save_tiny_models(Path(work)) if args.tiny else args.models
        start = time.perf_counter()
        report = profile_folders(paths, settings, progress=True).as_dict()
        seconds = time.perf_counter() - start
    print(format_profile(report), file=sys.stderr)
    print(json.dumps({**report, "seconds": seconds}))


if __name__ == "__main__":
    main()
