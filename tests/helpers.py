"""Plain helpers shared by the test files (fixtures live in conftest.py): the tiny CLIP teacher's spec and
builder, random and hand-written dual-encoder outputs, a bag-of-words dual encoder, tiny SigLIP, CLIP-vision
and BERT backbones, pairs datasets, micro-batch builders and readers of a run's step log.

Test files import them as `from helpers import ...` (pytest puts tests/ on sys.path); a test file never
imports another test file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertModel,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipModel,
)

from vldistill.data.pairs import PairSample
from vldistill.data.grammar import vocabulary
from vldistill.data.synthetic import make_split
from vldistill.data.tokenizer import make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.losses import LossContext, build_objective
from vldistill.models import CLIPDualEncoder, DualEncoderSpec, TowerSpec, clip_config_from_spec
from vldistill.models.blip import BlipRetrievalEncoder
from vldistill.models.blip_caption import BlipCaptioner, blip_token_settings, captioner_config
from vldistill.models.signals import Signals
from vldistill.train.loop import StudentWithObjective

IMAGE_SIZE = 16
TEXT_LENGTH = 32

# ---------------------------------------------------------------- the tiny CLIP teacher and students


def teacher_spec() -> DualEncoderSpec:
    """The tiny teacher: 2 layers, width 32, 2 heads per tower, 8x8 patches, 32-d embeddings."""
    return DualEncoderSpec(
        vision=TowerSpec(layers=2, width=32, heads=2, patch_size=8),
        text=TowerSpec(layers=2, width=32, heads=2),
        projection_dim=32,
    )


# A small student: 1 layer of width 16 and 2 heads per tower, MLP ratio 2, 16-d embeddings.
SMALL_SPEC = DualEncoderSpec(
    vision=TowerSpec(layers=1, width=16, heads=2, mlp_ratio=2.0, patch_size=8),
    text=TowerSpec(layers=1, width=16, heads=2, mlp_ratio=2.0),
    projection_dim=16,
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


# ---------------------------------------------------------------- dual-encoder outputs


def seeded(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with `seed`."""
    return torch.Generator().manual_seed(seed)


def unit_rows(
    n: int, dim: int, *, dtype=torch.float32, generator: Optional[torch.Generator] = None, requires_grad: bool = False
) -> torch.Tensor:
    """A leaf tensor of n L2-normalized random rows (drawn from `generator`, else the global RNG)."""
    return F.normalize(torch.randn(n, dim, generator=generator, dtype=dtype), dim=-1).requires_grad_(requires_grad)


def dual_output(image, text, scale: float, *, requires_grad: bool = False, scale_grad: bool = False) -> Signals:
    """The output of the given image and text embeddings (tensors, used as given, or nested lists made
    float64 leaves that require grad when `requires_grad`) and logit scale (a scalar of their dtype, a leaf
    that requires grad when `scale_grad`)."""
    if not isinstance(image, torch.Tensor):
        image = torch.tensor(image, dtype=torch.float64, requires_grad=requires_grad)
        text = torch.tensor(text, dtype=torch.float64, requires_grad=requires_grad)
    return Signals(
        image_embeds=image, text_embeds=text, logit_scale=torch.tensor(scale, dtype=image.dtype, requires_grad=scale_grad)
    )


def random_output(
    rows: int,
    dim: int,
    scale: float,
    *,
    dtype=torch.float32,
    generator: Optional[torch.Generator] = None,
    requires_grad: bool = False,
    scale_grad: bool = False,
) -> Signals:
    """Random unit image rows, then text rows (from `generator`, else the global RNG), and a logit scale."""
    image = unit_rows(rows, dim, dtype=dtype, generator=generator, requires_grad=requires_grad)
    text = unit_rows(rows, dim, dtype=dtype, generator=generator, requires_grad=requires_grad)
    return dual_output(image, text, scale, scale_grad=scale_grad)


# ---------------------------------------------------------------- a bag-of-words dual encoder


