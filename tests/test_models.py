"""Tests for vldistill.models: the CLIP adapter, student configs, weight inheritance, save/load."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import IMAGE_SIZE, SMALL_SPEC, TEXT_LENGTH, build_clip, config_for, model_inputs, teacher_spec
from transformers import CLIPConfig

from vldistill.data.transforms import to_pixel_values
from vldistill.models import (
    DualEncoderSpec,
    TowerSpec,
    check_inheritable,
    inherit_weights,
    spec_from_clip_config,
    student_config_from_teacher,
    uniform_layer_map,
)
from vldistill.models.inputs import CLIP_MEAN, CLIP_STD
from vldistill.models.io import read_metadata, save_dual_encoder
from vldistill.models.loading import load_dual_encoder_any


# ---------------------------------------------------------------- CLIPDualEncoder


@torch.no_grad()
def test_encoders_are_normalized_and_match_forward(teacher, make_batch) -> None:
    batch = make_batch(4)
    out = teacher(**model_inputs(batch))
    image = teacher.encode_image(batch["pixel_values"])
    text = teacher.encode_text(batch["input_ids"], batch["attention_mask"])
    assert image.shape == text.shape == (4, teacher.embed_dim) == (4, 32)
    assert torch.allclose(image.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert torch.allclose(text.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert torch.allclose(out.image_embeds, image, atol=1e-6)
    assert torch.allclose(out.text_embeds, text, atol=1e-6)
    assert torch.equal(out.text_attention_mask, batch["attention_mask"])
    assert out.image_hidden_states is None and out.image_attentions is None


@torch.no_grad()
def test_text_embedding_pools_at_eos_and_ignores_padding(teacher, tokenizer, make_batch) -> None:
    """A caption embeds the same alone as padded in a batch with a longer one (causal mask + EOS pooling)."""
    batch = make_batch(6, split="train")  # training captions vary in length
    lengths = batch["attention_mask"].sum(dim=1)
    short = int(lengths.argmin())
    assert lengths[short] < batch["input_ids"].shape[1], "the batch should need padding"
    alone = tokenizer([batch["captions"][short]], return_tensors="pt")
    in_batch = teacher.encode_text(batch["input_ids"], batch["attention_mask"])[short]
    assert torch.allclose(teacher.encode_text(alone["input_ids"], alone["attention_mask"])[0], in_batch, atol=1e-5)


def test_logit_scale_is_exp_of_parameter_and_clamps_at_ln_100(teacher, make_batch) -> None:
    with torch.no_grad():
        teacher.model.logit_scale.fill_(2.5)
    assert teacher.logit_scale.item() == pytest.approx(math.exp(2.5), rel=1e-6)
    with torch.no_grad():
        assert teacher(**model_inputs(make_batch(2))).logit_scale.item() == pytest.approx(math.exp(2.5), rel=1e-6)

    teacher.clamp_logit_scale()  # inside the range: unchanged
    assert teacher.model.logit_scale.item() == pytest.approx(2.5)
    with torch.no_grad():
        teacher.model.logit_scale.fill_(7.0)
    teacher.clamp_logit_scale()
    assert teacher.model.logit_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)
    assert teacher.logit_scale.item() == pytest.approx(100.0, rel=1e-5)
    with torch.no_grad():
        teacher.model.logit_scale.fill_(-1.0)
    teacher.clamp_logit_scale()
    assert teacher.model.logit_scale.item() == 0.0
    assert teacher.model.logit_scale.requires_grad  # still a trainable parameter


@torch.no_grad()
def test_hidden_states_are_embeddings_plus_one_per_layer(teacher, make_batch) -> None:
    batch = make_batch(3)
    out = teacher(**model_inputs(batch), output_hidden_states=True)
    n_patches = (IMAGE_SIZE // 8) ** 2 + 1  # plus the class token
    n_text = batch["input_ids"].shape[1]
    assert len(out.image_hidden_states) == len(out.text_hidden_states) == 2 + 1
    assert all(h.shape == (3, n_patches, 32) for h in out.image_hidden_states)
    assert all(h.shape == (3, n_text, 32) for h in out.text_hidden_states)
    # The first text hidden state is token + position embeddings, computed here by hand.
    embeddings = teacher.model.text_model.embeddings
    by_hand = embeddings.token_embedding.weight[batch["input_ids"]] + embeddings.position_embedding.weight[:n_text]
    assert torch.allclose(out.text_hidden_states[0], by_hand, atol=1e-6)


@torch.no_grad()
def test_attentions_switch_to_eager_and_are_distributions(teacher, make_batch) -> None:
    batch = make_batch(3)
    before = teacher(**model_inputs(batch))
    out = teacher(**model_inputs(batch), output_attentions=True)
    # Eager attention only for the call that asked for maps; the fast kernel afterwards.
    assert teacher.model.config._attn_implementation == "sdpa"
    n_patches, n_text = (IMAGE_SIZE // 8) ** 2 + 1, batch["input_ids"].shape[1]
    assert len(out.image_attentions) == len(out.text_attentions) == 2
    for maps, n in ((out.image_attentions, n_patches), (out.text_attentions, n_text)):
        for attention in maps:
            assert attention.shape == (3, 2, n, n)
            assert (attention >= 0).all()
            assert torch.allclose(attention.sum(dim=-1), torch.ones(3, 2, n), atol=1e-5)
    # Text attention is causal: no weight on later tokens.
    assert torch.all(torch.triu(out.text_attentions[0], diagonal=1) < 1e-6)
    # Eager attention computes the same embeddings as the default implementation.
    assert torch.allclose(out.image_embeds, before.image_embeds, atol=1e-5)
    assert torch.allclose(out.text_embeds, before.text_embeds, atol=1e-5)


# ---------------------------------------------------------------- student configs


def test_student_config_copies_the_teachers_data_interface(teacher) -> None:
    teacher_config = teacher.model.config
    config = student_config_from_teacher(teacher_config, SMALL_SPEC)
    assert config.vision_config.image_size == teacher_config.vision_config.image_size == IMAGE_SIZE
    for field in ("vocab_size", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(config.text_config, field) == getattr(teacher_config.text_config, field), field
    assert config.text_config.max_position_embeddings == TEXT_LENGTH
    assert (config.text_config.pad_token_id, config.text_config.bos_token_id, config.text_config.eos_token_id) == (0, 2, 3)
    assert config.vision_config.hidden_size == config.text_config.hidden_size == 16
    assert config.vision_config.intermediate_size == 32
    assert config.vision_config.num_hidden_layers == 1
    assert config.vision_config.patch_size == 8
    assert config.projection_dim == 16


def test_student_is_smaller_than_teacher(teacher) -> None:
    student = build_clip(student_config_from_teacher(teacher.model.config, SMALL_SPEC), seed=1)
    assert student.num_parameters() == sum(p.numel() for p in student.model.parameters())
    assert 0 < student.num_parameters() < teacher.num_parameters()
    assert student.embed_dim == 16


@pytest.mark.parametrize("spec", [teacher_spec(), SMALL_SPEC, DualEncoderSpec(text=TowerSpec(mlp_ratio=2.5))])
def test_spec_round_trips_through_clip_config(tokenizer, spec: DualEncoderSpec) -> None:
    config = config_for(spec, tokenizer)
    assert spec_from_clip_config(config) == spec
    # ... also after the config is written out as a dict (as in config.json) and read back.
    assert spec_from_clip_config(CLIPConfig.from_dict(config.to_dict())) == spec


def test_clip_config_rejects_image_size_not_divisible_by_patch(tokenizer) -> None:
    spec = DualEncoderSpec(vision=TowerSpec(patch_size=5))
    with pytest.raises(ValueError, match="patch_size"):
        config_for(spec, tokenizer)


# ---------------------------------------------------------------- inheritance


@pytest.mark.parametrize(
    ("student", "teacher", "expected"),
    [(2, 4, [1, 3]), (4, 12, [2, 5, 8, 11]), (4, 6, [1, 2, 4, 5]), (2, 5, [2, 4]), (3, 3, [0, 1, 2]), (1, 2, [1]), (1, 12, [11]), (6, 12, [1, 3, 5, 7, 9, 11])],
)
def test_uniform_layer_map(student: int, teacher: int, expected: list[int]) -> None:
    assert uniform_layer_map(student, teacher) == expected


@pytest.mark.parametrize("teacher_layers", range(1, 25))
def test_uniform_layer_map_is_increasing_in_range_and_ends_at_last(teacher_layers: int) -> None:
    for student_layers in range(1, teacher_layers + 1):
        layer_map = uniform_layer_map(student_layers, teacher_layers)
        assert len(layer_map) == student_layers
        assert layer_map[-1] == teacher_layers - 1
        assert layer_map[0] >= 0
        assert all(a < b for a, b in zip(layer_map, layer_map[1:]))


def test_inherit_weights_takes_mapped_layers_and_leading_channels(teacher) -> None:
    student = build_clip(student_config_from_teacher(teacher.model.config, SMALL_SPEC), seed=1)
    counts = inherit_weights(student.model, teacher.model)
    assert counts == {"vision_layers": 1, "text_layers": 1}
    s, t = student.model, teacher.model
    # Student layer 0 takes teacher layer 1 (uniform_layer_map(1, 2) == [1]), leading 16 channels.
    for tower in ("vision_model", "text_model"):
        s_attn = getattr(s, tower).encoder.layers[0].self_attn
        t_attn = getattr(t, tower).encoder.layers[1].self_attn
        assert torch.equal(s_attn.q_proj.weight, t_attn.q_proj.weight[:16, :16])
        assert torch.equal(s_attn.q_proj.bias, t_attn.q_proj.bias[:16])
        assert not torch.equal(s_attn.q_proj.weight, getattr(t, tower).encoder.layers[0].self_attn.q_proj.weight[:16, :16])
        s_mlp, t_mlp = getattr(s, tower).encoder.layers[0].mlp, getattr(t, tower).encoder.layers[1].mlp
        assert torch.equal(s_mlp.fc1.weight, t_mlp.fc1.weight[:32, :16])
        assert torch.equal(s_mlp.fc2.weight, t_mlp.fc2.weight[:16, :32])
    # Embeddings: leading channels.
    s_vis, t_vis = s.vision_model.embeddings, t.vision_model.embeddings
    assert torch.equal(s_vis.patch_embedding.weight, t_vis.patch_embedding.weight[:16])
    assert torch.equal(s_vis.class_embedding, t_vis.class_embedding[:16])
    assert torch.equal(s_vis.position_embedding.weight, t_vis.position_embedding.weight[:, :16])
    s_txt, t_txt = s.text_model.embeddings, t.text_model.embeddings
    assert torch.equal(s_txt.token_embedding.weight, t_txt.token_embedding.weight[:, :16])
    assert torch.equal(s_txt.position_embedding.weight, t_txt.position_embedding.weight[:, :16])
    # Final norms, projections and the temperature.
    assert torch.equal(s.text_model.final_layer_norm.weight, t.text_model.final_layer_norm.weight[:16])
    assert torch.equal(s.visual_projection.weight, t.visual_projection.weight[:16, :16])
    assert torch.equal(s.text_projection.weight, t.text_projection.weight[:16, :16])
    assert torch.equal(s.logit_scale, t.logit_scale)


@torch.no_grad()
def test_same_spec_student_inherits_an_identical_model(teacher, make_batch) -> None:
    student = build_clip(student_config_from_teacher(teacher.model.config, teacher_spec()), seed=1)
    batch = make_batch(3)
    assert not torch.allclose(student.encode_image(batch["pixel_values"]), teacher.encode_image(batch["pixel_values"]))
    assert inherit_weights(student.model, teacher.model) == {"vision_layers": 2, "text_layers": 2}
    s_state, t_state = student.model.state_dict(), teacher.model.state_dict()
    assert s_state.keys() == t_state.keys() and all(torch.equal(s_state[k], t_state[k]) for k in s_state)
    s_out, t_out = student(**model_inputs(batch)), teacher(**model_inputs(batch))
    assert torch.allclose(s_out.image_embeds, t_out.image_embeds, atol=1e-6)
    assert torch.allclose(s_out.text_embeds, t_out.text_embeds, atol=1e-6)
    # A copy, not shared storage: changing the student leaves the teacher alone.
    student.model.logit_scale.add_(1.0)
    assert not torch.equal(student.model.logit_scale, teacher.model.logit_scale)


@torch.no_grad()
def test_same_spec_student_of_a_gelu_teacher_reproduces_it(tokenizer, make_batch) -> None:
    config = config_for(teacher_spec(), tokenizer)
    for tower in (config.vision_config, config.text_config):
        tower.hidden_act = "gelu"
        tower.layer_norm_eps = 1e-6
    teacher = build_clip(config, seed=0)
    student = build_clip(student_config_from_teacher(config, spec_from_clip_config(config)), seed=1)
    inherit_weights(student.model, teacher.model)
    assert student.model.config.vision_config.hidden_act == "gelu"
    pixels = make_batch(2)["pixel_values"]
    assert torch.allclose(student.encode_image(pixels), teacher.encode_image(pixels), atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (DualEncoderSpec(vision=TowerSpec(layers=3, width=32, heads=2, patch_size=8), text=TowerSpec(layers=2, width=32, heads=2), projection_dim=32), "student.vision.layers"),
        (DualEncoderSpec(vision=TowerSpec(layers=2, width=32, heads=2, patch_size=8), text=TowerSpec(layers=2, width=64, heads=2), projection_dim=32), "student.text.width"),
        (DualEncoderSpec(vision=TowerSpec(layers=2, width=32, heads=2, patch_size=4), text=TowerSpec(layers=2, width=32, heads=2), projection_dim=32), "student.vision.patch_size"),
        (DualEncoderSpec(vision=TowerSpec(layers=2, width=32, heads=2, mlp_ratio=8.0, patch_size=8), text=TowerSpec(layers=2, width=32, heads=2), projection_dim=32), "student.vision.mlp_ratio"),
        (DualEncoderSpec(vision=TowerSpec(layers=2, width=32, heads=2, patch_size=8), text=TowerSpec(layers=2, width=32, heads=2), projection_dim=64), "student.projection_dim"),
    ],
)
def test_inherit_weights_rejects_bigger_or_incompatible_students(teacher, spec: DualEncoderSpec, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check_inheritable(spec, teacher_spec())
    student = build_clip(student_config_from_teacher(teacher.model.config, spec), seed=1)
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        inherit_weights(student.model, teacher.model)
    assert all(torch.equal(before[k], v) for k, v in student.model.state_dict().items())


# ---------------------------------------------------------------- save / load


@torch.no_grad()
def test_save_load_round_trip(teacher, tokenizer, make_batch, tmp_path) -> None:
    out_dir = tmp_path / "model"
    assert save_dual_encoder(teacher, tokenizer, out_dir, metadata={"role": "teacher", "step": 3}) == out_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dirs left beside it
    names = {p.name for p in out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= names
    assert "vldistill.json" in names and read_metadata(out_dir) == {"role": "teacher", "step": 3}
    preprocessor = json.loads((out_dir / "preprocessor_config.json").read_text())
    assert preprocessor["image_mean"] == pytest.approx(list(CLIP_MEAN))
    assert preprocessor["image_std"] == pytest.approx(list(CLIP_STD))
    assert preprocessor["crop_size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}

    loaded, loaded_tokenizer = load_dual_encoder_any(out_dir)
    batch = make_batch(4)
    again = loaded_tokenizer(batch["captions"], padding="longest", return_tensors="pt")
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert torch.equal(again["attention_mask"], batch["attention_mask"])
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id == 3
    assert torch.allclose(loaded.encode_image(batch["pixel_values"]), teacher.encode_image(batch["pixel_values"]), atol=1e-6)
    text_args = (batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(loaded.encode_text(*text_args), teacher.encode_text(*text_args), atol=1e-6)
    assert loaded.logit_scale.item() == pytest.approx(teacher.logit_scale.item())
    assert read_metadata(tmp_path) == {}


@torch.no_grad()
def test_save_over_existing_folder_replaces_it(teacher, tokenizer, make_batch, tmp_path) -> None:
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("from an older run")
    save_dual_encoder(teacher, tokenizer, out_dir, metadata={"version": 1})
    other = build_clip(teacher.model.config, seed=7)
    save_dual_encoder(other, tokenizer, out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert not (out_dir / "stale.txt").exists()
    assert not (out_dir / "vldistill.json").exists()  # nothing survives from the previous save
    loaded, _ = load_dual_encoder_any(out_dir)
    pixels = make_batch(2)["pixel_values"]
    assert torch.allclose(loaded.encode_image(pixels), other.encode_image(pixels), atol=1e-6)
    assert not torch.allclose(loaded.encode_image(pixels), teacher.encode_image(pixels), atol=1e-3)


def test_failed_save_keeps_the_old_folder(teacher, tokenizer, tmp_path) -> None:
    out_dir = tmp_path / "model"
    save_dual_encoder(teacher, tokenizer, out_dir, metadata={"version": 1})

    class Broken:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_dual_encoder(teacher, Broken(), out_dir, metadata={"version": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert read_metadata(out_dir) == {"version": 1}


def test_load_without_config_raises_file_not_found(tmp_path) -> None:
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json") as error:
        load_dual_encoder_any(folder)
    assert str(folder) in str(error.value)


PLAIN_TRANSFORMERS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model_dir, inputs_path = sys.argv[1], sys.argv[2]
    inputs = json.load(open(inputs_path))
    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    image = np.array(inputs["image"], dtype=np.uint8)
    text = tokenizer(inputs["captions"], padding=True, return_tensors="pt")
    given_pixels = torch.tensor(inputs["pixel_values"])
    processed_pixels = processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=given_pixels)
        processed_out = model(input_ids=text["input_ids"][:1], pixel_values=processed_pixels)
    classify = transformers.pipeline("zero-shot-image-classification", model=model_dir, device="cpu")
    results = classify(Image.fromarray(image), candidate_labels=inputs["labels"], hypothesis_template=inputs["template"])
    assert "vldistill" not in sys.modules, "the plain-transformers script imported vldistill"
    print(json.dumps({
        "input_ids": text["input_ids"].tolist(),
        "text_embeds": out.text_embeds.tolist(),
        "image_embeds": out.image_embeds.tolist(),
        "processed_pixels": processed_pixels.tolist(),
        "processed_image_embeds": processed_out.image_embeds.tolist(),
        "logit_scale": model.logit_scale.exp().item(),
        "pipeline": results,
        "vldistill_imported": "vldistill" in sys.modules,
    }))
    """
)


