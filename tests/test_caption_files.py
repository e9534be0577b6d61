"""The benchmarks' caption files (Karpathy split JSON, COCO captions) as training and test data; test
splits of distinct images, each with all its captions (data.pairs.PairSplit)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vldistill.config import ConfigError, load_config
from vldistill.data.bundle import decode_pairs, load_data, load_test_data
from vldistill.data.caption_json import parse_split, read_caption_json
from vldistill.data.pairs import PairSplit
from vldistill.data.quality import DataQuality
from vldistill.data.sources import CaptionFilePairs, open_pairs
from vldistill.data.transforms import to_pixel_values
from vldistill.eval.retrieval import evaluate_retrieval

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def colour_captions(colour: str) -> list[str]:
    return [f"a {colour} square", f"{colour}", f"the {colour} one", f"something {colour}", f"all {colour}"]


def write_karpathy(folder, layout, filepath=True, name="dataset_coco.json", extra_images=()):
    """A Karpathy split file over solid-colour 12x12 PNGs: `layout` maps colour -> split; each image has
    the 5 `colour_captions`. With `filepath`, images sit in a subfolder per split (COCO layout), else
    beside each other (Flickr: no filepath)."""
    images = []
    for colour, split in layout.items():
        sub = f"{split}2014" if filepath else ""
        (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), COLOURS[colour]).save(folder / sub / f"{colour}.png")
        entry = {"filename": f"{colour}.png", "split": split, "sentences": [{"raw": c + " "} for c in colour_captions(colour)]}
        images.append({"filepath": sub, **entry} if filepath else entry)
    path = folder / name
    path.write_text(json.dumps({"images": [*images, *extra_images], "dataset": "coco"}))
    return path


def write_coco(folder, colours, annotations=None):
    """COCO captions_*.json over solid-colour PNGs in `folder/images`; image ids 10, 11, ..."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (12, 12), COLOURS[colour]).save(folder / "images" / f"{colour}.png")
        images.append({"id": 10 + i, "file_name": f"{colour}.png", "height": 12, "width": 12})
    if annotations is None:  # the captions of all images interleaved, as COCO lists them
        annotations = [
            {"id": 100 * k + i, "image_id": 10 + i, "caption": colour_captions(colour)[k]}
            for k in range(5) for i, colour in enumerate(colours)
        ]
    path = folder / "annotations" / "captions_val2017.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations, "licenses": []}))
    return path