class BagOfWordsDualEncoder(nn.Module):
    """encode_image = normalize(dropout(identity linear(flatten(x)))); encode_text = normalize(dropout(sum
    of the word vectors of the unmasked ids)). Row i of `word_vectors` is word id i (0 = padding)."""

    def __init__(self, word_vectors: torch.Tensor, dropout: float = 0.0) -> None:
        super().__init__()
        words, dim = word_vectors.shape
        self.image_proj = nn.Linear(dim, dim, bias=False)
        self.words = nn.Embedding(words, dim)
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            self.image_proj.weight.copy_(torch.eye(dim))
            self.words.weight.copy_(word_vectors)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.dropout(self.image_proj(pixel_values.flatten(1))), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        summed = (self.words(input_ids) * attention_mask[..., None]).sum(dim=1)
        return F.normalize(self.dropout(summed), dim=-1)


def word_tokenizer(vocab: dict[str, int]) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """texts -> input_ids (the `vocab` ids of the lower-cased words, padded with 0) and attention_mask."""

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        ids = [[vocab[word] for word in text.lower().split()] for text in texts]
        length = max(len(row) for row in ids)
        return {
            "input_ids": torch.tensor([row + [0] * (length - len(row)) for row in ids]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids]),
        }

    return tokenize


# ---------------------------------------------------------------- tiny backbones of other families

SIGLIP_TEXT_LENGTH = 12
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[MASK]", "[SEP]", "[CLS]")  # [SEP] = 3 (not 2: HF CLIP's legacy eos)
BERT_POSITIONS = 40


def tiny_siglip(tokenizer) -> SiglipModel:
    """2 layers, width 32, 2 heads per tower, 16x16 images in 8x8 patches; t = 10, b = -5."""
    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = SiglipConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": SIGLIP_TEXT_LENGTH,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={**tower, "image_size": 16, "patch_size": 8},
    )
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-5.0)
    return model


def tiny_vision() -> CLIPVisionModel:
    """A 2-layer width-32 CLIP vision tower over 16x16 images in 8x8 patches (4 patches + CLS)."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    return CLIPVisionModel(config).eval()


def bert_word_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style word tokenizer over the synthetic captions' words: lower-cased, whitespace-split,
    [CLS] ... [SEP] around each text, ids 0-4 for [PAD] [UNK] [MASK] [SEP] [CLS], then the sorted words."""
    vocab = {token: i for i, token in enumerate(BERT_SPECIAL_TOKENS)}
    for word in sorted({w.lower() for w in vocabulary()}):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        sep_token="[SEP]",
        cls_token="[CLS]",
        model_max_length=BERT_POSITIONS,
    )


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A text backbone folder as a two-tower teacher loads one (AutoModel + AutoTokenizer): a 2-layer
    width-16 BertModel with 2 heads and 40 positions, seeded, and `bert_word_tokenizer`."""
    tokenizer = bert_word_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=BERT_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def tiny_blip_config(tokenizer) -> BlipConfig:
    """A BLIP config over 16x16 images in 8x8 patches and the word tokenizer: a 2-layer width-32 vision tower
    and text transformer (2 heads, MLP 128; cross-attention in every text layer), 32-d ITC embeddings. The
    vision initializer range is BERT's 0.02 (BLIP's default 1e-10 would embed every random image alike)."""
    tower = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    return BlipConfig(
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": 8, "initializer_range": 0.02},
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": TEXT_LENGTH,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "sep_token_id": tokenizer.eos_token_id,
        },
        image_text_hidden_size=32,
    )


def tiny_blip(tokenizer, seed: int = 0) -> BlipRetrievalEncoder:
    """A seeded BlipForImageTextRetrieval of `tiny_blip_config` (about 70k parameters) as a BlipRetrievalEncoder
    holding the word tokenizer, in eval mode."""
    torch.manual_seed(seed)
    return BlipRetrievalEncoder(BlipForImageTextRetrieval(tiny_blip_config(tokenizer)), tokenizer=tokenizer).eval()


def tiny_captioner(tokenizer, seed: int = 0) -> BlipCaptioner:
    """A seeded BlipForConditionalGeneration over 16x16 images in 8x8 patches reading `tokenizer` (BOS: its bos,
    else its [CLS]; generation stops at its sep, else its eos): a 2-layer width-32 vision tower and decoder
    (2 heads, MLP 128), vision initializer range 0.02 as `tiny_blip_config`'s, as a BlipCaptioner in eval mode."""
    config = captioner_config(
        blip_token_settings(tokenizer), image_size=IMAGE_SIZE, vision=TowerSpec(2, 32, 2, 4.0, patch_size=8),
        decoder=TowerSpec(2, 32, 2, 4.0), max_text_length=TEXT_LENGTH,
    )
    config.vision_config.initializer_range = 0.02
    torch.manual_seed(seed)
    return BlipCaptioner(BlipForConditionalGeneration(config), tokenizer).eval()


