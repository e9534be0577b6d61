"""`vldistill distill` with a BLIP captioning teacher: the teacher builds a smaller captioner per module
(inheriting its layers), which trains with `distill.caption_losses` (the LM task loss, LM distillation and the
layer-wise losses of its vision tower and decoder) and is saved as a plain HF BlipForConditionalGeneration
folder with its card; the teacher cache refuses captioning signals, naming them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import IMAGE_SIZE, TEXT_LENGTH, bert_word_tokenizer, tiny_captioner
from transformers import AutoTokenizer, BlipForConditionalGeneration

from vldistill.cli import main
from vldistill.config import ConfigError, OptimConfig, load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.data.synthetic import make_split
from vldistill.data.tokenizer import make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.losses import LossContext, build_objective
from vldistill.models.blip_caption import (
    IGNORE_INDEX,
    BlipCaptioner,
    build_student_captioner,
)
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.spec import TowerSpec
from vldistill.teachers.assemble import load_teacher
from vldistill.teachers.cache.cached import serve_from_cache
from vldistill.teachers.ensemble import TeacherEnsemble
from vldistill.train.loop import StudentWithObjective, train
from vldistill.train.runs import build_student, plan_student_run

TINY = str(packaged_config("tiny"))
SMALL = TowerSpec(layers=1, width=16, heads=1, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def captioning_teacher(tmp_path_factory) -> Path:
    """A saved tiny BlipForConditionalGeneration (helpers.tiny_captioner) over the tiny config's 16x16 shapes
    with the BERT-style word tokenizer, whose [CLS] is the decoder's BOS (built once; tests must not change it)."""
    folder = tmp_path_factory.mktemp("captioner") / "teacher"
    return tiny_captioner(bert_word_tokenizer(), seed=0).save_pretrained(folder, {"role": "teacher"})


def tiny_config(teacher: Path, *overrides: str):
    return load_config(TINY, [f"teacher.path={teacher}", *overrides])


