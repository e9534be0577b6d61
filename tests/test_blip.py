"""BLIP image-text retrieval models (models/blip.py) as dual encoders with an ITM head, their loader, and
BLIP students configured per module with inherited weights (models/blip_student.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import IMAGE_SIZE, TEXT_LENGTH, tiny_blip, tiny_blip_config
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipModel

from vldistill.data.tokenizer import make_tokenize
from vldistill.models.blip import BlipRetrievalEncoder, batch_seed, sample_itm_negatives
from vldistill.models.blip_caption import BlipCaptioner
from vldistill.models.blip_student import blip_student_config, inherit_blip_weights, spec_from_blip_config
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.locate import NotAModelError
from vldistill.models.spec import DualEncoderSpec, TowerSpec

CAPTIONS = [
    "a red circle",
    "a blue square on the left",
    "two green triangles",
    "a small yellow circle above a red square",
    "a blue square on the left",  # the same text as pair 1: never its negative
]


def blip_batch(tokenizer, captions=CAPTIONS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random 16x16 images and the tokenized captions (padded to the longest)."""
    pixels = torch.randn(len(captions), 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    return {"pixel_values": pixels, **make_tokenize(tokenizer, TEXT_LENGTH)(captions)}


def hf_itm(model: BlipForImageTextRetrieval, batch, images, texts) -> torch.Tensor:
    """HF's own ITM logits of the pairs (image images[k], text texts[k])."""
    return model(
        input_ids=batch["input_ids"][texts],
        pixel_values=batch["pixel_values"][images],
        attention_mask=batch["attention_mask"][texts],
        use_itm_head=True,
    ).itm_score


@pytest.fixture
def blip(tokenizer) -> BlipRetrievalEncoder:
    return tiny_blip(tokenizer)


def test_the_tiny_model_is_about_the_size_the_tests_want(blip):
    assert 60_000 < blip.num_parameters() < 90_000
    assert blip.embed_dim == 32 and blip.input_spec.image_size == IMAGE_SIZE
    assert blip.input_spec.max_text_length == TEXT_LENGTH
    assert float(blip.logit_scale) == pytest.approx(1 / 0.07, rel=1e-4)  # BLIP's default init value, fixed


@torch.no_grad()
def test_itc_and_itm_signals_match_what_the_hf_model_computes(blip, tokenizer):
    batch = blip_batch(tokenizer)
    out = blip(**batch, output_itm=True)
    n = len(CAPTIONS)
    assert out.image_embeds.shape == out.text_embeds.shape == (n, 32)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(n), atol=1e-5)
    # HF's ITC scores (use_itm_head=False) are the cosine similarities of the same embeddings
    cosines = blip.model(**{k: batch[k] for k in batch}, use_itm_head=False).itm_score
    assert torch.allclose(out.image_embeds @ out.text_embeds.t(), cosines, atol=1e-5)
    assert out.logits_per_image().shape == (n, n)
    # three blocks of ITM logits: positives, a negative text per image, a negative image per text
    assert out.itm_logits.shape == (3 * n, 2) and out.itm_negatives.shape == (2, n)
    rows = torch.arange(n)
    texts, images = out.itm_negatives
    assert torch.allclose(out.itm_logits[:n], hf_itm(blip.model, batch, rows, rows), atol=1e-5)
    assert torch.allclose(out.itm_logits[n : 2 * n], hf_itm(blip.model, batch, rows, texts), atol=1e-5)
    assert torch.allclose(out.itm_logits[2 * n :], hf_itm(blip.model, batch, images, rows), atol=1e-5)
    assert "itm_logits" not in blip(**batch)  # only on request


@torch.no_grad()
def test_sampled_negatives_are_never_the_positive_and_are_reproducible(blip, tokenizer):
    batch = blip_batch(tokenizer)
    first = blip(**batch, output_itm=True).itm_negatives
    for _ in range(3):
        assert torch.equal(blip(**batch, output_itm=True).itm_negatives, first)
    for seed in range(20):  # many draws: the positive (and pair 1's duplicate text, pair 4) is never drawn
        blip.itm_seed = seed
        texts, images = blip(**batch, output_itm=True).itm_negatives
        assert not (texts == torch.arange(5)).any() and not (images == torch.arange(5)).any()
        assert texts[1] != 4 and texts[4] != 1
    assert batch_seed(batch["input_ids"], 0) != batch_seed(batch["input_ids"], 1)
    assert batch_seed(batch["input_ids"], 0) != batch_seed(batch["input_ids"][:4], 0)


