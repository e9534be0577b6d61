"""Lazy pair sources over bad input, class folders, templates and `vldistill data check`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vldistill.cli import main
from vldistill.data.classes import DEFAULT_TEMPLATES, ImageFolderClasses, load_templates
from vldistill.data.pairs import PairCollator, drop_bad
from vldistill.data.quality import DataQuality
from vldistill.data.sources import FolderPairs, HFDatasetPairs, ManifestPairs, open_pairs, scan

SIZE = 8


def expected(path) -> np.ndarray:
    """Resize the shorter side to SIZE and centre-crop, computed here with PIL independently."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        s = SIZE / min(w, h)
        nw, nh = max(SIZE, round(w * s)), max(SIZE, round(h * s))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - SIZE) // 2, (nh - SIZE) // 2
        return np.asarray(image.crop((left, top, left + SIZE, top + SIZE)))


def make_png(path, seed: int, size=(12, 10)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def folder(tmp_path):
    """3 good PNGs with captions, a truncated PNG, a text file named .jpg, an image with an empty caption."""
    for i in range(3):
        make_png(tmp_path / f"good{i}.png", i, (12 + 4 * i, 10))
        (tmp_path / f"good{i}.txt").write_text(f"caption {i}\n")
    make_png(tmp_path / "cut.png", 9, (32, 32))
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.txt").write_text("a cut image")
    (tmp_path / "text.jpg").write_text("this is not an image")
    (tmp_path / "text.txt").write_text("a text file")
    make_png(tmp_path / "blank.png", 7)
    (tmp_path / "blank.txt").write_text("  \n\n")
    return tmp_path


def manifest_rows():
    return [
        {"image": "good0.png", "caption": "caption 0"},
        {"image": "good1.png", "captions": ["caption 1", "another 1"]},
        {"image": "good2.png", "caption": "caption 2"},
        {"image": "gone.png", "caption": "a missing image"},
        {"image": "cut.png", "caption": "a cut image"},
        {"image": "text.jpg", "caption": "a text file"},
        {"image": "blank.png", "caption": " "},
    ]


def good_samples(dataset):
    return [s for s in (dataset[i] for i in range(len(dataset))) if s is not None]


def check_counts(quality, good):
    assert quality.good == good
    assert dict(quality.bad) == {"missing": 1, "truncated": 1, "not_image": 1, "empty_caption": 1}
    assert "gone.png" in quality.examples["missing"][0]
    assert "cut.png" in quality.examples["truncated"][0]
    assert "text.jpg" in quality.examples["not_image"][0]
    assert "blank" in quality.examples["empty_caption"][0]


def test_jsonl_manifest_yields_exactly_the_good_pairs(folder):
    path = folder / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in manifest_rows()))
    quality = DataQuality()
    dataset = ManifestPairs(path, SIZE, quality)
    assert not hasattr(dataset, "images") and len(dataset) == 7  # 4 good pairs + missing, cut, text
    dataset[0], dataset[0]  # fetching again within a pass does not count again
    assert quality.good == 1
    samples = good_samples(dataset)
    assert [s.caption for s in samples] == ["caption 0", "caption 1", "another 1", "caption 2"]
    for sample, name in zip(samples, ["good0", "good1", "good1", "good2"]):
        assert sample.image.dtype == torch.uint8 and sample.image.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(sample.image.numpy(), expected(folder / f"{name}.png"))
    check_counts(quality, good=4)
    good_samples(dataset)  # ... but the next pass counts everything again
    assert quality.good == 8 and quality.bad["empty_caption"] == 2 and quality.bad["missing"] == 2


def test_csv_manifest(folder):
    path = folder / "m.csv"
    lines = ["image,caption"] + [f"{r['image']},{r.get('caption', 'caption 1')}" for r in manifest_rows()]
    path.write_text("\n".join(lines) + "\n")
    quality = DataQuality()
    assert [s.caption for s in good_samples(open_pairs(path, SIZE, quality))] == ["caption 0", "caption 1", "caption 2"]
    check_counts(quality, good=3)
    assert "m.csv:8" in quality.examples["empty_caption"][0]
    (folder / "bad.csv").write_text("path,text\nx.png,a\n")
    with pytest.raises(ValueError, match=r"bad.csv:1.*\"image\" and \"caption\""):
        ManifestPairs(folder / "bad.csv", SIZE, DataQuality())


