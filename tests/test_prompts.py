"""Learnable prompts (models/prompts.py, models/prompted.py): CoOp context in the text tower, VPT-deep prompts in
the vision tower and a projector, on tiny CLIP and SigLIP models, checked against references built by hand
from the HF modules (the embeddings, layers, norms and heads run one by one)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import build_clip, config_for, teacher_spec, tiny_siglip
from transformers import CLIPModel

from vldistill.binding import ConfigError, build_dataclass
from vldistill.config import StudentConfig, load_config, packaged_config
from vldistill.data.tokenizer import make_tokenize
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.loading import load_dual_encoder_any, model_type_of
from vldistill.models.prompts import PROMPTED_FILE, PROMPTS_FILE, PromptConfig, PromptedDualEncoder
from vldistill.models.quantized import Int8CLIPDualEncoder
from vldistill.models.siglip import SiglipDualEncoder
from vldistill.models.signals import request_flags
from vldistill.data import bundle
from vldistill.train.runs import build_student, plan_student_run
from vldistill.train.stages import selected_names
from vldistill.trained import TrainedModel

CAPTIONS = ["a red circle", "a blue square on the left", "two green triangles"]


def tiny(family: str, tokenizer):
    """The tiny base model of `family` (clip or siglip), in eval mode."""
    if family == "clip":
        return build_clip(config_for(teacher_spec(), tokenizer))
    return SiglipDualEncoder(tiny_siglip(tokenizer), tokenizer=tokenizer).eval()


def batch(model, tokenizer) -> dict[str, torch.Tensor]:
    """Three seeded images and captions, tokenized as `model`'s input spec says."""
    spec = model.input_spec
    pixels = torch.randn(3, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))
    tokens = make_tokenize(tokenizer, spec.max_text_length, spec.text_padding)(CAPTIONS)
    return {"pixel_values": pixels, **tokens}


def prompted(base, tokenizer, seed: int = 0, **settings) -> PromptedDualEncoder:
    """`base` with prompts drawn from a generator seeded with `seed`."""
    return PromptedDualEncoder(
        base, PromptConfig(**settings), tokenizer=tokenizer, generator=torch.Generator().manual_seed(seed)
    ).eval()


