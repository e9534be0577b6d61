"""Tests for vldistill.data.augment and its wiring: image ops against references computed by hand or
in numpy, seeded draws and exact replay, caption edits, config validation and the training collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vldistill.binding import ConfigError, build_dataclass
from vldistill.config import load_config
from vldistill.data.augment import (
    AugmentConfig,
    AugmentParams,
    ImageAugmentParams,
    TextAugmentParams,
    apply_augment,
    apply_image_augment,
    apply_text_augment,
    mirror_caption,
    sample_image_params,
    sample_params,
    sample_text_params,
)
from vldistill.config import OptimConfig
from vldistill.data.bundle import in_memory_bundle
from vldistill.data.pairs import InMemoryPairs, PairCollator, view_generator, view_hash
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.data.grammar import POSITION_PHRASES, TRAIN_CAPTIONS, vocabulary
from vldistill.data.synthetic import make_split
from vldistill.data.tokenizer import build_word_tokenizer, make_tokenize
from vldistill.train.runs import _batches

ALL_ON = AugmentConfig(
    crop_prob=0.8, flip_prob=0.5, brightness=0.4, contrast=0.4, saturation=0.4,
    word_dropout_prob=0.2, word_swap_prob=0.2, paraphrase_prob=0.5,
)
# Four hand-worked pixels: pure red, green, blue and a mid grey. Their lumas (0.299 R + 0.587 G + 0.114 B)
# are 76.245, 149.685, 29.07 and 100.
RGB_GREY = torch.tensor([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [100, 100, 100]]], dtype=torch.uint8)


def random_image(size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def bilinear_reference(window: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize (h, w, 3) float64 by half-pixel-centre bilinear interpolation, written out pixel by pixel."""
    in_h, in_w = window.shape[:2]
    out = np.zeros((out_h, out_w, 3))
    for i in range(out_h):
        y = max((i + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = int(y)
        y1, wy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_w):
            x = max((j + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = int(x)
            x1, wx = min(x0 + 1, in_w - 1), x - x0
            top = (1 - wx) * window[y0, x0] + wx * window[y0, x1]
            bottom = (1 - wx) * window[y1, x0] + wx * window[y1, x1]
            out[i, j] = (1 - wy) * top + wy * bottom
    return out


# ---------------------------------------------------------------- image ops


def test_flip_mirrors_columns() -> None:
    image = random_image()
    flipped = apply_image_augment(image, ImageAugmentParams(flip=True))
    assert np.array_equal(flipped.numpy(), image.numpy()[:, ::-1])


@pytest.mark.parametrize("box", [(2, 4, 8, 8), (1, 3, 8, 4), (0, 0, 16, 16)])
def test_crop_and_resize_matches_manual_bilinear(box: tuple[int, int, int, int]) -> None:
    image = random_image()
    top, left, height, width = box
    window = image.numpy()[top : top + height, left : left + width].astype(np.float64)
    expected = np.clip(np.rint(bilinear_reference(window, 16, 16)), 0, 255).astype(np.uint8)
    assert np.array_equal(apply_image_augment(image, ImageAugmentParams(crop=box)).numpy(), expected)


def test_crop_of_two_pixels_hand_worked() -> None:
    # A 1x2 window [0, 100] stretched to 4 columns: sample points -0.25 (clamped to 0), 0.25, 0.75, 1.25
    # give 0, 25, 75, 100 (the last clamps to the right pixel).
    image = torch.zeros(4, 4, 3, dtype=torch.uint8)
    image[0, 1] = 100
    out = apply_image_augment(image, ImageAugmentParams(crop=(0, 0, 1, 2)))
    assert out[:, :, 0].tolist() == [[0, 25, 75, 100]] * 4


@pytest.mark.parametrize("factor", [0.5, 1.5, 2.0])
def test_brightness_scales_and_clamps(factor: float) -> None:
    image = random_image()
    expected = np.clip(np.rint(image.numpy().astype(np.float64) * factor), 0, 255)
    out = apply_image_augment(image, ImageAugmentParams(brightness=factor)).numpy()
    assert np.array_equal(out, expected)
    if factor > 1:
        assert (out[image.numpy() * factor > 255] == 255).all()


def test_saturation_zero_gives_grey() -> None:
    out = apply_image_augment(RGB_GREY, ImageAugmentParams(saturation=0.0))
    assert out.tolist() == [[[76] * 3, [150] * 3], [[29] * 3, [100] * 3]]
    random_out = apply_image_augment(random_image(), ImageAugmentParams(saturation=0.0))
    assert torch.equal(random_out[..., 0], random_out[..., 1]) and torch.equal(random_out[..., 0], random_out[..., 2])


def test_contrast_blends_with_mean_luma() -> None:
    # mean luma = (76.245 + 149.685 + 29.07 + 100) / 4 = 88.75: contrast 0 flattens every pixel to it.
    assert apply_image_augment(RGB_GREY, ImageAugmentParams(contrast=0.0)).unique().tolist() == [89]
    # contrast 2: 88.75 + 2 (x - 88.75), clamped; the grey pixel goes to 111.25 -> 111.
    out = apply_image_augment(RGB_GREY, ImageAugmentParams(contrast=2.0))
    assert out.tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [111, 111, 111]]]


def test_identity_params_return_the_image_and_bad_inputs_are_rejected() -> None:
    image = random_image()
    assert apply_image_augment(image, ImageAugmentParams()) is image
    with pytest.raises(ValueError, match="outside a 16x16 image"):
        apply_image_augment(image, ImageAugmentParams(crop=(10, 0, 8, 8)))
    with pytest.raises(ValueError, match="uint8"):
        apply_image_augment(image.float(), ImageAugmentParams(flip=True))


def test_crop_boxes_fit_and_respect_the_scale_range() -> None:
    cfg = AugmentConfig(crop_prob=1.0, crop_scale=[0.25, 0.5])
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, height, width = sample_image_params(generator, cfg, 32).crop
        assert top >= 0 and left >= 0 and top + height <= 32 and left + width <= 32
        assert 0.2 <= height * width / 32**2 <= 0.56  # rounding the sides moves the area a little
        assert 0.6 <= width / height <= 1.5


def test_all_off_by_default_draws_identity() -> None:
    generator = torch.Generator().manual_seed(0)
    params = sample_params(generator, AugmentConfig(), 16, "a red circle at the left", None)
    assert params == AugmentParams(ImageAugmentParams(), TextAugmentParams())


# ---------------------------------------------------------------- determinism and replay


def test_draws_are_deterministic_in_the_seed() -> None:
    caption = "a small red circle at the top left"

    def draw(seed: int) -> list[AugmentParams]:
        generator = torch.Generator().manual_seed(seed)
        return [sample_params(generator, ALL_ON, 16, caption) for _ in range(8)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_replay_from_recorded_params_reproduces_the_view() -> None:
    split = make_split("train", 12, seed=0, image_size=16)
    generator = torch.Generator().manual_seed(7)
    for image, caption, attrs in zip(split.images, split.captions, split.attributes):
        image = torch.from_numpy(image)
        params = sample_params(generator, ALL_ON, 16, caption, attrs)
        view = apply_augment(image, caption, params, attrs)
        replayed = apply_augment(image.clone(), caption, params, attrs)
        assert torch.equal(view[0], replayed[0]) and view[1] == replayed[1]
        assert view[0].shape == image.shape and view[0].dtype == torch.uint8


# ---------------------------------------------------------------- captions


def test_mirror_caption_swaps_left_and_right_words() -> None:
    assert mirror_caption("a red circle at the top left") == "a red circle at the top right"
    assert mirror_caption("Right of the tree, left of the leftover box") == "Left of the tree, right of the leftover box"
    assert mirror_caption("a blue square in the center") == "a blue square in the center"


def test_flip_mirrors_the_caption_of_the_same_pair() -> None:
    cfg = AugmentConfig(flip_prob=1.0)
    params = sample_params(torch.Generator().manual_seed(0), cfg, 16, "a green cross at the bottom right")
    assert params.image.flip and params.text.mirror
    image, caption = apply_augment(random_image(), "a green cross at the bottom right", params)
    assert caption == "a green cross at the bottom left"
    assert np.array_equal(image.numpy(), random_image().numpy()[:, ::-1])


def test_word_swaps_hand_worked() -> None:
    # Every pair swaps, and a swapped word moves one place only: positions 0 and 2 swap, 4 is alone.
    params = sample_text_params(torch.Generator().manual_seed(0), AugmentConfig(word_swap_prob=1.0), "a b c d e")
    assert params.swaps == (0, 2)
    assert apply_text_augment("a b c d e", params) == "b a d c e"


def test_word_dropout_never_empties_a_caption() -> None:
    cfg = AugmentConfig(word_dropout_prob=0.95)
    generator = torch.Generator().manual_seed(0)
    for caption in ["circle", "a circle", "a small red circle at the top left"] * 20:
        words = caption.split()
        out = apply_text_augment(caption, sample_text_params(generator, cfg, caption)).split()
        assert 1 <= len(out) <= len(words)
        remaining = iter(words)
        assert all(word in remaining for word in out)  # an in-order subsequence of the caption


def test_paraphrase_keeps_the_attribute_words_of_a_shapes_sample() -> None:
    cfg = AugmentConfig(paraphrase_prob=1.0)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for split in ("train", "test"):
        data = make_split(split, 40, seed=0, image_size=16)
        for caption, attrs in zip(data.captions, data.attributes):
            params = sample_text_params(generator, cfg, caption, attrs)
            out = apply_text_augment(caption, params, attrs)
            phrase = POSITION_PHRASES[attrs["position"]]
            assert out == TRAIN_CAPTIONS[params.wording].format(**{**attrs, "position": phrase})
            for key in ("size", "colour", "shape"):
                if attrs[key] in caption.split():
                    assert attrs[key] in out.split()
            assert phrase not in caption or phrase in out
            if split == "test":  # canonical captions state all four attributes
                assert all(attrs[key] in out.split() for key in ("size", "colour", "shape")) and phrase in out
            seen.add(params.wording)
    assert len(seen) >= 3


def test_paraphrase_is_a_no_op_without_attributes() -> None:
    cfg = AugmentConfig(paraphrase_prob=1.0)
    params = sample_text_params(torch.Generator().manual_seed(0), cfg, "a dog on a beach")
    assert params == TextAugmentParams()
    assert apply_text_augment("a dog on a beach", params) == "a dog on a beach"


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"flip_prob": 1.5}, "data.augment.flip_prob"),
        ({"word_dropout_prob": -0.1}, "data.augment.word_dropout_prob"),
        ({"brightness": -1.0}, "data.augment.brightness"),
        ({"crop_scale": [0.9, 0.5]}, "data.augment.crop_scale"),
        ({"crop_scale": [0.5, 1.5]}, "data.augment.crop_scale"),
        ({"crop_ratio": [1.0]}, "data.augment.crop_ratio"),
        ({"flip": 0.5}, "data.augment.flip"),
        ({"paraphrase_prob": "often"}, "data.augment.paraphrase_prob"),
    ],
)
def test_validation_errors_name_the_key(values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_dataclass(AugmentConfig, values, "data.augment")


def test_augment_overrides_load_into_the_data_config() -> None:
    cfg = load_config(overrides=["data.augment.flip_prob=0.5", "data.augment.crop_scale=[0.3, 1]"])
    assert cfg.data.augment.flip_prob == 0.5 and cfg.data.augment.crop_scale == [0.3, 1.0]
    assert cfg.data.augment.brightness == 0.0  # the rest keeps its (off) default
    with pytest.raises(ConfigError, match=r"data\.augment\.saturation"):
        load_config(overrides=["data.augment.saturation=-2"])


# ---------------------------------------------------------------- collator and training batches


@pytest.fixture(scope="module")
def shapes_and_tokenize():
    data = make_split("train", 8, seed=0, image_size=16)
    return data, BatchPreprocessor(make_tokenize(build_word_tokenizer(vocabulary()), 32))


def collate(data, tokenize, augment, seed: int = 0) -> dict[str, torch.Tensor]:
    dataset = InMemoryPairs(data.images, data.captions, data.attributes)
    return PairCollator(tokenize, augment=augment, seed=seed)([dataset[i] for i in range(len(dataset))])


def test_collator_batch_is_augmented_and_reproducible(shapes_and_tokenize) -> None:
    data, tokenize = shapes_and_tokenize
    plain = collate(data, tokenize, None)
    assert all(torch.equal(plain[k], v) for k, v in collate(data, tokenize, AugmentConfig()).items())
    first, again = collate(data, tokenize, ALL_ON, seed=1), collate(data, tokenize, ALL_ON, seed=1)
    assert first.keys() == plain.keys() == {
        "pixel_values", "input_ids", "attention_mask", "sample_index", "view", "view_hash",
    }
    assert first["sample_index"].tolist() == list(range(8)) and first["view"].tolist() == [0] * 8
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["pixel_values"], plain["pixel_values"])
    assert first["input_ids"].shape != plain["input_ids"].shape or not torch.equal(first["input_ids"], plain["input_ids"])
    other = collate(data, tokenize, ALL_ON, seed=2)
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    # The batch holds exactly the views replayed from params drawn with a generator seeded by
    # (collator seed, sample index, view 0).
    views = [
        apply_augment(
            torch.from_numpy(image), caption,
            sample_params(view_generator(1, i, 0), ALL_ON, 16, caption, attrs), attrs,
        )
        for i, (image, caption, attrs) in enumerate(zip(data.images, data.captions, data.attributes))
    ]
    expected = PairCollator(tokenize)([(image, caption, None) for image, caption in views])
    assert expected.keys() == {"pixel_values", "input_ids", "attention_mask"}  # pairs without an index
    assert all(torch.equal(first[k], expected[k]) for k in expected)
    assert first["view_hash"].tolist() == [view_hash(image, caption) for image, caption in views]


def test_in_memory_pairs_check_attribute_count() -> None:
    data = make_split("train", 4, seed=0, image_size=16)
    with pytest.raises(ValueError, match="3 attribute records but 4 captions"):
        InMemoryPairs(data.images, data.captions, data.attributes[:3])
    assert InMemoryPairs(data.images, data.captions)[0][2] is None


def test_training_batches_apply_the_configured_augmentation(shapes_and_tokenize) -> None:
    data, _ = shapes_and_tokenize
    tokenizer = build_word_tokenizer(vocabulary())
    preprocess = BatchPreprocessor(make_tokenize(tokenizer, 32))
    optim = OptimConfig(steps=1, batch_size=4, warmup_steps=0)
    plain = next(_batches(in_memory_bundle(data, data), preprocess, optim, 0, AugmentConfig()))
    flipped = next(_batches(in_memory_bundle(data, data), preprocess, optim, 0, AugmentConfig(flip_prob=1.0)))
    assert torch.equal(flipped["pixel_values"], plain["pixel_values"].flip(-1))