def test_folder_pairs(folder):
    (folder / "good1.txt").write_text("caption 1\n\nanother 1\n")
    quality = DataQuality()
    dataset = open_pairs(folder, SIZE, quality)
    assert isinstance(dataset, FolderPairs)
    samples = good_samples(dataset)
    assert [s.caption for s in samples] == ["caption 0", "caption 1", "another 1", "caption 2"]
    np.testing.assert_array_equal(samples[3].image.numpy(), expected(folder / "good2.png"))
    assert quality.good == 4
    assert dict(quality.bad) == {"truncated": 1, "not_image": 1, "empty_caption": 1}
    assert "blank.txt" in quality.examples["empty_caption"][0]


def test_hf_dataset_with_pil_images(folder):
    datasets = pytest.importorskip("datasets")
    images = [Image.open(folder / f"good{i}.png").copy() for i in range(3)]
    texts = [["caption 0", "another 0"], ["caption 1"], [" "]]
    datasets.Dataset.from_dict({"image": images, "text": texts}).save_to_disk(str(folder / "hf"))
    quality = DataQuality()
    dataset = open_pairs(folder / "hf", SIZE, quality)
    assert isinstance(dataset, HFDatasetPairs)
    samples = good_samples(dataset)
    assert [s.caption for s in samples] == ["caption 0", "another 0", "caption 1"]
    np.testing.assert_array_equal(samples[2].image.numpy(), expected(folder / "good1.png"))
    assert quality.good == 3 and dict(quality.bad) == {"empty_caption": 1}
    assert "[row 2]" in quality.examples["empty_caption"][0]
    with pytest.raises(ValueError, match="no column 'caption'"):
        HFDatasetPairs(folder / "hf", SIZE, DataQuality(), text_column="caption")


def test_open_pairs_rejects_unknown_sources(tmp_path):
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(ValueError, match="not a pair source"):
        open_pairs(tmp_path, SIZE, DataQuality())
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_pairs(tmp_path / "nowhere", SIZE, DataQuality())


def test_loader_batch_with_bad_samples_collates_the_good(folder):
    path = folder / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in manifest_rows()))
    dataset = ManifestPairs(path, SIZE, DataQuality())
    collate = PairCollator(lambda images, captions: {"pixel_values": images.float(), "n": torch.tensor(len(captions))})
    batch = next(iter(DataLoader(dataset, batch_size=6, collate_fn=collate)))
    assert batch["pixel_values"].shape == (4, SIZE, SIZE, 3)
    assert batch["sample_index"].tolist() == [0, 1, 2, 3]
    assert [s.caption for s in drop_bad([None, dataset[0], None])] == ["caption 0"]


def test_image_folder_classes(tmp_path):
    for c, folder in enumerate(["golden_retriever", "tabby_cat"]):
        (tmp_path / folder).mkdir()
        for i in range(2):
            make_png(tmp_path / folder / f"{i}.png", 10 * c + i)
    (tmp_path / "tabby_cat" / "broken.jpg").write_text("nope")
    quality = DataQuality()
    dataset = ImageFolderClasses(tmp_path, SIZE, quality)
    assert dataset.classnames == ["golden retriever", "tabby cat"]
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s.label for s in samples if s is not None] == [0, 0, 1, 1]
    np.testing.assert_array_equal(samples[2].image.numpy(), expected(tmp_path / "tabby_cat" / "0.png"))
    assert quality.good == 4 and dict(quality.bad) == {"not_image": 1}
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"golden_retriever": "dog", "tabby_cat": "cat"}))
    assert ImageFolderClasses(tmp_path, SIZE, DataQuality(), names).classnames == ["dog", "cat"]
    names.write_text(json.dumps({"golden_retriever": "dog"}))
    with pytest.raises(ValueError, match="names.json has no class name for folder.*tabby_cat"):
        ImageFolderClasses(tmp_path, SIZE, DataQuality(), names)


def test_load_templates(tmp_path):
    assert load_templates(None) == list(DEFAULT_TEMPLATES)
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\n\nart of a {}\n")
    assert load_templates(path) == ["a photo of a {}.", "art of a {}"]
    path.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ValueError, match=r"t.txt:2: template 'a photo'"):
        load_templates(path)