# ---------------------------------------------------------------- pairs and micro-batches


class IndexPairs(Dataset):
    """`size` pairs whose 2x2 image is filled with its index; the `bad` ones are bad input (None)."""

    def __init__(self, size: int, bad=frozenset()) -> None:
        self.size, self.bad = size, set(bad)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if index in self.bad:
            return None
        return PairSample(torch.full((2, 2, 3), index, dtype=torch.uint8), f"pair {index}", None, index)


# The student of the accumulation tests: 1 layer of width 16 and 1 head per tower, 16-d embeddings.
ONE_HEAD_STUDENT = DualEncoderSpec(vision=TowerSpec(layers=1, width=16, heads=1, patch_size=8),
                                   text=TowerSpec(layers=1, width=16, heads=1), projection_dim=16)


def batches(tokenizer, n: int, parts: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """n pairs as one batch and as `parts` micro-batches, each tokenized (and padded) on its own."""
    data = make_split("train", n, seed=seed, image_size=IMAGE_SIZE)
    captions = [" ".join(c.split()[: 3 + (i * 7) % 11]) for i, c in enumerate(data.captions)]  # varied lengths
    tokenize = make_tokenize(tokenizer, TEXT_LENGTH)

    def batch(rows: slice) -> dict:
        return {"pixel_values": to_pixel_values(data.images[rows]), **tokenize(captions[rows])}

    size = n // parts
    return batch(slice(0, n)), [batch(slice(k * size, (k + 1) * size)) for k in range(parts)]


def student_and_objective(tokenizer, losses) -> StudentWithObjective:
    """The seeded `ONE_HEAD_STUDENT` in train mode and a seeded objective of `losses` against the tiny teacher."""
    student = build_clip(config_for(ONE_HEAD_STUDENT, tokenizer), seed=1).train()
    torch.manual_seed(2)
    objective = build_objective(losses, LossContext(16, 32, ONE_HEAD_STUDENT, teacher_spec()))
    return StudentWithObjective(student, objective)


def gradients(module) -> dict[str, torch.Tensor]:
    """A copy of every gradient of `module`'s parameters, by name."""
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- launchers and a run's step log


def launched_as(monkeypatch, rank: int, world_size: int) -> None:
    """The environment torchrun / accelerate launch give process `rank` of `world_size`."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


RESUME_MARK = '{"mark": "the run is resumed after this line"}\n'


def logged_steps(out) -> list[int]:
    """The steps a run in `out` logged (every step, with log_every=1), in order."""
    return [json.loads(line)["step"] for line in (out / "logs" / "distill.jsonl").read_text().splitlines()]


def mark_log(out) -> list[int]:
    """End the log of the interrupted run in `out` with a mark; the steps it logged."""
    steps = logged_steps(out)
    with open(out / "logs" / "distill.jsonl", "a") as log:
        log.write(RESUME_MARK)
    return steps


def steps_after_mark(out) -> list[int]:
    """The steps logged after `mark_log`: those the resumed run took (it appends to the log)."""
    text = (out / "logs" / "distill.jsonl").read_text()
    assert RESUME_MARK in text, "the resumed run started a new log: it did not continue the interrupted run"
    return [json.loads(line)["step"] for line in text.split(RESUME_MARK, 1)[1].splitlines()]