def reference_text(base, family: str, ids: torch.Tensor, mask: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The base's text embedding with `context` (n, W) spliced in after the first token's embedding, computed
    layer by layer: token + position embeddings, a hand-built additive mask (CLIP: causal and padding; SigLIP:
    none), final norm, pooling (CLIP: the first EOS, shifted by n; SigLIP: the last position), projection."""
    text = base.model.text_model
    tokens = text.embeddings.token_embedding(ids)
    n = context.shape[0]
    hidden = torch.cat([tokens[:, :1], context.expand(len(ids), -1, -1), tokens[:, 1:]], dim=1)
    length = hidden.shape[1]
    hidden = hidden + text.embeddings.position_embedding(torch.arange(length))
    if family == "clip":
        full_mask = torch.cat([mask[:, :1], torch.ones(len(ids), n, dtype=mask.dtype), mask[:, 1:]], dim=1)
        allowed = torch.ones(length, length).tril().bool() & full_mask.bool()[:, None, None, :]
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        additive = None
    for layer in text.encoder.layers:
        hidden = layer(hidden, additive)
    hidden = text.final_layer_norm(hidden)
    if family == "clip":
        eos = (ids == base.model.config.text_config.eos_token_id).int().argmax(dim=-1) + n
        pooled = base.model.text_projection(hidden[torch.arange(len(ids)), eos])
    else:
        pooled = text.head(hidden[:, -1])
    return F.normalize(pooled, dim=-1)


def reference_image(base, family: str, pixels: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """The base's image embedding with VPT-deep prompts (depth, n, W), layer by layer: each of the first depth
    layers sees the image tokens followed by its own prompts (replacing the previous layer's prompt outputs),
    later layers carry the last prompt outputs, the pooling reads the image tokens only."""
    vision = base.model.vision_model
    hidden = vision.embeddings(pixels)
    if family == "clip":
        hidden = vision.pre_layrnorm(hidden)
    count = hidden.shape[1]
    for index, layer in enumerate(vision.encoder.layers):
        if index < len(prompts):
            hidden = torch.cat([hidden[:, :count], prompts[index].expand(len(pixels), -1, -1)], dim=1)
        hidden = layer(hidden, None)
    hidden = hidden[:, :count]
    if family == "clip":
        return F.normalize(base.model.visual_projection(vision.post_layernorm(hidden[:, 0])), dim=-1)
    return F.normalize(vision.head(vision.post_layernorm(hidden)), dim=-1)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_without_prompt_tokens_the_wrapper_embeds_exactly_as_its_base(family, tokenizer):
    base = tiny(family, tokenizer)
    model = prompted(base, tokenizer, n_ctx=0)
    inputs = batch(model, tokenizer)
    assert inputs["input_ids"].shape == batch(base, tokenizer)["input_ids"].shape
    with torch.no_grad():
        found, expected = model(**inputs), base(**inputs)
        assert torch.equal(model.encode_image(inputs["pixel_values"]), base.encode_image(inputs["pixel_values"]))
        assert torch.equal(model.encode_text(inputs["input_ids"], inputs["attention_mask"]), expected.text_embeds)
    assert torch.equal(found.image_embeds, expected.image_embeds) and torch.equal(found.text_embeds, expected.text_embeds)
    assert dict(model.named_parameters()).keys() == {f"base.{name}" for name, _ in base.named_parameters()}


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_context_tokens_embed_as_the_base_run_on_hand_spliced_embeddings(family, tokenizer):
    base = tiny(family, tokenizer)
    model = prompted(base, tokenizer, n_ctx=3)
    assert model.input_spec.max_text_length == base.input_spec.max_text_length - 3
    inputs = batch(model, tokenizer)
    with torch.no_grad():
        found = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        expected = reference_text(base, family, inputs["input_ids"], inputs["attention_mask"], model.prompts.text)
        plain = base.encode_text(inputs["input_ids"], inputs["attention_mask"])
        joint = model(**inputs)
    assert torch.allclose(found, expected, atol=1e-5)
    assert torch.allclose(joint.text_embeds, expected, atol=1e-5)
    assert (found - plain).abs().max() > 1e-3  # the context changes the embedding
    # the base on its own is untouched once the call is over (the hooks live for the call only)
    with torch.no_grad():
        assert torch.equal(base.encode_text(inputs["input_ids"], inputs["attention_mask"]), plain)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_deep_visual_prompts_match_a_layer_by_layer_reference(family, tokenizer):
    base = tiny(family, tokenizer)
    pixels = batch(base, tokenizer)["pixel_values"]
    with torch.no_grad():
        plain = base.encode_image(pixels)
        for depth in (1, 2):  # 1: the prompt outputs flow through layer 2; 2: layer 2 replaces them with its own
            model = prompted(base, tokenizer, n_ctx=0, n_vis=3, depth=depth, seed=depth)
            found = model.encode_image(pixels)
            assert torch.allclose(found, reference_image(base, family, pixels, model.prompts.vision), atol=1e-5)
            assert (found - plain).abs().max() > 1e-3
        assert torch.equal(base.encode_image(pixels), plain)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_signals_keep_the_input_tokens_positions(family, tokenizer):
    base = tiny(family, tokenizer)
    model = prompted(base, tokenizer, n_ctx=2, n_vis=2, depth=2)
    inputs = batch(model, tokenizer)
    with torch.no_grad():
        found = model(**inputs, output_hidden_states=True, output_attentions=True)
        expected = base(**inputs, output_hidden_states=True, output_attentions=True)
    for name in ("image_hidden_states", "text_hidden_states", "image_attentions", "text_attentions"):
        assert [t.shape for t in found[name]] == [t.shape for t in expected[name]], name
    assert torch.equal(found.text_attention_mask, inputs["attention_mask"])
    # the embedding layer's output at the input tokens is the base's: the context only sits between them
    first, rest = found.text_hidden_states[0][:, :1], found.text_hidden_states[0][:, 1:]
    tokens = base.model.text_model.embeddings.token_embedding(inputs["input_ids"])
    positions = base.model.text_model.embeddings.position_embedding.weight
    assert torch.allclose(first, tokens[:, :1] + positions[:1], atol=1e-6)
    assert torch.allclose(rest, tokens[:, 1:] + positions[3 : 2 + inputs["input_ids"].shape[1]], atol=1e-6)
    # attention rows lose exactly the weight given to the prompts: below 1 where prompts were visible
    row_sums = found.image_attentions[0].sum(-1)
    assert (row_sums < 1 - 1e-4).all() and (row_sums > 0).all()


def test_a_frozen_base_passes_gradients_to_the_prompts_and_projector_only(tokenizer):
    base = tiny("clip", tokenizer)
    model = prompted(base, tokenizer, n_ctx=2, n_vis=2, depth=1, projector_dim=8)
    for parameter in model.base.parameters():
        parameter.requires_grad_(False)
    inputs = batch(model, tokenizer)
    out = model.train()(**inputs)
    loss = out.logits_per_image().logsumexp(-1).mean() + model.project(out.image_embeds).sum()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert sorted(name for name, grad in grads.items() if grad is not None) == [
        "projector.bias", "projector.weight", "prompts.text", "prompts.vision",
    ]
    assert all(grads[name].abs().sum() > 0 for name in ("prompts.text", "prompts.vision", "projector.weight"))


def test_projector_maps_embeddings_linearly_to_the_target_size(tokenizer):
    model = prompted(tiny("clip", tokenizer), tokenizer, n_ctx=1, projector_dim=48)
    embeds = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        raw = model.project(embeds, normalize=False)
        assert torch.allclose(raw, embeds @ model.projector.weight.t() + model.projector.bias)
        assert torch.allclose(model.project(embeds), F.normalize(raw, dim=-1))
    with pytest.raises(ValueError, match="no projector"):
        prompted(tiny("clip", tokenizer), tokenizer, n_ctx=1).project(embeds)


def test_context_initializes_from_a_phrase_or_seeded_noise(tokenizer):
    base = tiny("clip", tokenizer)
    model = prompted(base, tokenizer, n_ctx=3, ctx_init="a red circle")
    ids = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert torch.equal(model.prompts.text.detach(), base.model.text_model.embeddings.token_embedding.weight[ids])
    again, other = prompted(base, tokenizer, n_ctx=3), prompted(base, tokenizer, n_ctx=3, seed=1)
    assert torch.equal(again.prompts.text, prompted(base, tokenizer, n_ctx=3).prompts.text)
    assert not torch.equal(again.prompts.text, other.prompts.text)
    assert again.prompts.text.std().item() == pytest.approx(0.02, rel=0.3)
    with pytest.raises(ValueError, match="is 3 tokens, but n_ctx is 4"):
        prompted(base, tokenizer, n_ctx=4, ctx_init="a red circle")


def test_only_clip_and_siglip_take_prompts_and_settings_are_checked(tokenizer):
    clip = tiny("clip", tokenizer)
    with pytest.raises(ValueError, match="need a CLIP or SigLIP dual encoder, got a Int8CLIPDualEncoder"):
        PromptedDualEncoder(Int8CLIPDualEncoder.from_float(clip), PromptConfig())
    with pytest.raises(ValueError, match="depth 3 exceeds the vision tower's 2 layers"):
        PromptedDualEncoder(clip, PromptConfig(n_vis=1, depth=3))
    with pytest.raises(ValueError, match="n_vis and depth go together"):
        PromptConfig(n_vis=2).validate("prompts")


def test_too_long_texts_lose_only_padding_columns(tokenizer):
    base = tiny("siglip", tokenizer)  # 12 positions, texts padded to the full length
    model = prompted(base, tokenizer, n_ctx=2)
    full = make_tokenize(tokenizer, 12, "max_length")(CAPTIONS)  # tokenized for the base: 2 columns too many
    short = make_tokenize(tokenizer, 10, "max_length")(CAPTIONS)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(full["input_ids"], full["attention_mask"]),
                              model.encode_text(short["input_ids"], short["attention_mask"]))
        with pytest.raises(ValueError, match="exceed the text tower's 12 positions: tokenize to at most 10"):
            model.encode_text(full["input_ids"][:, :1].repeat(1, 12), torch.ones(3, 12, dtype=torch.long))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_saved_prompted_model_reloads_with_its_prompts(family, tokenizer, tmp_path):
    model = prompted(tiny(family, tokenizer), tokenizer, n_ctx=2, ctx_init="a red", n_vis=2, depth=1, projector_dim=8)
    with torch.no_grad():
        model.prompts.text.add_(0.5)  # trained away from the phrase: the saved values, not the init, must come back
    folder = model.save_pretrained(tmp_path / "prompted", {"role": "student"})
    assert model_type_of(folder) == "prompted"
    assert json.loads((folder / "config.json").read_text())["model_type"] == family  # a plain HF folder
    record = json.loads((folder / PROMPTED_FILE).read_text())
    assert record["base_model_type"] == family and record["prompts"]["n_vis"] == 2 and (folder / PROMPTS_FILE).is_file()
    loaded, loaded_tokenizer = load_dual_encoder_any(folder)
    assert isinstance(loaded, PromptedDualEncoder) and type(loaded.base) is type(model.base)
    assert loaded.config == model.config and loaded.text_offset == model.text_offset
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    inputs = batch(model, tokenizer)
    with torch.no_grad():
        found, expected = loaded(**inputs), model(**inputs)
        assert torch.equal(loaded.project(found.image_embeds), model.project(expected.image_embeds))
    assert torch.equal(found.image_embeds, expected.image_embeds) and torch.equal(found.text_embeds, expected.text_embeds)
    assert loaded_tokenizer("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]


def test_clip_folder_of_a_prompted_model_loads_in_plain_transformers(tokenizer, tmp_path):
    model = prompted(tiny("clip", tokenizer), tokenizer, n_ctx=2)
    folder = model.save_pretrained(tmp_path / "prompted")
    plain = CLIPModel.from_pretrained(folder)
    assert torch.equal(plain.text_projection.weight, model.base.model.text_projection.weight)


def test_student_prompts_config_section(tokenizer):
    cfg = build_dataclass(StudentConfig, {"prompts": {"n_ctx": 4, "ctx_init": "a photo of a", "projector_dim": "teacher"}}, "student")
    assert cfg.prompts == PromptConfig(n_ctx=4, ctx_init="a photo of a", projector_dim="teacher")
    assert build_dataclass(StudentConfig, {}, "student").prompts is None
    with pytest.raises(ConfigError, match="unknown config key 'student.prompts.n_tokens'"):
        build_dataclass(StudentConfig, {"prompts": {"n_tokens": 4}}, "student")
    with pytest.raises(ConfigError, match="student.prompts.projector_dim must be a positive int"):
        build_dataclass(StudentConfig, {"prompts": {"projector_dim": "wide"}}, "student")


def test_build_student_wraps_the_student_in_the_configured_prompts(tokenizer, tmp_path):
    teacher = TrainedModel(build_clip(config_for(teacher_spec(), tokenizer)), tokenizer, tmp_path)
    plain_cfg = load_config(packaged_config("tiny"))
    assert not isinstance(build_student(plain_cfg, teacher, inherit=False), PromptedDualEncoder)
    settings = "student.prompts={n_ctx: 2, ctx_init: a red, n_vis: 1, depth: 1, projector_dim: teacher}"
    student = build_student(load_config(packaged_config("tiny"), [settings]), teacher, inherit=False)
    assert isinstance(student, PromptedDualEncoder) and isinstance(student.base, CLIPDualEncoder)
    assert student.projector.in_features == student.embed_dim and student.projector.out_features == teacher.model.embed_dim
    ids = tokenizer("a red", add_special_tokens=False)["input_ids"]
    assert torch.equal(student.prompts.text.detach(), student.base.model.text_model.embeddings.token_embedding.weight[ids])


def test_a_loss_asking_for_projected_image_embeds_gets_them_from_forward(tokenizer):
    model = prompted(tiny("clip", tokenizer), tokenizer, n_ctx=1, projector_dim=8)
    flags = request_flags(frozenset({"projected_image_embeds", "image_embeds"}))
    assert flags == {"output_projection": True}
    inputs = batch(model, tokenizer)
    with torch.no_grad():
        out = model(**inputs, **flags)
        assert torch.allclose(out.projected_image_embeds, model.project(out.image_embeds))
        assert out.projected_image_embeds.shape == (3, 8) and model(**inputs).projected_image_embeds is None
    with pytest.raises(ValueError, match="no projector"):
        prompted(tiny("clip", tokenizer), tokenizer, n_ctx=1)(**inputs, **flags)


def test_staged_training_selects_the_prompts_projector_and_the_base_groups(tokenizer):
    model = prompted(tiny("clip", tokenizer), tokenizer, n_ctx=1, n_vis=1, depth=1, projector_dim=8)
    names = [name for name, _ in model.named_parameters()]
    groups = model.parameter_groups()
    assert groups == {group: tuple(f"base.{p}" for p in prefixes) for group, prefixes in model.base.parameter_groups().items()}
    layer = [name for name in names if name.startswith(groups["vision.layers.1"])]
    assert layer and all(name.startswith("base.model.vision_model.encoder.layers.1.") for name in layer)
    objective = torch.nn.Module()
    assert selected_names("prompts", model, objective, "stage") == {"student.prompts.text", "student.prompts.vision"}
    assert selected_names("projector", model, objective, "stage") == {"student.projector.weight", "student.projector.bias"}
    assert selected_names("vision.layers.1", model, objective, "stage") == {f"student.{name}" for name in layer}


def test_a_projector_no_loss_reads_is_frozen_and_left_out_of_every_stage(tokenizer, tmp_path, caplog):
    teacher = TrainedModel(build_clip(config_for(teacher_spec(), tokenizer)), tokenizer, tmp_path)
    settings = [
        "student.prompts={n_ctx: 2, projector_dim: teacher}", "distill.train.steps=4",
        "distill.stages=[{name: a, steps: 2, trainable: [prompts, projector]}, {name: b, steps: 2, trainable: [student]}]",
        "distill.train.warmup_steps=1",
    ]
    cfg = load_config(packaged_config("tiny"), settings)
    data = bundle.load_data(cfg.data, progress=False)
    plan = plan_student_run(cfg, data, teacher, tmp_path / "student", losses={"clip": {}, "kd": {}})
    projector = {"student.projector.weight", "student.projector.bias"}
    assert all(not (stage.trainable & projector) for stage in plan.stages)
    assert "student.prompts.text" in plan.stages[0].trainable
    assert not any(p.requires_grad for p in plan.student.projector.parameters())
    assert "no selected loss reads the projected embeddings" in caplog.text
    before = plan.student.projector.weight.detach().clone()
    plan.train("t", progress=False)
    assert torch.equal(plan.student.projector.weight, before)
