"""`vldistill eval MODEL --data FILE`: a saved tiny CLIP student on a small Karpathy-format set (PNG
images, 5 captions each), end to end through the command line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import IMAGE_SIZE, SMALL_SPEC, build_clip, config_for
from PIL import Image

from vldistill.cli import main
from vldistill.data.synthetic import make_split
from vldistill.data.transforms import fit_image, to_pixel_values
from vldistill.eval.results import read_result
from vldistill.models.io import save_dual_encoder


def five_captions(caption: str, attributes: dict[str, str]) -> list[str]:
    colour, shape, size = attributes["colour"], attributes["shape"], attributes["size"]
    return [caption, f"a {colour} {shape}", f"a {size} {shape}", f"the {shape} is {colour}", f"a picture of a {colour} {shape}"]


def write_karpathy_set(folder, test_images=4):
    """A Flickr-style Karpathy file (no filepath): `test_images` test images and 2 val images, shapes PNGs
    of 24x20 pixels (not square: decoding crops), 5 captions each."""
    data = make_split("test", test_images + 2, seed=3, image_size=24)
    entries = []
    for i, (image, caption, attributes) in enumerate(zip(data.images, data.captions, data.attributes)):
        Image.fromarray(image).resize((24, 20)).save(folder / f"{i}.png")
        split = "test" if i < test_images else "val"
        sentences = [{"raw": text, "tokens": text.split()} for text in five_captions(caption, attributes)]
        entries.append({"filename": f"{i}.png", "imgid": i, "split": split, "sentences": sentences})
    path = folder / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path


@pytest.fixture
def saved_student(tmp_path, tokenizer):
    model = build_clip(config_for(SMALL_SPEC, tokenizer), seed=1)
    return model, save_dual_encoder(model, tokenizer, tmp_path / "student")


@torch.no_grad()
def expected_recalls(model, tokenizer, image_paths, captions, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K computed another way: from each query's rank of its positives (the number of candidates
    scoring higher, plus equal ones listed before), on images decoded here."""
    pixels = to_pixel_values(np.stack([fit_image(Image.open(p), IMAGE_SIZE) for p in image_paths]))
    tokens = tokenizer(captions, padding="longest", return_tensors="pt")
    scores = model.encode_image(pixels) @ model.encode_text(tokens["input_ids"], tokens["attention_mask"]).T

    def rank(row: torch.Tensor, j: int) -> int:
        return int((row > row[j]).sum()) + int((row[:j] == row[j]).sum())

    text_ranks = [rank(scores[:, t], text_to_image[t]) for t in range(len(captions))]
    image_ranks = [
        min(rank(scores[i], t) for t in range(len(captions)) if text_to_image[t] == i) for i in range(len(image_paths))
    ]
    metrics = {f"image_retrieval_recall@{k}": sum(r < k for r in text_ranks) / len(text_ranks) for k in ks}
    metrics.update({f"text_retrieval_recall@{k}": sum(r < k for r in image_ranks) / len(image_ranks) for k in ks})
    return metrics