def caption_batch(tokenizer, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """n synthetic test pairs as a captioner's inputs: pixel values and the captions tokenized [CLS] ... [SEP]."""
    data = make_split("test", n, seed=seed, image_size=IMAGE_SIZE)
    return {"pixel_values": to_pixel_values(data.images), **make_tokenize(tokenizer, TEXT_LENGTH)(data.captions)}


@pytest.fixture(scope="module")
def caption_run(captioning_teacher, tmp_path_factory) -> Path:
    """The folder of a 2-step `vldistill distill` of the tiny config's student (1-layer width-16 vision tower
    and decoder) from the captioning teacher with the default caption losses, unevaluated (built once)."""
    out = tmp_path_factory.mktemp("caption-run") / "run"
    args = ["distill", TINY, "--out", str(out), "--quiet", "--no-eval", "--set", f"teacher.path={captioning_teacher}",
            "--set", "distill.train.steps=2", "--set", "distill.train.batch_size=8", "--set", "distill.train.log_every=1",
            "--set", "data.train_size=32", "--set", "data.val_size=8", "--set", "data.test_size=8"]
    assert main(args) == 0
    return out


def test_distill_trains_a_captioning_student_with_the_caption_losses(caption_run):
    steps = [json.loads(line) for line in (caption_run / "logs" / "distill.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for step in steps:
        assert {"loss/lm", "loss/lm_kd"} <= set(step) and not any(k in step for k in ("loss/clip", "loss/kd"))
        # an untrained decoder over a vocabulary of about 70 words: cross-entropy near ln(70) = 4.2
        assert 3.0 < step["loss/lm"] < 6.0 and step["loss/lm_kd"] > 0
        assert step["loss/total"] == pytest.approx(step["loss/lm"] + step["loss/lm_kd"], rel=1e-5)


def test_the_captioning_student_is_a_plain_blip_folder_that_generates(caption_run, captioning_teacher):
    folder = caption_run / "student"
    plain = BlipForConditionalGeneration.from_pretrained(folder).eval()  # plain transformers
    assert (plain.config.vision_config.hidden_size, plain.config.text_config.num_hidden_layers) == (16, 1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pixels = caption_batch(tokenizer, 3)["pixel_values"]
    ids = plain.generate(pixel_values=pixels, max_new_tokens=5, do_sample=False)
    assert ids.shape[0] == 3 and ids.shape[1] <= 6 and bool((ids[:, 0] == tokenizer.cls_token_id).all())  # [CLS] is BOS
    metadata = json.loads((folder / "vldistill.json").read_text())
    assert metadata["architecture"] == "BlipForConditionalGeneration" and metadata["inherit"] is True
    assert metadata["losses"] == {"lm": {"weight": 1.0}, "lm_kd": {"weight": 1.0, "temperature": 2.0}}
    assert metadata["params"] == sum(p.numel() for p in plain.parameters()) < metadata["teacher_params"]
    card = (folder / "README.md").read_text()
    assert "BlipForConditionalGeneration.from_pretrained" in card and "pipeline_tag: image-to-text" in card
    model, loaded_tokenizer = load_dual_encoder_any(folder)  # vldistill's loader reads it back as a captioner
    assert isinstance(model, BlipCaptioner) and loaded_tokenizer.cls_token == "[CLS]"
    expected = [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert model.eval().generate_captions(pixels, max_length=5) == expected
    inherited = build_student(tiny_config(captioning_teacher), load_teacher(str(captioning_teacher)), inherit=True)
    key = "text_decoder.bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(plain.state_dict()[key], inherited.model.state_dict()[key])  # the run did train


def test_a_captioning_teacher_builds_a_captioner_student_inheriting_each_module(captioning_teacher):
    primary = load_teacher(str(captioning_teacher))
    student = build_student(tiny_config(captioning_teacher), primary, inherit=True)
    assert isinstance(student, BlipCaptioner) and student.tokenizer is primary.tokenizer
    assert student.input_spec == primary.model.input_spec
    vision, decoder = student.model.config.vision_config, student.model.config.text_config
    # student.model.decoder is unset: the decoder takes student.model.text (1 layer, width 16, 1 head, MLP 2.0)
    assert (vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size) == (1, 16, 32)
    assert (decoder.num_hidden_layers, decoder.hidden_size, decoder.num_attention_heads, decoder.intermediate_size) == (1, 16, 1, 32)
    t, s = primary.model.model.state_dict(), student.model.state_dict()
    # student layer 0 of each module is the teacher's last layer, leading channels
    torch.testing.assert_close(s["vision_model.encoder.layers.0.mlp.fc1.weight"], t["vision_model.encoder.layers.1.mlp.fc1.weight"][:32, :16])
    cross = "text_decoder.bert.encoder.layer.{}.crossattention.self.key.weight"
    torch.testing.assert_close(s[cross.format(0)], t[cross.format(1)][:16, :16])
    fresh = build_student(tiny_config(captioning_teacher), primary, inherit=False)
    assert not torch.allclose(fresh.model.state_dict()[cross.format(0)], s[cross.format(0)])
    # the decoder shaped on its own: the teacher's decoder as is, its cross-attention keys reading 16-wide image tokens
    own = build_student(tiny_config(captioning_teacher, "student.model.decoder={layers: 2, width: 32, heads: 2, mlp_ratio: 4.0}"),
                        primary, inherit=True)
    query = "text_decoder.bert.encoder.layer.1.attention.self.query.weight"
    torch.testing.assert_close(own.model.state_dict()[query], t[query])
    torch.testing.assert_close(own.model.state_dict()[cross.format(1)], t[cross.format(1)][:, :16])
    with pytest.raises(ValueError, match="student.model.fusion is set, but a captioning student has no fusion encoder"):
        build_student(tiny_config(captioning_teacher, "student.model.fusion={layers: 1, width: 16, heads: 1}"), primary, False)
    with pytest.raises(ValueError, match=r"student\.decoder\.width = 64 exceeds the teacher's 32"):
        build_student(tiny_config(captioning_teacher, "student.model.decoder={layers: 1, width: 64, heads: 2}"), primary, True)


def test_lm_kd_falls_as_a_student_distills_a_fixed_teacher():
    tokenizer = bert_word_tokenizer()
    teacher = tiny_captioner(tokenizer, seed=0)
    batch = caption_batch(tokenizer, 8)
    fit = OptimConfig(steps=20, batch_size=8, lr=1e-2, warmup_steps=0, weight_decay=0.0, log_every=20)
    train(teacher, build_objective({"lm": {}}, LossContext(16)), [batch] * 20, fit, progress=False)  # peaked targets
    teacher.eval()
    student = build_student_captioner(teacher, vision=TowerSpec(1, 16, 1, 2.0), decoder=SMALL, inherit=(), seed=1)
    with torch.no_grad():  # the reference loss of the untrained student, computed by hand
        s_logits, t_logits = student(**batch).token_logits, teacher(**batch).token_logits
        real = student.caption_labels(batch["input_ids"], batch["attention_mask"]) != IGNORE_INDEX
        p_teacher = (t_logits[real] / 2.0).softmax(-1)
        kl = (p_teacher * (p_teacher.log() - (s_logits[real] / 2.0).log_softmax(-1))).sum(-1).mean()
        expected = 4.0 * kl.item()
    objective = build_objective({"lm_kd": {"temperature": 2.0}}, LossContext(16))
    optim = OptimConfig(steps=25, batch_size=8, lr=1e-2, warmup_steps=0, weight_decay=0.0, log_every=1)
    history = train(student, objective, [batch] * 25, optim, teacher=teacher, progress=False).history
    losses = [record["loss/lm_kd"] for record in history]
    assert losses[0] == pytest.approx(expected, rel=1e-4)  # step 1 logs the loss before its update
    assert losses[0] > 0.5  # the teacher's targets are far from the fresh student's
    assert all(later < earlier for earlier, later in zip(losses[:10], losses[1:11]))
    assert losses[-1] < 0.25 * losses[0]


@pytest.mark.parametrize("losses", [
    {"lm": {}},
    {"lm_kd": {"temperature": 2.0}},
    {"hidden": {"towers": ["vision", "decoder"]}},
    {"attention": {"towers": ["vision", "decoder"]}},
    {"cross_attention": {"modules": ["decoder"]}},
], ids=["lm", "lm_kd", "hidden", "attention", "cross_attention"])
def test_each_caption_loss_trains_a_step_of_both_modules(losses):
    tokenizer = bert_word_tokenizer()
    teacher = tiny_captioner(tokenizer, seed=0)
    student = build_student_captioner(teacher, vision=TowerSpec(1, 16, 1, 2.0), decoder=SMALL, seed=1)
    context = LossContext(16, student_spec=student.architecture_spec(), teacher_spec=teacher.architecture_spec())
    module = StudentWithObjective(student, build_objective(losses, context, where="distill.caption_losses"))
    batch = caption_batch(tokenizer, 4)
    needs = module.objective.needs
    teacher_output = TeacherEnsemble([teacher])(batch, needs) if needs else None
    loss, _ = module(batch, teacher_output)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    for prefix in ("vision_model.encoder.layers.0.", "text_decoder.bert.encoder.layer.0."):
        grads = [p.grad for name, p in student.model.named_parameters() if name.startswith(prefix)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), prefix


def test_a_no_teacher_baseline_of_a_captioner_trains_with_the_lm_task_loss_alone(captioning_teacher, tmp_path):
    cfg = tiny_config(captioning_teacher, "data.train_size=32", "data.val_size=8", "data.test_size=8",
                      "distill.train.steps=1", "distill.train.warmup_steps=0", "distill.train.batch_size=8", "distill.train.log_every=1")
    plan = plan_student_run(cfg, load_data(cfg.data, progress=False), load_teacher(str(captioning_teacher)),
                            tmp_path / "baseline", losses={"lm": {}}, inherit=False)
    assert plan.teachers is None and not plan.objective.needs and isinstance(plan.student, BlipCaptioner)
    (step,) = plan.train("baseline", progress=False).history
    assert {k for k in step if k.startswith("loss/")} == {"loss/lm", "loss/total"} and 3.0 < step["loss/lm"] < 6.0


def test_a_caption_loss_a_captioner_cannot_feed_is_refused_by_its_key(captioning_teacher, tmp_path):
    teacher = load_teacher(str(captioning_teacher))
    refusals = {
        "distill.caption_losses={hidden: {}}": r"distill\.caption_losses\.hidden reads text_hidden_states, which a captioning model does not return",
        "distill.caption_losses={lm: {}, kd: {}}": r"distill\.caption_losses\.kd reads image_embeds, logit_scale, text_embeds",
    }
    for override, message in refusals.items():
        with pytest.raises(ValueError, match=message):
            plan_student_run(tiny_config(captioning_teacher, override), None, teacher, tmp_path / "student")  # before data
    with pytest.raises(ValueError, match="a captioning teacher distills alone"):
        plan_student_run(tiny_config(captioning_teacher, f"teacher.ensemble=[{{path: {captioning_teacher}}}]"), None, teacher,
                         tmp_path / "student")


def test_the_teacher_cache_refuses_captioning_signals_naming_them(captioning_teacher, tmp_path, caplog, capsys):
    cfg = tiny_config(captioning_teacher, f"cache.path={tmp_path / 'cache'}")
    refused = r"distill\.caption_losses\.lm_kd needs the teacher's token_logits"
    assert not serve_from_cache(cfg.cache, cfg.distill.caption_loss_specs, cfg.distill.weighting, "distill.caption_losses")
    assert re.search(refused, caplog.text)  # auto: says why and runs the teacher online
    cfg = tiny_config(captioning_teacher, f"cache.path={tmp_path / 'cache'}", "cache.mode=require")
    with pytest.raises(ConfigError, match=refused):
        plan_student_run(cfg, None, load_teacher(str(captioning_teacher)), tmp_path / "student")  # decided before data
    args = ["cache", TINY, "--quiet", "--set", f"teacher.path={captioning_teacher}", "--out", str(tmp_path / "cache")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert f"teacher {captioning_teacher} is a captioning model (BlipCaptioner): the teacher cache cannot hold" in error
    assert "decoder_cross_attentions" in error and "token_logits" in error and "leave cache.path unset" in error
    assert not (tmp_path / "cache").exists()


def test_accumulated_micro_batches_train_a_captioner_as_the_whole_batch_does():
    """Two micro-batches of 4 (each padded to its own longest caption) take the step one batch of 8 takes:
    the caption and layer-wise losses average over the whole window's tokens."""
    tokenizer = bert_word_tokenizer()
    teacher = tiny_captioner(tokenizer, seed=0)
    losses = {"lm": {}, "lm_kd": {}, "hidden": {"towers": ["vision", "decoder"]}, "cross_attention": {"modules": ["decoder"]}}
    whole = caption_batch(tokenizer, 8)
    data = make_split("test", 8, seed=0, image_size=IMAGE_SIZE)
    tokenize = make_tokenize(tokenizer, TEXT_LENGTH)
    halves = [{"pixel_values": to_pixel_values(data.images[i : i + 4]), **tokenize(data.captions[i : i + 4])} for i in (0, 4)]
    assert halves[0]["input_ids"].shape[1] != halves[1]["input_ids"].shape[1]  # padded differently
    runs = []
    for accumulation, batches in ((1, [whole] * 2), (2, halves * 2)):
        student = build_student_captioner(teacher, vision=TowerSpec(1, 16, 1, 2.0), decoder=SMALL, seed=1)
        context = LossContext(16, student_spec=student.architecture_spec(), teacher_spec=teacher.architecture_spec())
        optim = OptimConfig(steps=2, batch_size=8, accumulation_steps=accumulation, lr=1e-2, warmup_steps=0, log_every=1)
        result = train(student, build_objective(losses, context), batches, optim, teacher=teacher, progress=False)
        runs.append((result.history, student.model.state_dict()))
    (whole_log, whole_state), (split_log, split_state) = runs
    for a, b in zip(whole_log, split_log):
        assert {k: v for k, v in b.items() if k.startswith("loss/")} == pytest.approx(
            {k: v for k, v in a.items() if k.startswith("loss/")}, rel=1e-5, abs=1e-8)
    for key, value in whole_state.items():
        torch.testing.assert_close(split_state[key], value, atol=1e-5, rtol=1e-4)


def test_an_evaluated_caption_run_scores_both_captioners_side_by_side(caption_run, captioning_teacher, tmp_path):
    from vldistill.distill_run import summarize_distill
    from vldistill.eval.results import read_result
    from vldistill.trained import TrainedModel

    cfg = tiny_config(captioning_teacher, "data.train_size=32", "data.val_size=8", "data.test_size=8")
    teacher = load_teacher(str(captioning_teacher))
    student_model, tokenizer = load_dual_encoder_any(caption_run / "student")
    out = tmp_path / "run"
    shutil.copytree(caption_run / "student", out / "student")
    student = TrainedModel(student_model, tokenizer, out / "student", None)
    summary = summarize_distill(cfg, load_data(cfg.data, progress=False), teacher, student, out, progress=False)
    models = summary["models"]
    assert set(models) == {"teacher", "student"}
    for name in models:
        record = read_result(out / "results" / f"{name}_captioning.json")
        assert models[name]["cider"] == pytest.approx(record["metrics"]["cider"])
        assert models[name]["bleu4"] == pytest.approx(record["metrics"]["bleu4"]) and models[name]["captions_per_second"] > 0
    teacher_cider = models["teacher"]["cider"]
    expected = 100 * models["student"]["cider"] / teacher_cider if teacher_cider else None
    if expected is not None:
        assert summary["student_retention_percent"]["cider"] == pytest.approx(expected)
    assert summary["compression"] == pytest.approx(models["teacher"]["params"] / models["student"]["params"])
    assert summary["compression"] > 1
    assert summary["caption_speedup"]["p25"] <= summary["caption_speedup"]["median"] <= summary["caption_speedup"]["p75"]
    assert "cider" in (out / "student" / "README.md").read_text().lower()
    assert json.loads((out / "summary.json").read_text())["models"]["student"]["cider"] == models["student"]["cider"]
