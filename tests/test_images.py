"""Decoding one image the same way in every source: sizes refused from the header before any pixel is
decoded (decompression bombs, very thin strips), every Pillow mode to RGB on the right scale."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vldistill.data.classes import ImageFolderClasses
from vldistill.data import images
from vldistill.data.images import BadImage, check_dimensions, decode_image
from vldistill.data.quality import DataQuality
from vldistill.data.sources import open_pairs
from vldistill.data.transforms import to_rgb
from vldistill.data.webdataset import WebDatasetPairs

SIZE = 8


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares an 8-bit greyscale width x height image (its pixel data is a
    few zero bytes: decoding it would allocate width * height bytes and then find it truncated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=format)
    return out.getvalue()


def forbid_decoding(monkeypatch) -> None:
    """From now on, fail the test if any image's pixels are decoded."""

    def load(self):
        raise AssertionError(f"decoded a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(Image.Image, "load", load)


def test_the_guard_catches_decoding(monkeypatch):
    small = encoded(Image.new("L", (SIZE, SIZE)))
    forbid_decoding(monkeypatch)
    with pytest.raises(AssertionError, match="decoded a"):  # so the test below would see a decode
        decode_image(small, SIZE)


def test_thin_and_huge_images_are_refused_before_decoding(tmp_path, monkeypatch):
    thin = tmp_path / "thin.png"
    thin.write_bytes(encoded(Image.new("L", (1, 20000), 128)))
    wide = encoded(Image.new("RGB", (2000, 40)))
    forbid_decoding(monkeypatch)
    with pytest.raises(BadImage) as refused:
        decode_image(thin, SIZE)
    assert refused.value.kind == "extreme_aspect" and "1x20000 has aspect ratio 20000.0:1" in refused.value.reason
    with pytest.raises(BadImage) as refused:
        decode_image(wide, SIZE)  # 50:1 the other way
    assert refused.value.kind == "extreme_aspect" and "2000x40" in refused.value.reason

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning does not leak either
        with pytest.raises(BadImage) as refused:
            decode_image(png_declaring(10000, 10000), SIZE)  # over our limit, under Pillow's error
    assert refused.value.kind == "too_large"
    assert refused.value.reason == "10000x10000 = 100,000,000 pixels, over the limit of 89,478,485 (a decompression bomb?)"
    with pytest.raises(BadImage) as refused:
        decode_image(png_declaring(100000, 100000), SIZE)  # Pillow refuses this one while opening
    assert refused.value.kind == "too_large" and "10000000000 pixels" in refused.value.reason


def test_dimension_limits():
    check_dimensions(20, 1)  # exactly the largest aspect ratio
    check_dimensions(9459, 9459)  # 89,472,681 pixels: under the limit
    with pytest.raises(BadImage, match="extreme_aspect: 21x1"):
        check_dimensions(21, 1)
    with pytest.raises(BadImage, match="too_large: 9460x9460"):
        check_dimensions(9460, 9460)
    with pytest.raises(BadImage, match="corrupt: declares 0x5"):
        check_dimensions(0, 5)


def test_what_is_not_an_image_is_named():
    noise = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)))
    for source, kind, reason in [
        (5, "not_image", "holds int, not an image"),  # e.g. a Hugging Face image column of numbers
        (b"plain text", "not_image", "not a readable image"),
        ("/nonexistent/x.png", "missing", "file does not exist"),
        (noise[: len(noise) // 2], "truncated", "cannot be decoded (image file is truncated"),
    ]:
        with pytest.raises(BadImage) as refused:
            decode_image(source, SIZE)
        assert refused.value.kind == kind and refused.value.reason.startswith(reason), source


def test_16_bit_greyscale_png_scales_to_8_bits(tmp_path):
    values = np.array([0, 32768, 65535, 1000, 257, 514, 40000, 65279], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(np.tile(values, (SIZE, 1))).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"  # the mode the fix is for (Pillow's convert("RGB") clips it at 255)
        assert np.asarray(image.convert("RGB"))[0, :, 0].tolist() == [0, 255, 255, 255, 255, 255, 255, 255]
    decoded = decode_image(path, SIZE)
    assert decoded.dtype == torch.uint8 and decoded.shape == (SIZE, SIZE, 3)
    # round(v / 257): 32768 / 257 = 127.5019, 1000 / 257 = 3.89, 40000 / 257 = 155.64, 65279 / 257 = 254.0
    expected = [0, 128, 255, 4, 1, 2, 156, 254]
    assert decoded[0, :, 0].tolist() == expected and (decoded == decoded[..., :1]).all()
    assert (decoded == torch.tensor(expected, dtype=torch.uint8)[None, :, None]).all()


def test_16_bit_pgm_opens_as_mode_i_and_scales_too():
    data = encoded(Image.fromarray(np.array([[0, 32768, 65535, 2570] * 2] * SIZE, dtype=np.uint16)), "PPM")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert decode_image(data, SIZE)[0, :4, 0].tolist() == [0, 128, 255, 10]


def pixels(image: Image.Image) -> list:
    return np.asarray(to_rgb(image)).reshape(-1, 3).tolist()


def test_unusual_modes_give_sensible_rgb():
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    for x in range(3):
        palette.putpixel((x, 0), x)
    palette.info["transparency"] = 1  # green is transparent: white shows through
    assert pixels(Image.open(io.BytesIO(encoded(palette)))) == [[255, 0, 0], [255, 255, 255], [0, 0, 255]]

    grey_alpha = Image.fromarray(np.array([[[100, 0], [100, 255], [100, 128]]], dtype=np.uint8), "LA")
    # alpha 128 over white: 100 * 128/255 + 255 * 127/255 = 177.2
    assert [p[0] for p in pixels(grey_alpha)] == [255, 100, 177]
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8), "RGBA")
    assert pixels(rgba) == [[255, 255, 255], [10, 20, 30]]
    grey_key = Image.new("L", (2, 1), 7)
    grey_key.putpixel((1, 0), 9)
    grey_key.info["transparency"] = 7  # a transparent colour (PNG tRNS) without an alpha channel
    assert pixels(grey_key) == [[255, 255, 255], [9, 9, 9]]

    assert pixels(Image.new("CMYK", (1, 1), (0, 255, 255, 0))) == [[255, 0, 0]]  # no cyan, full magenta+yellow
    assert pixels(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))) == [[0] * 3, [128] * 3, [255] * 3]
    assert pixels(Image.fromarray(np.array([[0.0, 100.0, 300.0, np.nan]], dtype=np.float32))) == [
        [0] * 3, [100] * 3, [255] * 3, [0] * 3
    ]  # a float image beyond 0..1 is read on Pillow's 0..255 scale
    assert pixels(Image.fromarray(np.array([[0, 32768, 65535, -5, 70000]], dtype=np.int32))) == [
        [0] * 3, [128] * 3, [255] * 3, [0] * 3, [255] * 3
    ]
    assert pixels(Image.new("1", (1, 1), 1)) == [[255, 255, 255]]
    assert pixels(Image.new("RGB", (1, 1), (1, 2, 3))) == [[1, 2, 3]]


