"""Streaming data at scale: write img2dataset-style shards of small synthetic pairs (one shard at a
time), stream each set once through a DataLoader (batch 128, PairCollator with the demo student's
preprocessing) with 0 and 2 workers, each run in a fresh subprocess, and print ONE JSON line:

    {"rss_mb_10k", "rss_mb_100k", "rss_ratio", "samples_per_s_10k", "samples_per_s_100k", "workers",
     "tiny_student_step_s"}

`workers` lists the worker counts; every other field but `tiny_student_step_s` maps each count
(as a string) to its value. rss_mb is the run's peak resident set: the largest of the loading process's
and its workers' peaks (ru_maxrss). tiny_student_step_s is the median wall time of one AdamW training
step (CLIP loss, batch 128, 32x32) of the demo config's student, to compare with the time loading a
batch takes (128 / samples_per_s). Everything else goes to stderr.

    python benchmarks/data_scale.py                         # 10k and 100k pairs
    python benchmarks/data_scale.py --small 2000 --large 20000
    python benchmarks/data_scale.py --tiny                  # 200 and 1,200 pairs, 1 worker, 1 timed step: does it run? (CI)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader
from transformers import CLIPModel

from vldistill.config import load_config, packaged_config
from vldistill.data.pairs import PairCollator
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.data.quality import DataQuality
from vldistill.data.grammar import vocabulary
from vldistill.data.tokenizer import build_word_tokenizer, make_tokenize
from vldistill.data.webdataset import WebDatasetPairs, write_synthetic_shards
from vldistill.models.student import clip_config_from_spec

IMAGE_SIZE, BATCH, TEXT_LENGTH, PAIRS_PER_SHARD = 32, 128, 32, 1000


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The benchmark's flags (`--child` is the internal per-run mode)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=None, help="pairs of the small set, reported as _10k (default 10,000)")
    parser.add_argument("--large", type=int, default=None, help="pairs of the large set, reported as _100k (default 100,000)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader worker counts (default 0 2)")
    parser.add_argument("--tiny", action="store_true", help="200 and 1,200 pairs, 1 worker: checks the script runs")
    parser.add_argument("--child", nargs=2, metavar=("SHARDS", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {"small": 200, "large": 1200, "workers": [1]} if args.tiny else {
        "small": 10_000, "large": 100_000, "workers": [0, 2]
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def collator() -> PairCollator:
    """The demo student's collation: CLIP-normalized pixels and word-tokenizer ids."""
    tokenizer = build_word_tokenizer(vocabulary(), max_length=TEXT_LENGTH)
    return PairCollator(BatchPreprocessor(make_tokenize(tokenizer, TEXT_LENGTH)))


def stream_once(shards: str, workers: int) -> dict:
    """Stream every pair of `shards` once; samples, seconds and the peak RSS (MB) of this process and its workers."""
    quality = DataQuality()
    loader = DataLoader(WebDatasetPairs(shards, IMAGE_SIZE, quality), batch_size=BATCH, num_workers=workers, collate_fn=collator())
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += batch["pixel_values"].shape[0]
    seconds = time.perf_counter() - start
    del loader  # joins the workers, so RUSAGE_CHILDREN covers them
    peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"samples": samples, "seconds": seconds, "rss_mb": peak_kb / 1024}


def run_child(shards: Path, workers: int) -> dict:
    """`stream_once` in a fresh Python process, so each run's peak RSS is its own."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(shards), str(workers)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"streaming {shards} with {workers} workers failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def student_step_seconds(steps: int = 5) -> float:
    """Median wall time of one training step of the demo student (CLIP loss, AdamW) on a batch of 128."""
    spec = load_config(packaged_config("demo")).student.model
    tokenizer = build_word_tokenizer(vocabulary(), max_length=TEXT_LENGTH)
    config = clip_config_from_spec(
        spec, image_size=IMAGE_SIZE, vocab_size=len(tokenizer), max_text_length=TEXT_LENGTH,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    words = vocabulary()
    captions = [" ".join(words[(i + j) % len(words)] for j in range(6)) for i in range(BATCH)]
    inputs = {"pixel_values": torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE), **make_tokenize(tokenizer, TEXT_LENGTH)(captions)}
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss = model(**inputs, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: Optional[list[str]] = None) -> None:
    """Write both shard sets, stream each with every worker count, and print the JSON line."""
    args = parse_args(argv)
    if args.child:
        print(json.dumps(stream_once(args.child[0], int(args.child[1]))))
        return
    result: dict = {"workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in (("10k", args.small), ("100k", args.large)):
            folder = Path(tmp) / label
            start = time.perf_counter()
            write_synthetic_shards(folder, size, PAIRS_PER_SHARD, image_size=IMAGE_SIZE)
            print(f"wrote {size} pairs in {time.perf_counter() - start:.1f}s", file=sys.stderr)
            for workers in args.workers:
                run = run_child(folder, workers)
                if run["samples"] != size:
                    raise RuntimeError(f"streamed {run['samples']} of {size} pairs with {workers} workers")
                print(f"{label} workers={workers}: {run}", file=sys.stderr)
                result.setdefault(f"rss_mb_{label}", {})[str(workers)] = round(run["rss_mb"], 1)
                result.setdefault(f"samples_per_s_{label}", {})[str(workers)] = round(run["samples"] / run["seconds"], 1)
    result["rss_ratio"] = {w: round(result["rss_mb_100k"][w] / result["rss_mb_10k"][w], 3) for w in result["rss_mb_10k"]}
    result["tiny_student_step_s"] = round(student_step_seconds(steps=1 if args.tiny else 5), 4)
    print(json.dumps({key: result[key] for key in (
        "rss_mb_10k", "rss_mb_100k", "rss_ratio", "samples_per_s_10k", "samples_per_s_100k", "workers", "tiny_student_step_s"
    )}))


if __name__ == "__main__":
    main()
