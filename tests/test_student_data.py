"""distill.train_pairs: the student trains on the first N pairs only, keeping their indices (views, cache rows)."""

import pytest

from vldistill.config import ConfigError, load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.data.tokenizer import build_word_tokenizer
from vldistill.models.inputs import InputSpec
from vldistill.train.runs import _batches, first_pairs


def test_batches_draw_only_from_the_first_pairs():
    cfg = load_config(packaged_config("tiny"), ["distill.train_pairs=64", "distill.train.steps=6"])
    data = load_data(cfg.data, progress=False)
    small = first_pairs(data, cfg.distill.train_pairs)
    assert len(small.train) == 64 and len(data.train) == 256
    tokenizer = build_word_tokenizer(data.words(), max_length=32)
    preprocess = BatchPreprocessor.for_model(tokenizer, InputSpec(image_size=16))
    seen = set()
    for batch in _batches(small, preprocess, cfg.distill.train, cfg.seed, cfg.data.augment):
        seen.update(batch["sample_index"].tolist())
    assert seen == set(range(64))  # 6 batches of 32 over 64 pairs: every one, nothing beyond
    assert small.train[5].caption == data.train[5].caption and small.train[5].index == 5


def test_train_pairs_errors():
    data = load_data(load_config(packaged_config("tiny")).data, progress=False)
    with pytest.raises(ValueError, match="train_pairs is 300 but the training data holds 256 pairs"):
        first_pairs(data, 300)
    with pytest.raises(ConfigError, match=r"distill\.train_pairs must be null or >= distill\.train\.batch_size \(32\)"):
        load_config(packaged_config("tiny"), ["distill.train_pairs=8"])