def test_every_source_uses_the_same_rules(tmp_path):
    """A thin strip, a 16-bit greyscale image and a good image in a manifest, an image folder, a
    Hugging Face dataset, a webdataset shard and a class folder: the same refusals and pixels."""
    strip = encoded(Image.new("L", (1, 200), 50))
    deep = encoded(Image.fromarray(np.full((SIZE, SIZE), 32768, dtype=np.uint16)))
    good = encoded(Image.new("RGB", (SIZE, SIZE), (10, 20, 30)))
    files = {"strip": strip, "deep": deep, "good": good}
    folder, classes = tmp_path / "pairs", tmp_path / "classes"
    (classes / "class_a").mkdir(parents=True)
    folder.mkdir()
    for name, data in files.items():
        (folder / f"{name}.png").write_bytes(data)
        (folder / f"{name}.txt").write_text(f"a {name} image")
        (classes / "class_a" / f"{name}.png").write_bytes(data)
    manifest = folder / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"{name}.png", "caption": name}) + "\n" for name in files))
    with tarfile.open(tmp_path / "0.tar", "w") as archive:
        for name, data in files.items():
            for member, content in ((f"{name}.png", data), (f"{name}.txt", name.encode())):
                info = tarfile.TarInfo(member)
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"image": list(files.values()), "text": list(files)}).save_to_disk(str(tmp_path / "hf"))

    sources = {
        "manifest": lambda q: open_pairs(manifest, SIZE, q),
        "folder": lambda q: open_pairs(folder, SIZE, q),
        "hf": lambda q: open_pairs(tmp_path / "hf", SIZE, q),
        "webdataset": lambda q: WebDatasetPairs(str(tmp_path / "0.tar"), SIZE, q, shuffle_shards=False),
        "classes": lambda q: ImageFolderClasses(classes, SIZE, q),
    }
    for name, make in sources.items():
        quality = DataQuality()
        dataset = make(quality)
        samples = list(dataset) if isinstance(dataset, WebDatasetPairs) else [dataset[i] for i in range(len(dataset))]
        decoded = sorted((int(s.image[0, 0, 0]), int(s.image[0, 0, 2])) for s in samples if s is not None)
        assert decoded == [(10, 30), (128, 128)], name
        assert quality.good == 2 and dict(quality.bad) == {"extreme_aspect": 1}, name
        assert "1x200 has aspect ratio 200.0:1" in quality.examples["extreme_aspect"][0], name



def test_decompression_bombs_in_a_shard_are_counted_and_the_rest_is_used(tmp_path, monkeypatch):
    members = [
        ("a.png", encoded(Image.new("RGB", (SIZE, SIZE), (10, 0, 0)))), ("a.txt", b"first"),
        ("bomb.png", png_declaring(100000, 100000)), ("bomb.txt", b"Pillow refuses it while opening"),
        ("big.png", png_declaring(10000, 10000)), ("big.txt", b"over our limit"),
        ("large.png", encoded(Image.new("RGB", (40, 30)))), ("large.txt", b"over the test's limit"),
        ("b.png", encoded(Image.new("RGB", (SIZE, SIZE), (20, 0, 0)))), ("b.txt", b"last"),
    ]
    with tarfile.open(tmp_path / "0.tar", "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)  # a low limit, for a real image over it
    quality = DataQuality()
    samples = list(WebDatasetPairs(str(tmp_path / "0.tar"), SIZE, quality, shuffle_shards=False))
    assert [(s.caption, s.index, int(s.image[0, 0, 0])) for s in samples] == [("first", 0, 10), ("last", 4, 20)]
    assert quality.good == 2 and dict(quality.bad) == {"too_large": 3}
    bomb, big, large = quality.examples["too_large"]
    assert bomb.startswith("0.tar:bomb: Image size (10000000000 pixels) exceeds limit")  # Pillow's message
    assert big == "0.tar:big: 10000x10000 = 100,000,000 pixels, over the limit of 1,000 (a decompression bomb?)"
    assert large == "0.tar:large: 40x30 = 1,200 pixels, over the limit of 1,000 (a decompression bomb?)"
