"""BLIP captioning models (models/blip_caption.py, models/blip_caption_student.py) on a tiny BlipConfig built
in code over the word tokenizer: teacher-forced token logits and the signals asked for, caption targets,
the captioning loss against HF's own, generation, the saved folder and per-module students."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BlipForConditionalGeneration

from vldistill.models.blip_caption import (
    IGNORE_INDEX,
    BlipCaptioner,
    blip_token_settings,
    build_student_captioner,
    captioner_config,
    is_captioning_config,
    load_blip_captioner,
)
from vldistill.models.blip_caption_student import (
    captioner_modules,
    inherit_captioner_weights,
    student_captioner_config,
)
from vldistill.models.contract import Captioner, DualEncoder
from vldistill.models.io import read_metadata
from vldistill.models.spec import TowerSpec

VISION = TowerSpec(layers=2, width=32, heads=2, mlp_ratio=4.0, patch_size=8)
DECODER = TowerSpec(layers=2, width=32, heads=2, mlp_ratio=4.0)
SMALL = TowerSpec(layers=1, width=16, heads=2, mlp_ratio=2.0)


@pytest.fixture
def captioner(tokenizer) -> BlipCaptioner:
    """A seeded 2-layer width-32 vision tower over 16x16 images in 8x8 patches and a 2-layer width-32 decoder."""
    config = captioner_config(
        blip_token_settings(tokenizer), image_size=16, vision=VISION, decoder=DECODER, max_text_length=32
    )
    torch.manual_seed(0)
    return BlipCaptioner(BlipForConditionalGeneration(config).eval(), tokenizer)


def test_tiny_captioner_is_a_captioner_not_a_dual_encoder(captioner):
    assert 60_000 < captioner.num_parameters() < 100_000
    assert isinstance(captioner, Captioner) and not isinstance(captioner, DualEncoder)
    spec = captioner.input_spec
    assert (spec.image_size, spec.max_text_length) == (16, 32)
    text = captioner.model.config.text_config
    assert (text.bos_token_id, text.eos_token_id, text.sep_token_id, text.pad_token_id) == (2, 3, 3, 0)


def test_forward_returns_token_logits_and_the_signals_asked_for(captioner, make_batch, tokenizer):
    batch = make_batch(3)
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    batch_size, length = batch["input_ids"].shape
    plain = captioner(**inputs)
    assert set(plain) == {"token_logits", "caption_labels", "text_attention_mask"}
    assert plain.token_logits.shape == (batch_size, length, len(tokenizer))
    expected = captioner.model(**inputs).logits  # HF's own forward pass
    assert torch.allclose(plain.token_logits, expected, atol=1e-6)

    full = captioner(**inputs, output_hidden_states=True, output_attentions=True)
    assert torch.allclose(full.token_logits, plain.token_logits, atol=1e-6)
    tokens = 1 + (16 // 8) ** 2
    assert [h.shape for h in full.image_hidden_states] == [(batch_size, tokens, 32)] * 3  # embeddings + 2 layers
    assert [a.shape for a in full.image_attentions] == [(batch_size, 2, tokens, tokens)] * 2
    assert [h.shape for h in full.decoder_hidden_states] == [(batch_size, length, 32)] * 3
    assert [a.shape for a in full.decoder_attentions] == [(batch_size, 2, length, length)] * 2
    assert [a.shape for a in full.decoder_cross_attentions] == [(batch_size, 2, length, tokens)] * 2
    causal = full.decoder_attentions[0]
    assert torch.all(causal.triu(diagonal=1) == 0)  # no token attends to a later one
    assert torch.allclose(full.decoder_cross_attentions[1].sum(-1), torch.ones(batch_size, 2, length))


def test_caption_labels_by_hand():
    input_ids = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]])
    mask = (input_ids != 0).long()
    n = IGNORE_INDEX
    assert BlipCaptioner.caption_labels(input_ids, mask).tolist() == [[5, 6, 3, n, n], [7, 3, n, n, n]]
    # a two-token prompt ([BOS] "a"): its second token is not a target either
    assert BlipCaptioner.caption_labels(input_ids, mask, prompt_length=2).tolist() == [[n, 6, 3, n, n], [n, 3, n, n, n]]
    assert input_ids[0, 0] == 2  # not changed in place
    with pytest.raises(ValueError, match="prompt_length"):
        BlipCaptioner.caption_labels(input_ids, mask, prompt_length=0)


def test_teacher_forced_loss_equals_hf_labels_loss(captioner, make_batch):
    batch = make_batch(4)
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    logits = captioner(**inputs).token_logits
    labels = captioner.caption_labels(batch["input_ids"], batch["attention_mask"])
    ours = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    hf_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    hf_labels[:, 0] = IGNORE_INDEX
    theirs = captioner.model(**inputs, labels=hf_labels).loss
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert ours.item() > 1.0  # an untrained model: the loss is not trivially 0
    # the number of targets: every real token after the BOS
    assert int((labels != IGNORE_INDEX).sum()) == int(batch["attention_mask"].sum()) - 4


def test_first_token_becomes_the_decoders_bos(captioner, make_batch):
    batch = make_batch(2)
    other_first = batch["input_ids"].clone()
    other_first[:, 0] = 1  # e.g. a BERT tokenizer's [CLS]
    same = captioner(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).token_logits
    replaced = captioner(batch["pixel_values"], other_first, batch["attention_mask"]).token_logits
    assert torch.equal(same, replaced)
    assert other_first[0, 0] == 1


def test_generate_captions_greedy_follows_the_teacher_forced_argmax(captioner, make_batch, tokenizer):
    pixels = make_batch(3)["pixel_values"]
    captions = captioner.generate_captions(pixels, max_length=5)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) <= 5 for c in captions)
    assert captioner.generate_captions(pixels, max_length=5) == captions  # deterministic
    # greedy decoding: each generated token is the argmax of the teacher-forced logits before it
    for row in range(3):
        ids = captioner.model.generate(pixel_values=pixels[row : row + 1], max_new_tokens=5, do_sample=False)
        assert ids.shape[1] <= 6 and ids[0, 0] == 2
        logits = captioner(pixels[row : row + 1], ids, torch.ones_like(ids)).token_logits
        assert torch.equal(logits[0, :-1].argmax(-1), ids[0, 1:])
        assert tokenizer.decode(ids[0], skip_special_tokens=True).strip() == captions[row]
    beams = captioner.generate_captions(pixels, max_length=4, num_beams=2)
    assert len(beams) == 3 and all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) <= 4 for c in beams)
    with pytest.raises(ValueError, match="max_length"):
        captioner.generate_captions(pixels, max_length=0)


def test_save_and_load_round_trip(captioner, make_batch, tmp_path):
    folder = captioner.save_pretrained(tmp_path / "captioner", metadata={"role": "teacher"})
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "blip" and is_captioning_config(config)
    assert not is_captioning_config({"model_type": "blip", "architectures": ["BlipForImageTextRetrieval"]})
    assert not is_captioning_config({"model_type": "blip"})
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 16, "width": 16}
    assert processor["image_mean"] == pytest.approx(list(captioner.image_mean))
    assert read_metadata(folder) == {"role": "teacher"}

    loaded, tokenizer = load_blip_captioner(folder)
    assert loaded.input_spec == captioner.input_spec
    assert tokenizer("a red circle")["input_ids"] == captioner.tokenizer("a red circle")["input_ids"]
    batch = make_batch(2)
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    assert torch.equal(loaded.eval()(**inputs).token_logits, captioner(**inputs).token_logits)
    assert loaded.generate_captions(batch["pixel_values"], 4) == captioner.generate_captions(batch["pixel_values"], 4)
    assert loaded.architecture_config() == captioner.architecture_config()


def test_student_config_per_module(captioner):
    teacher = captioner.model.config
    config = student_captioner_config(teacher, vision=SMALL, decoder=None)
    modules = captioner_modules(config)
    assert (modules["vision"].layers, modules["vision"].width, modules["vision"].patch_size) == (1, 16, 8)
    assert modules["decoder"] == captioner_modules(teacher)["decoder"]  # None keeps the teacher's module
    assert config.text_config.encoder_hidden_size == 16  # the decoder cross-attends to the smaller tower
    for name in ("vocab_size", "bos_token_id", "eos_token_id", "sep_token_id", "pad_token_id", "max_position_embeddings"):
        assert getattr(config.text_config, name) == getattr(teacher.text_config, name)
    assert config.vision_config.image_size == 16


def test_student_inherits_every_kth_layer_and_leading_channels(captioner, make_batch):
    student = build_student_captioner(captioner, vision=SMALL, decoder=SMALL)
    t, s = captioner.model.state_dict(), student.model.state_dict()
    assert student.num_parameters() < captioner.num_parameters() / 3
    # vision: student layer 0 <- teacher layer 1 (the last); the fused qkv sliced per q, k and v
    teacher_qkv, student_qkv = t["vision_model.encoder.layers.1.self_attn.qkv.weight"], s["vision_model.encoder.layers.0.self_attn.qkv.weight"]
    assert student_qkv.shape == (48, 16)
    for block in range(3):
        assert torch.equal(student_qkv[16 * block : 16 * (block + 1)], teacher_qkv[32 * block : 32 * block + 16, :16])
    assert torch.equal(s["vision_model.embeddings.position_embedding"], t["vision_model.embeddings.position_embedding"][..., :16])
    # decoder: layer 0 <- layer 1, self- and cross-attention (keys read the 16-wide image tokens), MLP, embeddings
    prefix_s, prefix_t = "text_decoder.bert.encoder.layer.0.", "text_decoder.bert.encoder.layer.1."
    for name in ("attention.self.query.weight", "crossattention.self.key.weight", "intermediate.dense.weight"):
        shape = s[prefix_s + name].shape
        assert torch.equal(s[prefix_s + name], t[prefix_t + name][: shape[0], : shape[1]]), name
    embeddings = "text_decoder.bert.embeddings.word_embeddings.weight"
    assert torch.equal(s[embeddings], t[embeddings][:, :16])
    batch = make_batch(2)
    out = student(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert out.token_logits.shape == (2, batch["input_ids"].shape[1], captioner.model.config.text_config.vocab_size)


def test_inheritance_per_module(captioner):
    student = build_student_captioner(captioner, vision=SMALL, decoder=None, inherit=("decoder",))
    t, s = captioner.model.state_dict(), student.model.state_dict()
    decoder_keys = [k for k in s if k.startswith("text_decoder.") and "crossattention.self.key" not in k
                    and "crossattention.self.value" not in k]
    assert all(torch.equal(s[k], t[k]) for k in decoder_keys)  # the teacher's decoder, as is
    key = "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"
    assert torch.equal(s[key], t[key][:, :16])  # cross-attention keys: the image channels the student has
    vision = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(s[vision], t["vision_model.encoder.layers.1.mlp.fc1.weight"][:32, :16])  # not inherited


def test_inheritance_refusals(captioner):
    wide = TowerSpec(layers=1, width=64, heads=2, mlp_ratio=1.0)
    with pytest.raises(ValueError, match="student.vision.width = 64 exceeds the teacher's 32"):
        build_student_captioner(captioner, vision=TowerSpec(1, 64, 2, 1.0, 8), decoder=SMALL)
    build_student_captioner(captioner, vision=SMALL, decoder=wide, inherit=("vision",))  # the wide decoder is not inherited
    patch = TowerSpec(layers=1, width=16, heads=2, mlp_ratio=2.0, patch_size=4)
    with pytest.raises(ValueError, match="student.vision.patch_size = 4"):
        build_student_captioner(captioner, vision=patch, inherit=("vision",))
    student = BlipForConditionalGeneration(student_captioner_config(captioner.model.config, vision=SMALL))
    with pytest.raises(ValueError, match="unknown captioner module text"):
        inherit_captioner_weights(student, captioner.model, ("text",))


def test_the_forward_pass_carries_the_caption_labels_an_lm_loss_reads(captioner, make_batch):
    from vldistill.losses.base import LossContext
    from vldistill.losses.registry import build_objective

    batch = make_batch(4)
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    out = captioner(**inputs)
    assert torch.equal(out.caption_labels, captioner.caption_labels(batch["input_ids"], batch["attention_mask"]))
    objective = build_objective({"lm": {"label_smoothing": 0.0}}, LossContext(16))
    assert "caption_labels" in objective.student_needs
    loss, _ = objective(out, None)
    expected = F.cross_entropy(out.token_logits.flatten(0, 1), out.caption_labels.flatten(), ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