def test_negatives_are_drawn_from_the_softmax_of_the_similarity():
    size = 4
    similarity = torch.zeros(size, size)
    for i in range(size):  # image i is far closest to text i + 1 (besides its own): BLIP's hardest negative
        similarity[i, i] = 100.0
        similarity[i, (i + 1) % size] = 50.0
    texts, images = sample_itm_negatives(similarity, torch.Generator().manual_seed(0))
    assert texts.tolist() == [1, 2, 3, 0]  # image i's hardest text
    assert images.tolist() == [3, 0, 1, 2]  # text j's hardest image: the one with similarity[j - 1, j] = 50
    # a duplicate of the positive is excluded; with only duplicates left, only the pair itself is
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    for seed in range(10):
        texts, _ = sample_itm_negatives(torch.zeros(3, 3), torch.Generator().manual_seed(seed), same_text=same)
        assert texts[0] == 2 and texts[1] == 2 and texts[2] in (0, 1)
    texts, _ = sample_itm_negatives(torch.zeros(2, 2), torch.Generator(), same_text=torch.ones(2, 2, dtype=torch.bool))
    assert texts.tolist() == [1, 0]
    with pytest.raises(ValueError, match="at least 2 pairs"):
        sample_itm_negatives(torch.zeros(1, 1), torch.Generator())


@torch.no_grad()
def test_given_negatives_are_scored_instead_of_sampled(blip, tokenizer):
    batch = blip_batch(tokenizer)
    given = torch.tensor([[2, 0, 0, 1, 3], [1, 2, 3, 4, 0]])
    out = blip(**batch, output_itm=True, itm_negatives=given)
    assert torch.equal(out.itm_negatives, given)
    rows = torch.arange(5)
    assert torch.allclose(out.itm_logits[5:10], hf_itm(blip.model, batch, rows, given[0]), atol=1e-5)
    assert torch.allclose(out.itm_logits[10:], hf_itm(blip.model, batch, given[1], rows), atol=1e-5)
    with pytest.raises(ValueError, match=r"itm_negatives must be \(2, 5\)"):
        blip(**batch, output_itm=True, itm_negatives=given[:, :4])
    with pytest.raises(ValueError, match=r"indices in \[0, 5\)"):
        blip(**batch, output_itm=True, itm_negatives=given + 1)


@torch.no_grad()
def test_hidden_states_and_attention_maps_of_every_module(blip, tokenizer):
    batch = blip_batch(tokenizer)
    n, tokens = batch["input_ids"].shape
    out = blip(**batch, output_hidden_states=True, output_attentions=True)
    assert "itm_logits" not in out
    # embeddings + 2 layers per module; the image: CLS + 4 patches
    assert [h.shape for h in out.image_hidden_states] == [(n, 5, 32)] * 3
    assert [h.shape for h in out.text_hidden_states] == [(n, tokens, 32)] * 3
    assert [h.shape for h in out.fusion_hidden_states] == [(n, tokens, 32)] * 3
    assert [a.shape for a in out.image_attentions] == [(n, 2, 5, 5)] * 2
    assert [a.shape for a in out.text_attentions] == [(n, 2, tokens, tokens)] * 2
    assert [a.shape for a in out.fusion_attentions] == [(n, 2, tokens, tokens)] * 2
    assert [a.shape for a in out.fusion_cross_attentions] == [(n, 2, tokens, 5)] * 2
    # padding is never attended to; the text-only and fusion passes differ (cross-attention to the image)
    padded = batch["attention_mask"][0] == 0
    assert padded.any() and out.text_attentions[0][0][..., padded].abs().max() == 0
    assert not torch.allclose(out.text_hidden_states[-1], out.fusion_hidden_states[-1])
    # the fusion signals are the positive pairs' also when the ITM pass scores the negatives with them
    with_itm = blip(**batch, output_hidden_states=True, output_attentions=True, output_itm=True)
    for name in ("fusion_hidden_states", "fusion_attentions", "fusion_cross_attentions"):
        for found, expected in zip(with_itm[name], out[name]):
            assert torch.allclose(found, expected, atol=1e-5), name
    assert torch.allclose(with_itm.itm_logits[:n], blip.itm_logits(
        blip.model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state,
        batch["input_ids"], batch["attention_mask"])[0], atol=1e-5)


