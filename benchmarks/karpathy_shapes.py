"""A saved model on a small retrieval set in the Karpathy split format, scored through the real CLI.

Writes a Karpathy split file and its PNG images into a work folder, runs `python -m vldistill eval MODEL
--data <work>/dataset_shapes.json --out <work>/results` in a subprocess, as a user would, echoes the table
it prints to stderr, reads the CLIP_benchmark-style record it writes, and prints one JSON line to stdout
with the keys

    {"benchmark", "model", "image_size", "seed", "images", "captions", "distinct_captions",
     "retrieval_match", "metrics", "table", "identical_caption", "seconds"}

The set: `dataset_shapes.json` in the format of `dataset_flickr30k.json` (images[].filename / split /
sentences[].raw, file names relative to the file's folder, "dataset": "shapes") with N images (default
200) of the embedded shapes data's test-split generator (`vldistill.data.synthetic.make_split("test", N,
seed)`; at 32 pixels and seed 0 these are the first N images of the demo's test split), drawn at the model's
image size (its config.json, else its preprocessor_config.json, else 32). Each image has 5 captions,
5 wordings of the same four attributes, every one stating size, colour, shape and position (so each
caption determines all four):

    a {size} {colour} {shape} {position}                 (grammar.CANONICAL_CAPTION: val/test captions)
    a photo of a {size} {colour} {shape} {position}      (a training wording)
    {position} there is a {size} {colour} {shape}        (a training wording)
    a picture of a {size} {colour} {shape} {position}    (new; training says "a picture of a {colour} ...")
    there is a {size} {colour} {shape} {position}        (new order of training phrases)

The other training wordings leave out size or position and are not used. Every word is in the shapes
vocabulary (`grammar.vocabulary()`), so a model trained on the shapes data has no unknown tokens.

`metrics` and `table` are the CLI's scoring without `--config`: `retrieval_match` "pair", as
CLIP_benchmark scores COCO and Flickr30k (a text hits only its own image, an image only its own 5
captions). Shapes captions repeat across images (two images with the same four attributes have the
same 5 captions; `distinct_captions` counts the distinct caption texts), and "pair" counts retrieving an
equally correct twin as a miss. `identical_caption` holds the figures of a second run with `--set
eval.retrieval_match=identical_caption` (any image holding an identical caption is a hit), as `{"retrieval_match",
"metrics", "table"}`. `seconds` is the wall time of each eval run. Progress goes to stderr.

    vldistill demo && python benchmarks/karpathy_shapes.py demo_out/student
    python benchmarks/karpathy_shapes.py MODEL --num-images 500 --work-dir shapes_set   # keep the set
    python benchmarks/karpathy_shapes.py --tiny    # a tiny CLIP trained here for seconds, 20 images (CI)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from PIL import Image

from vldistill.config import packaged_config
from vldistill.data import grammar, synthetic

CAPTION_WORDINGS = (
    grammar.CANONICAL_CAPTION,
    "a photo of a {size} {colour} {shape} {position}",
    "{position} there is a {size} {colour} {shape}",
    "a picture of a {size} {colour} {shape} {position}",
    "there is a {size} {colour} {shape} {position}",
)
DEFAULT_IMAGE_SIZE = 32
TINY_IMAGES = 20
TINY_TEACHER_STEPS = 100  # the tiny config's CLIP in ~2 s: loss 3.5 -> ~2.0 on its 256 training pairs


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The benchmark's flags; exactly one of MODEL (positional or --model) and --tiny."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="saved model folder (or hub id) to evaluate")
    parser.add_argument("--model", dest="model_option", default=None, help="the same as MODEL")
    parser.add_argument("--tiny", action="store_true", help=f"a tiny CLIP trained here, {TINY_IMAGES} images: checks it runs")
    parser.add_argument("--num-images", type=int, default=None, help="images in the set (default 200; 20 with --tiny)")
    parser.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shapes test-split generator (default 0)")
    parser.add_argument("--work-dir", default=None, help="keep the set and results here (default: a temporary folder, deleted)")
    args = parser.parse_args(argv)
    if args.model and args.model_option and args.model != args.model_option:
        parser.error(f"two models given: {args.model} and --model {args.model_option}")
    args.model = args.model or args.model_option
    if args.tiny and args.model:
        parser.error("give a MODEL to evaluate or --tiny (a tiny model trained here), not both")
    if not args.tiny and not args.model:
        parser.error("give a MODEL to evaluate (a saved model folder), or --tiny")
    args.num_images = args.num_images or (TINY_IMAGES if args.tiny else 200)
    if args.num_images < 1:
        parser.error(f"--num-images must be at least 1, got {args.num_images}")
    return args


def model_image_size(model: str) -> int:
    """The image side a saved model takes: its config.json's vision_config.image_size, else its
    preprocessor_config.json's crop_size, else DEFAULT_IMAGE_SIZE (also for a hub id)."""
    folder = Path(model)
    config, processor = folder / "config.json", folder / "preprocessor_config.json"
    if config.is_file():
        size = json.loads(config.read_text()).get("vision_config", {}).get("image_size")
        if size:
            return int(size)
    if processor.is_file():
        crop = json.loads(processor.read_text()).get("crop_size")
        size = crop.get("height") if isinstance(crop, dict) else crop
        if size:
            return int(size)
    return DEFAULT_IMAGE_SIZE