def test_data_check_exit_codes(folder, capsys):
    path = folder / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in manifest_rows()))
    assert main(["data", "check", str(path), "--image-size", str(SIZE)]) == 1
    out = capsys.readouterr().out
    assert "4 good, 4 bad" in out and "missing: 1, e.g." in out and "gone.png" in out and "truncated: 1" in out
    assert main(["data", "check", str(path), "--image-size", str(SIZE), "--threshold", "0.5"]) == 0
    good = folder / "good.jsonl"
    good.write_text(json.dumps(manifest_rows()[0]))
    assert main(["data", "check", str(good)]) == 0
    assert "1 good, 0 bad" in capsys.readouterr().out


def test_scan_counts_one_pass(folder):
    quality = DataQuality()
    assert scan(FolderPairs(folder, SIZE, quality), progress=False) == 3
    assert quality.total == 6


def test_data_check_reads_webdataset_shards(tmp_path, capsys):
    import io
    import tarfile

    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        for key, data in [("0.png", None), ("0.txt", b"a caption"), ("1.jpg", b"not an image"), ("1.txt", b"text")]:
            if data is None:
                buffer = io.BytesIO()
                Image.new("RGB", (10, 12), (200, 10, 10)).save(buffer, "PNG")
                data = buffer.getvalue()
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert main(["data", "check", str(tmp_path), "--image-size", str(SIZE), "--threshold", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "1 good, 1 bad" in out and "not_image: 1" in out


def test_manifest_lines_that_are_not_utf8_are_skipped_and_named(folder, capsys):
    lines = [json.dumps(row).encode() for row in manifest_rows()[:3]]
    lines.insert(1, b'{"image": "good1.png", "caption": "caf\xe9 latin-1"}')  # line 2: not UTF-8
    path = folder / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")  # a byte-order mark and CRLF line ends too
    quality = DataQuality()
    dataset = ManifestPairs(path, SIZE, quality)
    assert [s.caption for s in good_samples(dataset)] == ["caption 0", "caption 1", "another 1", "caption 2"]
    assert quality.good == 4 and dict(quality.bad) == {"not_utf8": 1}
    assert quality.examples["not_utf8"] == [f"{path}:2: not valid UTF-8 (byte 0xe9)"]
    assert main(["data", "check", str(path), "--image-size", str(SIZE), "--threshold", "0.5"]) == 0
    assert f"not_utf8: 1, e.g. {path}:2: not valid UTF-8 (byte 0xe9)" in capsys.readouterr().out

    csv_path = folder / "m.csv"
    csv_path.write_bytes(b'image,caption\ngood0.png,"two\nlines"\ngood1.png,caf\xe9\ngood2.png,caption 2\n')
    quality = DataQuality()
    assert [s.caption for s in good_samples(ManifestPairs(csv_path, SIZE, quality))] == ["two\nlines", "caption 2"]
    assert quality.examples["not_utf8"] == [f"{csv_path}:4: not valid UTF-8 (byte 0xe9)"]  # row 2 ends on line 4

    path.write_bytes(b'{"image": "good0.png", "caption": "\xff"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl lists no pairs \(skipped 1 undecodable line\(s\), e.g. .*m.jsonl:1: not valid UTF-8"):
        ManifestPairs(path, SIZE, DataQuality())


def test_caption_file_lines_that_are_not_utf8_are_skipped(folder):
    (folder / "good1.txt").write_bytes(b"caption 1\ncaf\xe9\nanother 1\n")
    (folder / "good2.txt").write_bytes(b"\xff\xfe")  # its only line is not UTF-8: not also an empty caption
    quality = DataQuality()
    samples = good_samples(FolderPairs(folder, SIZE, quality))
    assert [s.caption for s in samples] == ["caption 0", "caption 1", "another 1"]
    assert quality.bad["not_utf8"] == 2 and quality.bad["empty_caption"] == 1
    assert quality.examples["not_utf8"] == [
        f"{folder / 'good1.txt'}:2: not valid UTF-8 (byte 0xe9)", f"{folder / 'good2.txt'}:1: not valid UTF-8 (byte 0xff)"
    ]


def test_data_check_reports_refused_sizes(folder, capsys):
    Image.new("L", (1, 400)).save(folder / "strip.png")
    path = folder / "sizes.jsonl"
    path.write_text(json.dumps({"image": "good0.png", "caption": "fine"}) + "\n" + json.dumps({"image": "strip.png", "caption": "thin"}))
    assert main(["data", "check", str(path), "--image-size", str(SIZE)]) == 1
    out = capsys.readouterr().out
    assert "1 good, 1 bad" in out and "extreme_aspect: 1, e.g. " in out and "strip.png: 1x400 has aspect ratio 400.0:1" in out
