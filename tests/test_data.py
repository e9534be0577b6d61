"""Tests for vldistill.data: the synthetic shapes set, the offline word tokenizer and preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vldistill.data.grammar import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, SIZES, class_names, vocabulary
from vldistill.data.synthetic import make_split, render
from vldistill.data.tokenizer import BOS, EOS, PAD, UNK, build_word_tokenizer, make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.models.inputs import CLIP_MEAN, CLIP_STD

TINT_NOISE = 12  # std of the per-image colour jitter in render()


# ---------------------------------------------------------------- synthetic shapes


def test_make_split_is_deterministic_in_seed() -> None:
    a, b = make_split("train", 16, seed=3, image_size=16), make_split("train", 16, seed=3, image_size=16)
    assert np.array_equal(a.images, b.images)
    assert a.captions == b.captions and a.attributes == b.attributes
    assert np.array_equal(a.labels, b.labels)
    assert len(a) == 16 and a.images.shape == (16, 16, 16, 3) and a.images.dtype == np.uint8


def test_make_split_differs_across_seeds_and_splits() -> None:
    base = make_split("test", 16, seed=0, image_size=16)
    other_seed = make_split("test", 16, seed=1, image_size=16)
    other_split = make_split("val", 16, seed=0, image_size=16)
    for other in (other_seed, other_split):
        assert not np.array_equal(base.images, other.images)
        assert base.captions != other.captions
    # The first images of train/val/test for one seed are all different draws.
    train = make_split("train", 16, seed=0, image_size=16)
    assert not np.array_equal(train.images[0], base.images[0])
    assert not np.array_equal(train.images[0], other_split.images[0])


def test_make_split_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="train, val, test"):
        make_split("dev", 4)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_captions_are_canonical(split: str) -> None:
    data = make_split(split, 40, seed=0, image_size=16)
    for caption, attrs in zip(data.captions, data.attributes):
        assert caption == f"a {attrs['size']} {attrs['colour']} {attrs['shape']} {POSITION_PHRASES[attrs['position']]}"
        words = caption.split()
        assert attrs["size"] in words and attrs["colour"] in words and attrs["shape"] in words
        assert caption.endswith(attrs["position"])


def test_train_captions_vary_but_always_name_colour_and_shape() -> None:
    data = make_split("train", 60, seed=0, image_size=16)
    for caption, attrs in zip(data.captions, data.attributes):
        assert f"{attrs['colour']} {attrs['shape']}" in caption
    canonical = [
        f"a {a['size']} {a['colour']} {a['shape']} {POSITION_PHRASES[a['position']]}" for a in data.attributes
    ]
    assert sum(c != k for c, k in zip(data.captions, canonical)) > 20
    assert any(a["size"] not in c.split() for c, a in zip(data.captions, data.attributes))  # size left out
    assert any(c.startswith("a photo of") for c in data.captions)
    assert len({len(c.split()) for c in data.captions}) > 3


def test_labels_index_size_colour_shape_classes() -> None:
    data = make_split("train", 60, seed=5, image_size=16)
    colours = list(COLOURS)
    for label, attrs in zip(data.labels, data.attributes):
        size_index = list(SIZES).index(attrs["size"])
        assert label == (size_index * len(colours) + colours.index(attrs["colour"])) * len(SHAPES) + SHAPES.index(attrs["shape"])
        assert class_names()[label] == f"{attrs['size']} {attrs['colour']} {attrs['shape']}"
        assert attrs["size"] in SIZES and attrs["position"] in POSITIONS
    assert data.labels.dtype == np.int64
    assert len(class_names()) == len(SIZES) * len(COLOURS) * len(SHAPES)


def test_large_circles_have_their_colour_at_the_centre() -> None:
    size = 32
    data = make_split("test", 80, seed=0, image_size=size)
    found = 0
    for image, attrs in zip(data.images, data.attributes):
        if attrs["size"] != "large" or attrs["shape"] != "circle":
            continue
        found += 1
        fy, fx = POSITIONS[attrs["position"]]
        row, col = int(fy * size), int(fx * size)  # within ~1.3 px of the jittered centre, radius > 9 px
        centre = image[row, col].astype(int)
        assert np.all(np.abs(centre - np.array(COLOURS[attrs["colour"]])) <= 4 * TINT_NOISE), (attrs, centre)
        # The shape is filled with one tint: its neighbours are the very same colour.
        assert np.array_equal(image[row + 1, col], image[row, col])
        assert np.array_equal(image[row, col - 1], image[row, col])
    assert found >= 2


@pytest.mark.parametrize("colour", list(COLOURS))
def test_render_draws_the_colour_on_a_dark_background(colour: str) -> None:
    image = render("circle", colour, "large", "center", 32, np.random.default_rng(0))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.all(np.abs(image[16, 16].astype(int) - np.array(COLOURS[colour])) <= 4 * TINT_NOISE)
    # Corners are 22 px from the centre, beyond the largest radius (0.32 * 32 * 1.1 < 11.3): background.
    for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
        assert corner.max() < 100
        assert corner[0] == corner[1] == corner[2]  # grey noise


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(vocabulary(), max_length=32)


def test_special_token_ids(tok) -> None:
    assert tok.convert_tokens_to_ids([PAD, UNK, BOS, EOS]) == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.eos_token_id != 2  # HF CLIP's legacy argmax pooling triggers on eos_token_id == 2
    assert len(tok) == 4 + len(vocabulary())


def test_every_vocabulary_word_has_its_own_id(tok) -> None:
    words = vocabulary()
    ids = tok.convert_tokens_to_ids(words)
    assert tok.unk_token_id not in ids and len(set(ids)) == len(words)
    assert all(i >= 4 for i in ids)
    # Every word the captions and class names use is in the vocabulary.
    data = make_split("train", 40, seed=0, image_size=16)
    for text in data.captions + class_names():
        assert tok.unk_token_id not in tok(text)["input_ids"], text


def test_texts_are_wrapped_in_bos_eos_and_lower_cased(tok) -> None:
    ids = tok("A Large RED circle")["input_ids"]
    assert ids == [tok.bos_token_id, *tok.convert_tokens_to_ids(["a", "large", "red", "circle"]), tok.eos_token_id]
    assert tok("a zebra")["input_ids"] == [2, tok.convert_tokens_to_ids("a"), tok.unk_token_id, 3]


def test_make_tokenize_pads_to_the_longest(tok) -> None:
    texts = ["a red circle", "a photo of a large blue square at the top left", "a cross"]
    out = make_tokenize(tok, 32)(texts)
    lengths = [len(t.split()) + 2 for t in texts]
    assert out["input_ids"].shape == out["attention_mask"].shape == (3, max(lengths))
    assert out["input_ids"].dtype == torch.long
    assert out["attention_mask"].sum(dim=1).tolist() == lengths
    for row, mask, n in zip(out["input_ids"], out["attention_mask"], lengths):
        assert row[0] == tok.bos_token_id and row[n - 1] == tok.eos_token_id
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (row[n:] == tok.pad_token_id).all()
        assert (row == tok.eos_token_id).sum() == 1


def test_make_tokenize_truncates_but_keeps_eos(tok) -> None:
    out = make_tokenize(tok, 5)(["a photo of a large blue square at the top left"])
    assert out["input_ids"].tolist() == [[2, *tok.convert_tokens_to_ids(["a", "photo", "of"]), 3]]


# ---------------------------------------------------------------- preprocessing


def test_to_pixel_values_matches_manual_normalization() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    pixels = to_pixel_values(images)
    assert pixels.shape == (2, 3, 5, 7) and pixels.dtype == torch.float32
    manual = np.empty((2, 3, 5, 7), dtype=np.float64)
    for n in range(2):
        for c in range(3):
            manual[n, c] = (images[n, :, :, c] / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
    assert np.allclose(pixels.numpy(), manual, atol=1e-5)
    # Black and white land at -mean/std and (1 - mean)/std per channel.
    extremes = to_pixel_values(np.stack([np.zeros((1, 1, 3)), np.full((1, 1, 3), 255)]).astype(np.uint8))
    for c in range(3):
        assert extremes[0, c, 0, 0].item() == pytest.approx(-CLIP_MEAN[c] / CLIP_STD[c], rel=1e-6)
        assert extremes[1, c, 0, 0].item() == pytest.approx((1 - CLIP_MEAN[c]) / CLIP_STD[c], rel=1e-6)
    # Torch uint8 input gives the same, and the input is not modified.
    copy = images.copy()
    assert torch.equal(to_pixel_values(torch.from_numpy(images)), pixels)
    assert np.array_equal(images, copy)


def test_to_pixel_values_custom_mean_std() -> None:
    images = np.full((1, 2, 2, 3), 255, dtype=np.uint8)
    pixels = to_pixel_values(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    assert pixels[0, :, 0, 0].tolist() == pytest.approx([1.0, 2.0, 0.5])


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((2, 4, 4, 3), dtype=np.float32),  # not uint8
        np.zeros((2, 4, 4, 3), dtype=np.int64),
        np.zeros((2, 3, 4, 5), dtype=np.uint8),  # channels first
        np.zeros((4, 4, 3), dtype=np.uint8),  # no batch dimension
        np.zeros((2, 4, 4, 4), dtype=np.uint8),  # RGBA
    ],
)
def test_to_pixel_values_rejects_wrong_dtype_or_shape(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"uint8 images of shape \(N, H, W, 3\)"):
        to_pixel_values(images)