def captions_for(attributes: dict[str, str]) -> list[str]:
    """The 5 captions of an image with these attributes, one per wording in CAPTION_WORDINGS."""
    fields = {**attributes, "position": grammar.POSITION_PHRASES[attributes["position"]]}
    return [wording.format(**fields) for wording in CAPTION_WORDINGS]


def write_dataset(folder: Path, count: int, image_size: int, seed: int) -> Path:
    """Write `count` shapes test images as PNGs and their Karpathy split file `dataset_shapes.json`
    (Flickr layout: file names relative to the file's folder) into `folder`; return the file's path."""
    data = synthetic.make_split("test", count, seed=seed, image_size=image_size)
    entries = []
    for index, (image, attributes) in enumerate(zip(data.images, data.attributes)):
        filename = f"{index:05d}.png"
        Image.fromarray(image).save(folder / filename)
        sentids = list(range(index * len(CAPTION_WORDINGS), (index + 1) * len(CAPTION_WORDINGS)))
        sentences = [
            {"raw": text, "tokens": text.split(), "imgid": index, "sentid": sentid}
            for sentid, text in zip(sentids, captions_for(attributes))
        ]
        entries.append({"filename": filename, "imgid": index, "split": "test", "sentids": sentids, "sentences": sentences})
    path = folder / "dataset_shapes.json"
    path.write_text(json.dumps({"images": entries, "dataset": "shapes"}) + "\n")
    return path


def vldistill(args: list[str]) -> str:
    """Run `python -m vldistill ARGS` (stderr passed through), echo its stdout to stderr and return it;
    exit naming the command when it fails."""
    done = subprocess.run([sys.executable, "-m", "vldistill", *args], stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", file=sys.stderr)
    if done.returncode:
        raise SystemExit(f"vldistill {args[0]} failed (exit {done.returncode}): vldistill {' '.join(args)}")
    return done.stdout


def train_tiny_model(work: Path) -> Path:
    """A tiny CLIP (the tiny config's teacher: 2 layers, width 32, 16-pixel images) trained with the CLIP
    loss on 256 shapes pairs for TINY_TEACHER_STEPS steps by `vldistill pretrain-teacher`; its folder."""
    out = work / "tiny-run"
    vldistill([
        "pretrain-teacher", str(packaged_config("tiny")), "--out", str(out),
        "--set", f"teacher.train.steps={TINY_TEACHER_STEPS}", "--set", "teacher.train.log_every=50",
    ])
    return out / "teacher"


def evaluate(model: str, data: Path, out: Path, name: Optional[str], overrides: list[str]) -> tuple[dict, str, float]:
    """Run `vldistill eval MODEL --data DATA --out OUT` (plus --name and --set overrides); return its
    retrieval record, its printed table (without the `wrote ...` line) and its wall seconds."""
    start = time.perf_counter()
    printed = vldistill([
        "eval", model, "--data", str(data), "--out", str(out), *(["--name", name] if name else []),
        *(arg for override in overrides for arg in ("--set", override)),
    ])
    seconds = time.perf_counter() - start
    records = sorted(out.glob("*_zeroshot_retrieval.json"))
    if len(records) != 1:
        raise SystemExit(f"{out}: expected one *_zeroshot_retrieval.json record, found {len(records)}")
    table = "\n".join(line for line in printed.splitlines() if not line.startswith("wrote "))
    return json.loads(records[0].read_text()), table, seconds


def run(args: argparse.Namespace, work: Path) -> dict:
    """Build the set (and the tiny model), evaluate with pair and identical_caption hits; the JSON figures."""
    model, name = args.model, None
    if args.tiny:
        print(f"training a tiny CLIP for {TINY_TEACHER_STEPS} steps", file=sys.stderr)
        model, name = str(train_tiny_model(work)), "tiny-clip"
    image_size = args.image_size or model_image_size(model)
    print(f"writing {args.num_images} shapes images of {image_size}x{image_size} with 5 captions each", file=sys.stderr)
    data = write_dataset(work, args.num_images, image_size, args.seed)
    record, table, seconds = evaluate(model, data, work / "results", name, [])
    identical, identical_table, identical_seconds = evaluate(
        model, data, work / "results-identical_caption", name, ["eval.retrieval_match=identical_caption"]
    )
    captions = [s["raw"] for entry in json.loads(data.read_text())["images"] for s in entry["sentences"]]
    return {
        "benchmark": "karpathy_shapes",
        "model": f"tiny CLIP ({TINY_TEACHER_STEPS} steps of the tiny config's teacher)" if args.tiny else model,
        "image_size": image_size,
        "seed": args.seed,
        "images": record["images"],
        "captions": record["captions"],
        "distinct_captions": len(set(captions)),
        "retrieval_match": record["retrieval_match"],
        "metrics": record["metrics"],
        "table": table,
        "identical_caption": {"retrieval_match": identical["retrieval_match"], "metrics": identical["metrics"], "table": identical_table},
        "seconds": {"pair": round(seconds, 2), "identical_caption": round(identical_seconds, 2)},
    }


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="karpathy-shapes-") as scratch:
        work = Path(args.work_dir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