def test_eval_data_prints_the_recall_table_and_writes_records(tmp_path, tokenizer, saved_student, capsys):
    model, folder = saved_student
    path = write_karpathy_set(tmp_path)
    out = tmp_path / "results"
    assert main(["eval", str(folder), "--data", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = read_result(out / "student_zeroshot_retrieval.json")
    assert (record["dataset"], record["model"], record["task"]) == ("dataset_flickr30k_test", "student", "zeroshot_retrieval")
    assert (record["images"], record["captions"], record["retrieval_match"]) == (4, 20, "pair")
    assert record["data_quality"]["good"] == 4 and record["data_quality"]["bad"] == {}
    test = [entry for entry in json.loads(path.read_text())["images"] if entry["split"] == "test"]
    captions = [sentence["raw"] for entry in test for sentence in entry["sentences"]]
    images = [tmp_path / entry["filename"] for entry in test]
    expected = expected_recalls(model, tokenizer, images, captions, [t // 5 for t in range(20)])
    assert record["metrics"] == pytest.approx(expected, abs=1e-6)
    assert 0 < expected["image_retrieval_recall@1"] < 1  # a random student: neither trivially right nor wrong
    metrics = record["metrics"]
    lines = printed.splitlines()
    assert lines[0] == "student on dataset_flickr30k_test: 4 images, 20 captions, hits: pair"
    assert lines[1] == "retrieval         R@1     R@5    R@10"
    assert lines[2] == "text->image  " + "".join(f"{metrics[f'image_retrieval_recall@{k}']:>8.3f}" for k in (1, 5, 10))
    assert lines[3] == "image->text  " + "".join(f"{metrics[f'text_retrieval_recall@{k}']:>8.3f}" for k in (1, 5, 10))
    assert not (out / "student_zeroshot_classification.json").exists()  # no classes: retrieval only


def write_classes(folder, colours=("red", "green", "blue")):
    """A folder per colour class holding two shapes images of that colour."""
    data = make_split("test", 60, seed=5, image_size=IMAGE_SIZE)
    for colour in colours:
        (folder / colour).mkdir(parents=True)
        picked = [i for i, a in enumerate(data.attributes) if a["colour"] == colour][:2]
        for i in picked:
            Image.fromarray(data.images[i]).save(folder / colour / f"{i}.png")
    return folder


def test_eval_data_with_few_classes_reports_acc1_and_says_why_not_acc5(tmp_path, saved_student, capsys):
    _, folder = saved_student
    path = write_karpathy_set(tmp_path)
    classes = write_classes(tmp_path / "classes")
    out = tmp_path / "results"
    args = ["eval", str(folder), "--data", str(path), "--split", "val", "--set", f"data.classes={classes}", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    retrieval = read_result(out / "student_zeroshot_retrieval.json")
    assert (retrieval["dataset"], retrieval["images"], retrieval["captions"]) == ("dataset_flickr30k_val", 2, 10)
    record = read_result(out / "student_zeroshot_classification.json")
    assert set(record["metrics"]) == {"acc1", "mean_per_class_recall"} and record["classes"] == 3
    assert record["note"] == "acc5 not reported: only 3 classes (top-k accuracy is reported when there are more than k)"
    metrics = record["metrics"]
    assert (
        f"zero-shot (3 classes): acc1 {metrics['acc1']:.3f}, mean per-class recall {metrics['mean_per_class_recall']:.3f}"
        in printed.splitlines()
    )
    assert f"  note: {record['note']}" in printed.splitlines()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "test"], "--split and --images apply to the file given with --data"),
        (["--data", "DATA", "--split", "tset"], "--split: unknown split 'tset'"),
        (["--data", "MANIFEST", "--split", "test"], "--split applies only to a .json caption file"),
        (["--data", "DATA", "--images", "NOWHERE"], "--images: '.*nowhere' is not a folder"),
    ],
)
def test_eval_data_option_errors(tmp_path, saved_student, capsys, extra, message):
    _, folder = saved_student
    path = write_karpathy_set(tmp_path)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "0.png", "caption": "a red square"}) + "\n")
    names = {"DATA": str(path), "MANIFEST": str(tmp_path / "pairs.jsonl"), "NOWHERE": str(tmp_path / "nowhere")}
    assert main(["eval", str(folder), *[names.get(arg, arg) for arg in extra], "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("vldistill: error: ") and re.search(message, error), error
    assert not (tmp_path / "r").exists()


def test_pixel_batches_normalize_as_the_model_expects():
    from vldistill.eval.suite import pixel_batches
    from vldistill.models.inputs import InputSpec

    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    spec = InputSpec(image_size=4, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    batches = list(pixel_batches(images, spec, batch_size=2))
    assert [len(batch) for batch in batches] == [2, 2, 1]
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1  # (x - 0.5) / 0.5
    assert torch.allclose(torch.cat(batches), expected, atol=1e-6)
