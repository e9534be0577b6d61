"""Shared, seeded fixtures: the offline word tokenizer, a tiny CLIP teacher, real-caption batches, a tiny
BERT text backbone folder and a pretrained tiny teacher folder. Plain helpers live in tests/helpers.py.

Markers: `slow` marks tests that take more than a few seconds (the demo, torchrun / two-process runs,
killed-and-resumed subprocess runs, benchmarks, fresh interpreters). `pytest -m "not slow"` is the fast
inner loop; a plain `pytest` (what CI runs) runs everything."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from helpers import IMAGE_SIZE, TEXT_LENGTH, build_clip, config_for, save_tiny_bert, teacher_spec

from vldistill.cli import main
from vldistill.config import packaged_config
from vldistill.data import bundle
from vldistill.data.grammar import vocabulary
from vldistill.data.synthetic import make_split
from vldistill.data.tokenizer import build_word_tokenizer, make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.models import CLIPDualEncoder


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same RNG state, so values are reproducible run to run."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


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


@pytest.fixture
def first_process(monkeypatch) -> None:
    """A single process, as without a launcher: no RANK or WORLD_SIZE in the environment."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture
def progress_flags(monkeypatch) -> list[bool]:
    """Data loading replaced by a stub that records the `progress` each call is given, then stops the
    command with a ValueError (exit code 2 from the CLI): the list of recorded flags."""
    seen = []

    def load_data(cfg, progress=True):
        seen.append(progress)
        raise ValueError("stop after loading the data")

    monkeypatch.setattr(bundle, "load_data", load_data)
    return seen


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT text backbone folder (helpers.save_tiny_bert), built once; tests must not change it."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def pretrained_teacher(tmp_path_factory) -> Path:
    """The folder of a teacher that `vldistill pretrain-teacher` trained on configs/tiny.yaml (built once)."""
    out = tmp_path_factory.mktemp("teacher")
    assert main(["pretrain-teacher", str(packaged_config("tiny")), "--out", str(out)]) == 0
    return out / "teacher"


@pytest.fixture(scope="session")
def onnx_teacher(pretrained_teacher, tmp_path_factory) -> Path:
    """`vldistill export` of the pretrained tiny teacher: its fp32 ONNX pair, plus the int8 pair (OUT/int8) that a
    generous gate (--max-drop 1) keeps on configs/tiny.yaml's test split (built once; tests must not change it)."""
    out = tmp_path_factory.mktemp("onnx") / "teacher-onnx"
    args = ["export", str(pretrained_teacher), "--out", str(out), "--int8", "--max-drop", "1"]
    assert main([*args, "--config", str(packaged_config("tiny"))]) == 0
    return out
