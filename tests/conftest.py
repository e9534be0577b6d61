"""Shared, seeded fixtures: the offline word tokenizer, a tiny CLIP teacher and real-caption batches; and
a comparison of two runs' saved students."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

from vldistill.data.synthetic import make_split, vocabulary
from vldistill.data.tokenizer import build_word_tokenizer, make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.models import CLIPDualEncoder, DualEncoderSpec, TowerSpec, clip_config_from_spec

IMAGE_SIZE = 16
TEXT_LENGTH = 32


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same RNG state, so values are reproducible run to run."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def teacher_spec() -> DualEncoderSpec:
    """The tiny teacher: 2 layers, width 32, 2 heads per tower, 8x8 patches, 32-d embeddings."""
    return DualEncoderSpec(
        vision=TowerSpec(layers=2, width=32, heads=2, patch_size=8),
        text=TowerSpec(layers=2, width=32, heads=2),
        projection_dim=32,
    )


def config_for(spec: DualEncoderSpec, tokenizer) -> CLIPConfig:
    """A CLIPConfig for `spec` over 16x16 images and the word tokenizer."""
    return clip_config_from_spec(
        spec,
        image_size=IMAGE_SIZE,
        vocab_size=len(tokenizer),
        max_text_length=TEXT_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_clip(config: CLIPConfig, seed: int = 0) -> CLIPDualEncoder:
    """A randomly initialized dual encoder for `config`, deterministic in `seed`, in eval mode."""
    torch.manual_seed(seed)
    return CLIPDualEncoder(CLIPModel(config)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(vocabulary(), max_length=TEXT_LENGTH)


@pytest.fixture
def teacher(tokenizer) -> CLIPDualEncoder:
    """Function-scoped: tests may change its logit scale or attention implementation."""
    return build_clip(config_for(teacher_spec(), tokenizer), seed=0)


@pytest.fixture
def make_batch(tokenizer) -> Callable[..., dict[str, torch.Tensor]]:
    """make_batch(n, split="test", seed=0) -> pixel_values (n, 3, 16, 16), input_ids, attention_mask
    of real captions (plus the captions and uint8 images they came from)."""

    tokenize = make_tokenize(tokenizer, TEXT_LENGTH)

    def make(n: int = 4, split: str = "test", seed: int = 0) -> dict:
        data = make_split(split, n, seed=seed, image_size=IMAGE_SIZE)
        return {
            "pixel_values": to_pixel_values(data.images),
            **tokenize(data.captions),
            "captions": data.captions,
            "images": data.images,
        }

    return make


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """Only the tensors a dual encoder's forward takes."""
    return {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}


def assert_same_student(found: Path, expected: Path, atol: float, key_biases: bool = True) -> None:
    """The students saved by two runs (`<out>/student`) have the same tensors within `atol`. Runs that sum
    in another order (other process counts) differ in the key-projection biases (`key_biases=False` skips
    them): their exact gradient is 0 (softmax ignores a shift) and Adam scales float noise up to full steps."""
    found_weights, expected_weights = (load_file(run / "student" / "model.safetensors") for run in (found, expected))
    assert found_weights.keys() == expected_weights.keys()
    for name, value in expected_weights.items():
        if key_biases or not name.endswith("k_proj.bias"):
            assert torch.allclose(found_weights[name], value, atol=atol), name