class ColourModel(nn.Module):
    """A perfect model for solid-colour images: an image embeds as the one-hot of its brightest channel
    (or of dimension 3 when all channels are equal), a text as the one-hot of its colour word."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        means = pixel_values.mean(dim=(2, 3))
        flat = (means.max(dim=1).values - means.min(dim=1).values) < 1e-3
        index = torch.where(flat, 3, means.argmax(dim=1))
        return F.one_hot(index, 4).float()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.one_hot(input_ids[:, 0], 4).float()


def colour_tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    ids = [next(i for i, colour in enumerate(COLOURS) if colour in text.split()) for text in texts]
    return {"input_ids": torch.tensor(ids)[:, None], "attention_mask": torch.ones(len(texts), 1, dtype=torch.long)}


# ---------------------------------------------------------------- readers


def test_karpathy_reader_splits_paths_and_captions(tmp_path):
    path = write_karpathy(tmp_path, {"red": "train", "green": "test", "blue": "restval", "white": "val"})
    test = read_caption_json(path, "test")
    assert (test.format, test.split) == ("karpathy", "test")
    assert test.images == [tmp_path / "test2014" / "green.png"]
    assert test.captions == [colour_captions("green")]  # stripped, in file order
    assert test.bad == []
    union = read_caption_json(path, "train+restval")
    assert union.images == [tmp_path / "train2014" / "red.png", tmp_path / "restval2014" / "blue.png"]
    assert read_caption_json(path, default_split="val").images == [tmp_path / "val2014" / "white.png"]
    assert read_caption_json(path, "test", default_split="val").split == "test"  # an explicit split wins
    assert len(read_caption_json(path).images) == 4  # no split: the whole file
    with pytest.raises(ValueError, match=r"no images in split 'val'; the file's splits: restval \(1\), test \(1\), train \(1\)"):
        read_caption_json(write_karpathy(tmp_path / "three", {"red": "train", "green": "test", "blue": "restval"}), "val")
    with pytest.raises(ValueError, match="unknown split 'tset'"):
        parse_split("train+tset")


def test_flickr_layout_has_no_filepath_and_images_under_a_root(tmp_path):
    path = write_karpathy(tmp_path / "images", {"red": "test", "green": "test"}, filepath=False, name="dataset_flickr30k.json")
    moved = tmp_path / "dataset_flickr30k.json"
    path.rename(moved)
    listing = read_caption_json(moved, "test", image_root=tmp_path / "images")
    assert listing.images == [tmp_path / "images" / "red.png", tmp_path / "images" / "green.png"]
    with pytest.raises(FileNotFoundError, match=r"none of its 2 images exists under .*(--images)"):
        read_caption_json(moved, "test")  # default root: the file's folder, which holds no image


def test_empty_captions_and_captionless_images_are_counted(tmp_path):
    extra = [
        {"filename": "nothing.png", "split": "test", "sentences": []},
        {"filename": "blank.png", "split": "test", "sentences": [{"raw": "  "}, {"raw": None}, {"raw": "red"}]},
        {"filename": "other.png", "split": "train", "sentences": [{"raw": ""}]},  # another split: not read
    ]
    path = write_karpathy(tmp_path, {"red": "test"}, filepath=False, extra_images=extra)
    listing = read_caption_json(path, "test")
    assert listing.captions == [colour_captions("red"), ["red"]]
    assert [kind for kind, _ in listing.bad] == ["empty_caption"] * 3
    assert "images[1] nothing.png: no caption" in listing.bad[0][1]
    assert "images[2] blank.png: empty caption" in listing.bad[1][1]


def test_coco_captions_reader(tmp_path):
    stray = {"id": 99, "image_id": 404, "caption": "a red square"}
    annotations = [
        {"id": 1, "image_id": 11, "caption": "green"}, {"id": 2, "image_id": 10, "caption": "red "},
        stray, {"id": 3, "image_id": 11, "caption": "a green square"}, {"id": 4, "image_id": 10, "caption": ""},
    ]
    path = write_coco(tmp_path, ["red", "green", "blue"], annotations)
    listing = read_caption_json(path, image_root=tmp_path / "images", default_split="test")
    assert (listing.format, listing.split) == ("coco", None)  # one split per file: the default does not apply
    assert listing.images == [tmp_path / "images" / "red.png", tmp_path / "images" / "green.png"]
    assert listing.captions == [["red"], ["green", "a green square"]]
    kinds = sorted(kind for kind, _ in listing.bad)
    assert kinds == ["empty_caption", "empty_caption", "missing"]  # red's empty caption, blue has none, the stray
    assert any("annotations[2]: image_id 404 is not in the file's images" in example for _, example in listing.bad)
    with pytest.raises(ValueError, match="COCO captions file, which holds one split"):
        read_caption_json(path, "test", image_root=tmp_path / "images")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"images": [{"filename": "a.png"}]}', "not a caption file"),
        ("[1, 2]", "not a caption file"),
        ('{"images": [\n{"sentences": [], }]}', r"caption\.json:2 is not valid JSON"),
        ('{"images": [{"sentences": [], "split": "test"}]}', r"images\[0\] needs a \"filename\""),
        ('{"images": [], "annotations": [{"caption": "x"}]}', r"annotations\[0\] needs an \"image_id\""),
        ('{"images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}], "annotations": []}', "listed twice"),
    ],
)
def test_malformed_caption_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "caption.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_caption_json(path)


def test_non_utf8_caption_file(tmp_path):
    path = tmp_path / "caption.json"
    path.write_bytes(b'{"images": [{"filename": "caf\xe9.png"}]}')
    with pytest.raises(ValueError, match=r"caption\.json is not UTF-8 text \(byte 0xe9"):
        read_caption_json(path)


# ---------------------------------------------------------------- test splits of distinct images


def test_pair_split_holds_distinct_images_with_their_captions():
    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    split = PairSplit(images, ["a", "b", "c"], labels=np.array([3, 4]), text_to_image=[0, 1, 0])
    assert len(split) == 2 and split.caption_images().tolist() == [0, 1, 0]
    pairs = split.as_pairs()  # training: one row per caption
    assert len(pairs) == 3 and [pairs[i].caption for i in range(3)] == ["a", "b", "c"]
    assert torch.equal(pairs[2].image, torch.from_numpy(images[0]))
    assert PairSplit(images, ["a", "b"]).caption_images().tolist() == [0, 1]
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        PairSplit(images, ["a", "b", "c"])
    with pytest.raises(ValueError, match="each of the 2 images a caption"):
        PairSplit(images, ["a", "b"], text_to_image=[0, 0])
    with pytest.raises(ValueError, match="each of the 2 images a caption"):
        PairSplit(images, ["a", "b"], text_to_image=[0, 2])
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        PairSplit(images, ["a", "b"], labels=np.array([0, 1, 2]))


def test_decoded_test_split_is_distinct_images_and_a_perfect_model_scores_one(tmp_path):
    layout = {"red": "test", "green": "test", "blue": "test", "white": "train"}
    extra = [{"filename": "gone.png", "split": "test", "sentences": [{"raw": "a red square"}, {"raw": "red"}]}]
    path = write_karpathy(tmp_path, layout, filepath=False, extra_images=extra)
    quality = DataQuality()
    source = open_pairs(path, 8, quality, default_split="test")
    assert isinstance(source, CaptionFilePairs) and len(source) == 17  # 3 x 5 captions, 2 of the missing image
    split = decode_pairs(source, "read test pairs", progress=False)
    assert split.images.shape == (3, 8, 8, 3) and len(split.captions) == 15
    assert split.caption_images().tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert split.captions[5:10] == colour_captions("green")
    assert (quality.good, dict(quality.bad)) == (3, {"missing": 1})  # each image counted once
    metrics = evaluate_retrieval(
        ColourModel(), colour_tokenize, to_pixel_values(split.images), texts=split.captions,
        text_to_image=split.caption_images(), ks=(1, 5), progress=False,
    )
    assert set(metrics.values()) == {1.0}


def test_rows_sharing_an_image_in_a_manifest_are_one_test_image(tmp_path):
    Image.new("RGB", (12, 12), COLOURS["red"]).save(tmp_path / "red.png")
    Image.new("RGB", (12, 12), COLOURS["blue"]).save(tmp_path / "blue.png")
    rows = [
        {"image": "red.png", "caption": "red"}, {"image": "blue.png", "captions": ["blue", "a blue square"]},
        {"image": "red.png", "caption": "a red square"},
    ]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    split = decode_pairs(open_pairs(tmp_path / "test.jsonl", 8, DataQuality()), "read", progress=False)
    assert split.captions == ["red", "a red square", "blue", "a blue square"]
    assert split.caption_images().tolist() == [0, 0, 1, 1] and split.images.shape[0] == 2


# ---------------------------------------------------------------- configs and bundles


def test_one_karpathy_file_as_training_and_test_data(tmp_path):
    path = write_karpathy(tmp_path, {"red": "train", "green": "restval", "blue": "test", "white": "val"})
    overrides = ["data.dataset=files", f"data.train={path}", f"data.test={path}", "data.image_size=8"]
    data = load_data(load_config(None, overrides).data, progress=False)
    assert len(data.train) == 5 and data.train[0].caption == "a red square"  # train split: one pair per caption
    assert data.name == "dataset_coco_test" and len(data.test) == 1 and len(data.test.captions) == 5
    both = load_data(load_config(None, [*overrides, "data.train_split=train+restval", "data.test_split=val"]).data, progress=False)
    assert len(both.train) == 10 and both.test.captions == colour_captions("white")
    evaluation_only = load_test_data(load_config(None, overrides).data, progress=False)
    assert evaluation_only.train is None and evaluation_only.test.captions == colour_captions("blue")


def test_coco_captions_as_training_and_test_data(tmp_path):
    path = write_coco(tmp_path, ["red", "green"])
    overrides = [
        "data.dataset=files", f"data.train={path}", f"data.test={path}", "data.image_size=8",
        f"data.train_image_root={tmp_path / 'images'}", f"data.test_image_root={tmp_path / 'images'}",
    ]
    data = load_data(load_config(None, overrides).data, progress=False)
    assert len(data.train) == 10 and data.name == "captions_val2017"
    assert data.test.captions == [*colour_captions("red"), *colour_captions("green")]
    assert data.test.caption_images().tolist() == [0] * 5 + [1] * 5


def test_caption_file_config_errors_name_the_key(tmp_path):
    path = write_karpathy(tmp_path, {"red": "train", "green": "test"})
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps({"image": "train2014/red.png", "caption": "red"}) + "\n")
    files = ["data.dataset=files", f"data.train={path}", f"data.test={path}"]
    with pytest.raises(ConfigError, match="data.test_split: unknown split 'tset'"):
        load_config(None, [*files, "data.test_split=tset"])
    with pytest.raises(ConfigError, match=r"data.train_split applies only to a .json caption file .* in data.train"):
        load_config(None, [*files[:1], f"data.train={manifest}", files[2], "data.train_split=train"])
    with pytest.raises(ConfigError, match=r"data.test_image_root: '.*nowhere' is not a folder"):
        load_config(None, [*files, f"data.test_image_root={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="data.test_split applies only"):
        load_config(None, ["data.test_split=test"])  # shapes data: no caption file


def test_data_check_reads_each_split_of_a_caption_file(tmp_path, capsys):
    from vldistill.cli import main

    path = write_karpathy(tmp_path / "images", {"red": "train", "green": "test"}, filepath=False)
    path = path.rename(tmp_path / path.name)
    roots = {"train_image_root": str(tmp_path / "images"), "test_image_root": str(tmp_path / "images")}
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"data": {"dataset": "files", "train": str(path), "test": str(path), "image_size": 8, **roots}}))
    assert main(["data", "check", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{path} (train split): 5 good, 0 bad (0.00%; threshold 1%)", f"{path} (test split): 5 good, 0 bad (0.00%; threshold 1%)"]
