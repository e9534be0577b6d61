"""Pairs from a JSONL manifest: decoding, resizing, clear errors, and a whole distillation on them."""

import json

import numpy as np
import pytest
from PIL import Image

from vldistill.cli import main
from vldistill.config import ConfigError, load_config, packaged_config
from vldistill.data.manifest import load_image, manifest_classnames, read_manifest
from vldistill.data.synthetic import make_split
from vldistill.eval.results import read_result


def write_manifest(folder, split, count, seed=0, with_labels=True):
    """Save `count` shapes images as PNG files of varied sizes and a manifest listing them."""
    data = make_split(split, count, seed=seed, image_size=24)
    rows = []
    for i, (image, caption, attrs) in enumerate(zip(data.images, data.captions, data.attributes)):
        name = f"{split}_{i}.png"
        Image.fromarray(image).resize((24 + 8 * (i % 2), 24)).save(folder / name)  # some not square
        row = {"image": name, "caption": caption}
        if with_labels:
            row["label"] = f"{attrs['colour']} {attrs['shape']}"
        rows.append(row)
    path = folder / f"{split}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255  # a white band in the middle half of a wide image
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    # After scaling to 10x20 the band spans columns 5-15, so the centre crop (columns 5-15) is all white.
    assert out[:, 1:9].min() > 240


def test_read_manifest_with_labels(tmp_path):
    path = write_manifest(tmp_path, "test", 6)
    names = manifest_classnames(path)
    split = read_manifest(path, 16, names, progress=False)
    assert split.images.shape == (6, 16, 16, 3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert split.captions == [r["caption"] for r in rows]
    assert [names[i] for i in split.labels] == [r["label"] for r in rows]


def test_manifest_without_labels_has_no_classes(tmp_path):
    assert manifest_classnames(write_manifest(tmp_path, "test", 3, with_labels=False)) is None


@pytest.mark.parametrize(
    "content, error, message",
    [
        ('{"image": "missing.png", "caption": "a red circle"}\n', FileNotFoundError, "missing.png does not exist"),
        ('{"image": "corrupt.png", "caption": "a red circle"}\n', ValueError, "corrupt.png cannot be decoded"),
        ('{"image": "x.png"}\n', ValueError, r"m\.jsonl:1 needs a non-empty"),
        ('{"image": "x.png", "caption": "ok"}\nnot json\n', ValueError, r"m\.jsonl:2 is not valid JSON"),
        ("\n", ValueError, "lists no pairs"),
    ],
)
def test_bad_manifest_input_is_named(tmp_path, content, error, message):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    path = tmp_path / "m.jsonl"
    path.write_text(content)
    with pytest.raises(error, match=message):
        read_manifest(path, 16, progress=False)


def test_manifest_config_requires_existing_files(tmp_path):
    with pytest.raises(ConfigError, match="data.train_manifest is required"):
        load_config(None, ["data.dataset=manifest"])
    with pytest.raises(ConfigError, match="data.test_manifest: file .* does not exist"):
        train = write_manifest(tmp_path, "train", 2)
        load_config(None, ["data.dataset=manifest", f"data.train_manifest={train}", f"data.test_manifest={tmp_path / 'no.jsonl'}"])


def test_pretrain_distill_eval_on_manifest_data(tmp_path):
    train, test = write_manifest(tmp_path, "train", 64), write_manifest(tmp_path, "test", 24)
    data = ["--set", "data.dataset=manifest", "--set", f"data.train_manifest={train}",
            "--set", f"data.test_manifest={test}", "--set", "data.image_size=16"]
    tiny = str(packaged_config("tiny"))
    assert main(["pretrain-teacher", tiny, "--out", str(tmp_path / "t"), *data]) == 0
    teacher = tmp_path / "t" / "teacher"
    assert main(["distill", tiny, "--out", str(tmp_path / "d"), *data, "--set", f"teacher.path={teacher}"]) == 0
    record = read_result(tmp_path / "d" / "results" / "student_zeroshot_classification.json")
    assert record["dataset"] == "test" and 0 <= record["metrics"]["acc1"] <= 1
    retrieval = read_result(tmp_path / "d" / "results" / "student_zeroshot_retrieval.json")
    assert "text_retrieval_recall@1" in retrieval["metrics"]