@torch.no_grad()
@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_saved_folder_loads_with_plain_transformers_in_a_fresh_process(teacher, tokenizer, make_batch, tmp_path) -> None:
    out_dir = save_dual_encoder(teacher, tokenizer, tmp_path / "model")
    batch = make_batch(3)
    labels, template = ["red circle", "blue square", "green cross", "white triangle"], "a photo of a {}"
    inputs_path = tmp_path / "inputs.json"
    inputs_path.write_text(json.dumps({
        "captions": batch["captions"],
        "pixel_values": batch["pixel_values"].tolist(),
        "image": batch["images"][0].tolist(),
        "labels": labels,
        "template": template,
    }))
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TRANSFORMERS_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(out_dir), str(inputs_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path),
             "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["vldistill_imported"] is False

    # Same tokens, same embeddings as vldistill's in-process model.
    assert got["input_ids"] == batch["input_ids"].tolist()
    image_embeds = teacher.encode_image(batch["pixel_values"])
    text_embeds = teacher.encode_text(batch["input_ids"], batch["attention_mask"])
    assert np.allclose(got["image_embeds"], image_embeds.numpy(), atol=1e-5)
    assert np.allclose(got["text_embeds"], text_embeds.numpy(), atol=1e-5)
    assert got["logit_scale"] == pytest.approx(teacher.logit_scale.item(), rel=1e-6)

    # The saved image processor reproduces vldistill's preprocessing of a uint8 image.
    ours = to_pixel_values(batch["images"][:1])
    assert np.allclose(got["processed_pixels"], ours.numpy(), atol=1e-5)
    assert np.allclose(got["processed_image_embeds"], image_embeds[:1].numpy(), atol=1e-5)

    # The zero-shot pipeline: a distribution over exactly the given labels, matching our own computation.
    scores = {r["label"]: r["score"] for r in got["pipeline"]}
    assert set(scores) == set(labels)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    prompts = tokenizer([template.format(label) for label in labels], padding="longest", return_tensors="pt")
    class_embeds = teacher.encode_text(prompts["input_ids"], prompts["attention_mask"])
    expected = (teacher.logit_scale * image_embeds[:1] @ class_embeds.t()).softmax(dim=-1)[0]
    assert [scores[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5)


def test_a_clip_student_refuses_modules_it_does_not_have(tokenizer):
    from vldistill.models.spec import DualEncoderSpec, TowerSpec
    from vldistill.models.student import clip_config_from_spec

    tower = TowerSpec(layers=1, width=16, heads=2)
    spec = DualEncoderSpec(vision=TowerSpec(layers=1, width=16, heads=2, patch_size=8), text=tower, projection_dim=16,
                           decoder=tower)
    with pytest.raises(ValueError, match="model.decoder is set, but a CLIP student has no decoder module"):
        clip_config_from_spec(spec, image_size=16, vocab_size=len(tokenizer), max_text_length=8,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
