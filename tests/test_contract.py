"""The model contract (models.contract.DualEncoder): every registered adapter satisfies it, and training,
cache and evaluation can run any of them through the protocol's members alone (timm-style: one tiny
instance per registered family, the same checks for each)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import IMAGE_SIZE, build_clip, config_for, teacher_spec, tiny_blip, tiny_siglip, tiny_vision
from transformers import AutoTokenizer, BertModel, CLIPModel

from vldistill.data.tokenizer import make_tokenize
from vldistill.models.adapters import ADAPTERS
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.contract import DualEncoder
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.prompts import PromptConfig, PromptedDualEncoder
from vldistill.models.quantized import Int8CLIPDualEncoder
from vldistill.models.siglip import SiglipDualEncoder
from vldistill.models.student import spec_from_clip_config
from vldistill.models.two_tower import TwoTowerDualEncoder


def tiny_clip(tokenizer, fixture):
    return build_clip(config_for(teacher_spec(), tokenizer)), tokenizer


def tiny_int8_clip(tokenizer, fixture):
    return Int8CLIPDualEncoder.from_float(build_clip(config_for(teacher_spec(), tokenizer))), tokenizer


def tiny_siglip_encoder(tokenizer, fixture):
    return SiglipDualEncoder(tiny_siglip(tokenizer), tokenizer=tokenizer).eval(), tokenizer


def tiny_prompted(tokenizer, fixture):
    base = build_clip(config_for(teacher_spec(), tokenizer))
    settings = PromptConfig(n_ctx=2, n_vis=2, depth=1, projector_dim=8)
    return PromptedDualEncoder(base, settings, tokenizer=tokenizer, generator=torch.Generator().manual_seed(0)).eval(), tokenizer


def tiny_two_tower(tokenizer, fixture):
    torch.manual_seed(0)
    bert_dir = fixture("bert_dir")
    bert_tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    model = TwoTowerDualEncoder(
        tiny_vision(), BertModel.from_pretrained(bert_dir), projection_dim=8, tokenizer=bert_tokenizer
    )
    return model.eval(), bert_tokenizer


def tiny_blip_encoder(tokenizer, fixture):
    return tiny_blip(tokenizer), tokenizer


def tiny_onnx(tokenizer, fixture):
    return load_dual_encoder_any(fixture("onnx_teacher"))  # the tiny teacher exported by `vldistill export`


# One tiny builder per registered model type: a new family without one fails the coverage test below. A builder
# takes the tokenizer and `fixture(name)`, which returns the value of the fixture `name` (a folder built once).
TINY = {"blip": tiny_blip_encoder, "clip": tiny_clip, "clip-int8": tiny_int8_clip, "onnx": tiny_onnx,
        "prompted": tiny_prompted, "siglip": tiny_siglip_encoder, "two-tower": tiny_two_tower}
# Families that return embeddings only (an exported pair): asking them for hidden states or attention maps is an error.
EMBEDDINGS_ONLY = {"onnx"}


@pytest.fixture
def fixture(request):
    """fixture(name) -> the value of the fixture called `name`, for the builders above."""
    return request.getfixturevalue


def test_every_registered_adapter_has_a_tiny_instance_here():
    assert sorted(TINY) == ADAPTERS.names()


def test_a_module_without_the_members_is_not_a_dual_encoder():
    assert not isinstance(torch.nn.Linear(2, 2), DualEncoder)


def inputs(model: DualEncoder, tokenizer) -> dict[str, torch.Tensor]:
    """Three random images of the model's size and three captions tokenized as its input spec says."""
    spec = model.input_spec
    pixels = torch.randn(3, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    tokens = make_tokenize(tokenizer, spec.max_text_length, spec.text_padding)(
        ["a red circle", "a blue square on the left", "two green triangles"]
    )
    return {"pixel_values": pixels, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_each_adapter_satisfies_the_contract_and_runs_through_it(model_type, tokenizer, fixture):
    model, model_tokenizer = TINY[model_type](tokenizer, fixture)
    assert isinstance(model, DualEncoder)
    assert model.input_spec.image_size == IMAGE_SIZE
    batch = inputs(model, model_tokenizer)
    layerwise = model_type not in EMBEDDINGS_ONLY
    with torch.no_grad():
        out = model(**batch, output_hidden_states=layerwise, output_attentions=layerwise)
        image = model.encode_image(batch["pixel_values"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert image.shape == text.shape == (3, model.embed_dim)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
    # forward embeds as encode_image / encode_text do (attention maps need eager attention: same numbers)
    assert torch.allclose(out.image_embeds, image, atol=1e-5) and torch.allclose(out.text_embeds, text, atol=1e-5)
    assert torch.allclose(out.logit_scale, model.logit_scale)
    if layerwise:
        assert out.image_hidden_states is not None and out.text_attentions is not None
    else:
        with pytest.raises(ValueError, match="it returns embeddings only"):
            model(**batch, output_hidden_states=True)
    bias = model.logit_bias
    assert (bias is None) == (out.logit_bias is None)
    if bias is not None:
        assert float(bias.detach()) == pytest.approx(-5.0)  # tiny_siglip's b
    json.dumps(model.architecture_config())  # plain JSON data for the cache manifest


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_save_pretrained_round_trips_through_the_loader(model_type, tokenizer, fixture, tmp_path):
    model, model_tokenizer = TINY[model_type](tokenizer, fixture)
    folder = model.save_pretrained(tmp_path / model_type, {"role": "test"}, tokenizer=model_tokenizer)
    assert json.loads((folder / "vldistill.json").read_text()) == {"role": "test"}
    loaded, loaded_tokenizer = load_dual_encoder_any(folder)
    assert type(loaded) is type(model) and loaded.architecture_config() == model.architecture_config()
    assert loaded.input_spec == model.input_spec
    batch = inputs(model, model_tokenizer)
    assert loaded_tokenizer("a red circle")["input_ids"] == model_tokenizer("a red circle")["input_ids"]
    with torch.no_grad():
        found = loaded.eval()(**batch)
        expected = model(**batch)
    assert torch.allclose(found.image_embeds, expected.image_embeds, atol=1e-6)
    assert torch.allclose(found.text_embeds, expected.text_embeds, atol=1e-6)


def test_only_a_clip_offers_a_spec_and_weights_to_inherit(tokenizer, fixture):
    clip, _ = tiny_clip(tokenizer, fixture)
    assert clip.architecture_spec() == teacher_spec() == spec_from_clip_config(clip.model.config)
    assert isinstance(clip.inheritable_clip(), CLIPModel) and clip.inheritable_clip() is clip.model
    for build in (tiny_siglip_encoder, tiny_two_tower, tiny_onnx):
        other, _ = build(tokenizer, fixture)
        assert other.architecture_spec() is None and other.inheritable_clip() is None


def test_a_clip_saves_only_with_a_tokenizer(tokenizer, tmp_path):
    clip = build_clip(config_for(teacher_spec(), tokenizer))
    assert isinstance(clip, CLIPDualEncoder)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        clip.save_pretrained(tmp_path / "clip")
    assert not (tmp_path / "clip").exists()