@torch.no_grad()
def test_save_pretrained_round_trips_through_the_loader(blip, tokenizer, tmp_path):
    folder = blip.save_pretrained(tmp_path / "blip", {"role": "teacher"})
    loaded, loaded_tokenizer = load_dual_encoder_any(folder)
    assert type(loaded) is BlipRetrievalEncoder and loaded.input_spec == blip.input_spec
    assert loaded.architecture_config() == blip.architecture_config()
    assert loaded_tokenizer("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]
    batch = blip_batch(tokenizer)
    found, expected = loaded.eval()(**batch, output_itm=True), blip(**batch, output_itm=True)
    for name in ("image_embeds", "text_embeds", "itm_logits", "itm_negatives"):
        assert torch.equal(found[name], expected[name]), name
    # the folder is a plain HF one
    assert BlipForImageTextRetrieval.from_pretrained(folder).config.image_text_hidden_size == 32


def test_the_blip_loader_dispatches_on_the_architecture(tokenizer, tmp_path):
    torch.manual_seed(0)
    captioner = BlipForConditionalGeneration(tiny_blip_config(tokenizer)).eval()
    BlipCaptioner(captioner, tokenizer).save_pretrained(tmp_path / "captioner")
    loaded, _ = load_dual_encoder_any(tmp_path / "captioner")
    assert type(loaded) is BlipCaptioner
    BlipModel(tiny_blip_config(tokenizer)).save_pretrained(tmp_path / "blip-model")
    tokenizer.save_pretrained(tmp_path / "blip-model")
    with pytest.raises(NotAModelError, match="holds a BLIP BlipModel, which vldistill cannot load"):
        load_dual_encoder_any(tmp_path / "blip-model")


STUDENT = DualEncoderSpec(
    vision=TowerSpec(layers=1, width=16, heads=2, mlp_ratio=2.0, patch_size=8),
    text=TowerSpec(layers=1, width=16, heads=2, mlp_ratio=2.0),
    projection_dim=16,
)


def test_the_student_config_takes_each_module_from_the_spec_and_the_rest_from_the_teacher(blip):
    config = blip_student_config(blip.model.config, STUDENT)
    assert spec_from_blip_config(config) == STUDENT
    assert spec_from_blip_config(blip.model.config).text == TowerSpec(layers=2, width=32, heads=2, mlp_ratio=4.0)
    assert config.text_config.encoder_hidden_size == 16  # cross-attention reads the student's image tokens
    for name in ("vocab_size", "max_position_embeddings", "pad_token_id", "bos_token_id", "hidden_act"):
        assert getattr(config.text_config, name) == getattr(blip.model.config.text_config, name), name
    assert config.vision_config.image_size == IMAGE_SIZE and config.vision_config.initializer_range == 0.02
    student = BlipForImageTextRetrieval(config)
    assert sum(p.numel() for p in student.parameters()) < blip.num_parameters() / 3
    with pytest.raises(ValueError, match="not divisible by student.vision.patch_size 5"):
        blip_student_config(blip.model.config, DualEncoderSpec(vision=TowerSpec(patch_size=5), text=TowerSpec()))


@torch.no_grad()
def test_a_student_inherits_every_kth_layer_and_leading_channels(blip, tokenizer):
    student = BlipForImageTextRetrieval(blip_student_config(blip.model.config, STUDENT))
    maps = inherit_blip_weights(student, blip.model)
    assert maps == {"vision_model.encoder.layers": [1], "text_encoder.encoder.layer": [1]}
    teacher_state, state = blip.model.state_dict(), student.state_dict()
    # the vision tower's fused qkv: each of q, k and v takes its leading 16 channels of teacher layer 1
    qkv = teacher_state["vision_model.encoder.layers.1.self_attn.qkv.weight"]
    for block in range(3):
        assert torch.equal(
            state["vision_model.encoder.layers.0.self_attn.qkv.weight"][16 * block : 16 * (block + 1)],
            qkv[32 * block : 32 * block + 16, :16],
        )
    key = "text_encoder.encoder.layer.{}.crossattention.self.key.weight"
    assert torch.equal(state[key.format(0)], teacher_state[key.format(1)][:16, :16])
    assert torch.equal(state["text_encoder.embeddings.word_embeddings.weight"],
                       teacher_state["text_encoder.embeddings.word_embeddings.weight"][:, :16])
    assert torch.equal(state["itm_head.weight"], teacher_state["itm_head.weight"][:, :16])
    # a student of the teacher's own shape inherits it whole and computes the same
    twin = BlipRetrievalEncoder(BlipForImageTextRetrieval(blip.model.config), tokenizer=tokenizer).eval()
    assert inherit_blip_weights(twin.model, blip.model)["text_encoder.encoder.layer"] == [0, 1]
    batch = blip_batch(tokenizer)
    assert torch.allclose(twin(**batch, output_itm=True).itm_logits, blip(**batch, output_itm=True).itm_logits)
    wider = DualEncoderSpec(vision=STUDENT.vision, text=TowerSpec(layers=1, width=64, heads=2), projection_dim=16)
    with pytest.raises(ValueError, match="student.text.width = 64 exceeds the teacher's 32"):
        inherit_blip_weights(BlipForImageTextRetrieval(blip_student_config(blip.model.config, wider)), blip.model)
