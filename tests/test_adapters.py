"""The model-family registry: each adapter module registers a loader for its model_type, the loader
dispatches on what a folder holds, an unknown type is one error line naming the supported ones, and a
family registered from outside (here a test) is loaded like the built-in ones."""

from __future__ import annotations

import json

import pytest
from helpers import build_clip, config_for, teacher_spec, tiny_siglip, tiny_vision
from transformers import PretrainedConfig

from vldistill.models import adapters
from vldistill.models.adapters import register_adapter
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.io import save_dual_encoder
from vldistill.models.loading import adapter_for, load_dual_encoder_any, model_type_of, supported_model_types
from vldistill.models.locate import ModelNotFoundError, NotAModelError
from vldistill.models.siglip import SiglipDualEncoder
from vldistill.models.two_tower import TwoTowerDualEncoder
from vldistill.registry import Registry

REAL_ADAPTERS = adapters.ADAPTERS
SUPPORTED = (
    "supported model types: blip (an HF BlipForImageTextRetrieval or BlipForConditionalGeneration), "
    "clip (an HF CLIPModel), clip-int8 (a vldistill int8 CLIP folder: clip_int8.json), "
    "onnx (a vldistill ONNX export folder: onnx_pair.json), "
    "prompted (a vldistill CLIP or SigLIP with learnable prompts: prompted.json), siglip (an HF SiglipModel), "
    "two-tower (a vldistill two-tower folder: two_tower.json)"
)


@pytest.fixture
def registry(monkeypatch) -> Registry:
    """A copy of the adapter registry in place of the real one for this test, so that what a test
    registers does not outlive it."""
    fresh = Registry("model type")
    for name in adapters.ADAPTERS:
        fresh.register(name)(adapters.ADAPTERS.get(name))
    monkeypatch.setattr(adapters, "ADAPTERS", fresh)
    return fresh


def other_model(folder, model_type: str):
    """A folder whose config.json names `model_type` beside a weights file."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_the_registry_lists_clip_siglip_and_two_tower_and_each_folder_loads_with_its_own(tmp_path, tokenizer, bert_dir):
    assert supported_model_types() == ["blip", "clip", "clip-int8", "onnx", "prompted", "siglip", "two-tower"]
    save_dual_encoder(build_clip(config_for(teacher_spec(), tokenizer)), tokenizer, tmp_path / "clip")
    SiglipDualEncoder(tiny_siglip(tokenizer), tokenizer=tokenizer).save_pretrained(tmp_path / "siglip")
    tiny_vision().save_pretrained(tmp_path / "vision")
    TwoTowerDualEncoder.from_backbones(tmp_path / "vision", bert_dir, projection_dim=8).save_pretrained(tmp_path / "tt")
    for folder, model_type, cls in [
        ("clip", "clip", CLIPDualEncoder),
        ("siglip", "siglip", SiglipDualEncoder),
        ("tt", "two-tower", TwoTowerDualEncoder),
    ]:
        assert model_type_of(tmp_path / folder) == model_type
        assert adapter_for(tmp_path / folder).model_type == model_type
        model, tokenizer_back = load_dual_encoder_any(tmp_path / folder)
        assert type(model) is cls and tokenizer_back is not None


def test_an_unknown_model_type_is_one_line_naming_the_supported_ones(tmp_path, monkeypatch):
    folder = other_model(tmp_path / "bert", "bert")
    with pytest.raises(NotAModelError) as error:
        load_dual_encoder_any(folder)
    assert str(error.value) == f"{folder} holds a model of type 'bert', which is not a supported dual encoder; {SUPPORTED}"
    # A hub id is typed by its config.json too (fetched here from a stand-in for the hub).
    monkeypatch.chdir(tmp_path)  # no local folder org/llava
    monkeypatch.setattr(PretrainedConfig, "get_config_dict", lambda name, **kw: ({"model_type": "llava"}, {}))
    with pytest.raises(NotAModelError) as error:
        load_dual_encoder_any("org/llava")
    assert str(error.value) == f"org/llava holds a model of type 'llava', which is not a supported dual encoder; {SUPPORTED}"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError) as error:
        load_dual_encoder_any(empty)
    markers = "clip_int8.json nor onnx_pair.json nor prompted.json nor two_tower.json"
    assert str(error.value) == f"{empty} is not a model folder: it has neither {markers} nor config.json"


def test_a_model_type_registers_once(registry):
    with pytest.raises(ValueError, match="model type 'clip' is already registered"):
        register_adapter("clip", "another CLIP")(lambda name_or_path, **options: None)


def test_a_registered_toy_family_is_what_the_loader_dispatches_to(registry, tmp_path, tokenizer):
    toy_model = build_clip(config_for(teacher_spec(), tokenizer))
    calls = []

    @register_adapter("toy", "a family registered by a test")
    def load_toy(name_or_path, *, attentions=False, trust_remote_code=False):
        calls.append((name_or_path, attentions, trust_remote_code))
        return toy_model, tokenizer

    @register_adapter("toy-folder", "a family known by its marker file", marker="toy.json")
    def load_toy_folder(name_or_path, *, attentions=False, trust_remote_code=False):
        calls.append(("marked", name_or_path))
        return toy_model, tokenizer

    assert supported_model_types() == ["blip", "clip", "clip-int8", "onnx", "prompted", "siglip", "toy", "toy-folder", "two-tower"]
    folder = other_model(tmp_path / "toy", "toy")
    assert load_dual_encoder_any(folder, attentions=True, trust_remote_code=True) == (toy_model, tokenizer)
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / "toy.json").write_text("{}")  # no config.json: the marker file says what it is
    assert load_dual_encoder_any(marked) == (toy_model, tokenizer)
    assert calls == [(folder, True, True), ("marked", marked)]
    with pytest.raises(NotAModelError, match=r"supported model types: blip .*, clip .*, siglip .*, toy \(a family registered by a test\), "):
        load_dual_encoder_any(other_model(tmp_path / "bert", "bert"))
    assert "toy" not in REAL_ADAPTERS  # registered in this test's copy only
