"""The layer-wise losses on BLIP's fusion encoder and captioning decoder (`hidden` / `attention` with
towers fusion / decoder) and `cross_attention`, each against explicit loops over hand-built Signals; what
they need per selected module; the errors naming the key; and on real tiny BLIP models."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import tiny_blip
from torch import nn
from transformers import BlipForConditionalGeneration

from vldistill.losses import LOSSES, LossContext, build_objective, parse_loss_specs
from vldistill.losses.base import ATTENTIONS, HIDDEN_STATES
from vldistill.losses.schedules import WeightingConfig
from vldistill.models.blip_caption import BlipCaptioner, blip_token_settings, captioner_config
from vldistill.models.signals import Signals, request_flags
from vldistill.models.spec import DualEncoderSpec, TowerSpec
from vldistill.teachers.cache.cached import cache_blockers

B, N_TEXT, N_IMAGE = 3, 4, 5
TEXT_LENGTHS = [4, 2, 3]  # real tokens per caption; the rest is padding
F64 = torch.float64
VISION, TEXT = TowerSpec(layers=1, width=4, heads=2, patch_size=8), TowerSpec(layers=1, width=4, heads=2)
S_SPEC = DualEncoderSpec(
    vision=VISION, text=TEXT, fusion=TowerSpec(layers=2, width=4, heads=2), decoder=TowerSpec(layers=2, width=4, heads=2)
)
T_SPEC = DualEncoderSpec(
    vision=VISION, text=TEXT, fusion=TowerSpec(layers=4, width=6, heads=3), decoder=TowerSpec(layers=3, width=6, heads=3)
)
MODULES = ("fusion", "decoder")


def context(student: DualEncoderSpec = S_SPEC, teacher: DualEncoderSpec = T_SPEC) -> LossContext:
    return LossContext(4, 6, student_spec=student, teacher_spec=teacher)


def objective_for(name: str, student: DualEncoderSpec = S_SPEC, teacher: DualEncoderSpec = T_SPEC, **params):
    objective = build_objective({name: params}, context(student, teacher)).double()
    return objective, objective.losses[name]


def module_signals(spec: DualEncoderSpec, *, requires_grad: bool = False, image_tokens: int = N_IMAGE) -> Signals:
    """float64 leaf hidden states, self- and cross-attention maps of the fusion encoder and the decoder."""
    values = {}
    for module in MODULES:
        tower = getattr(spec, module)
        values[f"{module}_hidden_states"] = tuple(
            torch.randn(B, N_TEXT, tower.width, dtype=F64).requires_grad_(requires_grad) for _ in range(tower.layers + 1)
        )
        values[f"{module}_attentions"] = tuple(
            torch.softmax(torch.randn(B, tower.heads, N_TEXT, N_TEXT, dtype=F64), -1).requires_grad_(requires_grad)
            for _ in range(tower.layers)
        )
        values[f"{module}_cross_attentions"] = tuple(
            torch.softmax(torch.randn(B, tower.heads, N_TEXT, image_tokens, dtype=F64), -1).requires_grad_(requires_grad)
            for _ in range(tower.layers)
        )
    mask = (torch.arange(N_TEXT)[None] < torch.tensor(TEXT_LENGTHS)[:, None]).long()
    return Signals(text_attention_mask=mask, **values)


def perturb_padding(out: Signals) -> Signals:
    """A copy whose module signals differ only at padded text tokens (rows, and keys of self-attention)."""
    pad = out.text_attention_mask == 0  # (B, N_TEXT)
    changes = {}
    for module in MODULES:
        changes[f"{module}_hidden_states"] = tuple(
            torch.where(pad[..., None], s + 5.0, s) for s in out[f"{module}_hidden_states"]
        )
        self_pairs = pad[:, None, :, None] | pad[:, None, None, :]
        changes[f"{module}_attentions"] = tuple(
            torch.where(self_pairs, torch.rand_like(m), m) for m in out[f"{module}_attentions"]
        )
        changes[f"{module}_cross_attentions"] = tuple(
            torch.where(pad[:, None, :, None], torch.rand_like(m), m) for m in out[f"{module}_cross_attentions"]
        )
    return out.replace(**changes)


# ---------------------------------------------------------------- references, written with explicit loops


def hidden_reference(student: Signals, teacher: Signals, loss, module: str) -> float:
    s_states, t_states = student[f"{module}_hidden_states"], teacher[f"{module}_hidden_states"]
    values = []
    for (s_layer, t_layer), layer_map in zip(loss.layer_pairs[module], loss.maps[module]):
        w = layer_map.weight.detach() if isinstance(layer_map, nn.Linear) else None
        s, t = s_states[s_layer].detach(), t_states[t_layer].detach()
        total, count = 0.0, 0
        for b in range(B):
            for n in range(TEXT_LENGTHS[b]):
                mapped = s[b, n] if w is None else w @ s[b, n]
                total += sum((float(x) - float(y)) ** 2 for x, y in zip(mapped, t[b, n]))
                count += t.shape[-1]
        values.append(total / count)
    return sum(values) / len(values)


def map_reference(student, teacher, pairs, distance: str, heads: str, self_attention: bool) -> float:
    """Per mapped layer: KL(t || s) per real text row summed over keys (real text tokens for self-attention,
    every image token for cross-attention) and averaged over rows and heads, or the squared error averaged
    over (row, key) entries and heads; mean over layers."""
    values = []
    for s_layer, t_layer in pairs:
        s, t = student[s_layer - 1].detach(), teacher[t_layer - 1].detach()
        if heads == "average":
            s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
        total, count = 0.0, 0
        for b in range(B):
            keys = TEXT_LENGTHS[b] if self_attention else s.shape[-1]
            for h in range(s.shape[1]):
                for q in range(TEXT_LENGTHS[b]):
                    if distance == "kl":
                        total += sum(float(t[b, h, q, k]) * math.log(float(t[b, h, q, k] / s[b, h, q, k])) for k in range(keys))
                        count += 1
                    else:
                        total += sum(float(t[b, h, q, k] - s[b, h, q, k]) ** 2 for k in range(keys))
                        count += keys
        values.append(total / count)
    return sum(values) / len(values)


# ---------------------------------------------------------------- hidden / attention on fusion and decoder


def test_hidden_on_fusion_and_decoder_matches_explicit_loops() -> None:
    objective, hidden = objective_for("hidden", towers=["fusion", "decoder"])
    assert hidden.layer_pairs == {"fusion": [(1, 2), (2, 4)], "decoder": [(1, 2), (2, 3)]}
    student, teacher = module_signals(S_SPEC, requires_grad=True), module_signals(T_SPEC, requires_grad=True)
    loss, parts = objective(student, teacher)
    expected = {m: hidden_reference(student, teacher, hidden, m) for m in MODULES}
    for module in MODULES:
        assert parts[f"part/hidden_{module}"].item() == pytest.approx(expected[module], rel=1e-10)
    assert loss.item() == pytest.approx(sum(expected.values()) / 2, rel=1e-10)
    loss.backward()
    assert student.fusion_hidden_states[4 // 2].grad.abs().sum() > 0 and student.decoder_hidden_states[1].grad is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.parameters())
    assert all(s.grad is None for s in teacher.fusion_hidden_states + teacher.decoder_hidden_states)


@pytest.mark.parametrize(("distance", "heads"), [("kl", "average"), ("mse", "average"), ("kl", "match")])
def test_attention_on_fusion_and_decoder_matches_explicit_loops(distance: str, heads: str) -> None:
    teacher_spec = S_SPEC if heads == "match" else T_SPEC
    objective, attention = objective_for(
        "attention", teacher=teacher_spec, towers=["fusion", "decoder"], distance=distance, heads=heads
    )
    student, teacher = module_signals(S_SPEC, requires_grad=True), module_signals(teacher_spec)
    loss, parts = objective(student, teacher)
    for module in MODULES:
        expected = map_reference(
            student[f"{module}_attentions"], teacher[f"{module}_attentions"], attention.layer_pairs[module],
            distance, heads, self_attention=True,
        )
        assert parts[f"part/attention_{module}"].item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert student.decoder_attentions[1].grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["hidden", "attention", "cross_attention"])
def test_padded_text_tokens_are_left_out(name: str) -> None:
    key = "modules" if name == "cross_attention" else "towers"
    objective, _ = objective_for(name, **{key: ["fusion", "decoder"]})
    student, teacher = module_signals(S_SPEC), module_signals(T_SPEC)
    loss = objective(student, teacher)[0].item()
    assert objective(perturb_padding(student), perturb_padding(teacher))[0].item() == pytest.approx(loss, rel=1e-12)
    # a real token does count
    changed = student.replace(fusion_hidden_states=tuple(s + 1.0 for s in student.fusion_hidden_states),
                              fusion_attentions=tuple(m.flip(-1) for m in student.fusion_attentions),
                              fusion_cross_attentions=tuple(m.flip(-1) for m in student.fusion_cross_attentions))
    assert objective(changed, teacher)[0].item() != pytest.approx(loss, rel=1e-6)


# ---------------------------------------------------------------- cross_attention


@pytest.mark.parametrize(("distance", "heads"), [("kl", "average"), ("mse", "average"), ("kl", "match"), ("mse", "match")])
def test_cross_attention_matches_explicit_loops(distance: str, heads: str) -> None:
    teacher_spec = S_SPEC if heads == "match" else T_SPEC
    objective, loss_module = objective_for(
        "cross_attention", teacher=teacher_spec, modules=["fusion", "decoder"], distance=distance, heads=heads
    )
    assert list(objective.parameters()) == []
    student, teacher = module_signals(S_SPEC, requires_grad=True), module_signals(teacher_spec, requires_grad=True)
    loss, parts = objective(student, teacher)
    expected = {
        module: map_reference(
            student[f"{module}_cross_attentions"], teacher[f"{module}_cross_attentions"],
            loss_module.layer_pairs[module], distance, heads, self_attention=False,
        )
        for module in MODULES
    }
    for module in MODULES:
        assert parts[f"part/cross_attention_{module}"].item() == pytest.approx(expected[module], rel=1e-10)
    assert loss.item() == pytest.approx(sum(expected.values()) / 2, rel=1e-10)
    loss.backward()
    assert student.fusion_cross_attentions[0].grad.abs().sum() > 0
    assert student.decoder_cross_attentions[1].grad.abs().sum() > 0
    assert all(m.grad is None for m in teacher.fusion_cross_attentions + teacher.decoder_cross_attentions)


def test_cross_attention_hand_worked() -> None:
    """One layer, one real text token per caption over 2 image tokens: teacher (1/2, 1/2), student
    (1/4, 3/4) gives KL = (1/2) ln 2 + (1/2) ln(2/3) and MSE = (1/16 + 1/16) / 2; a padded token's row
    (here the student's (1, 0), which would give an infinite KL) is left out."""
    one = TowerSpec(layers=1, width=4, heads=1)
    spec = DualEncoderSpec(vision=VISION, text=TEXT, fusion=one)

    def signals(real_row, padded_row) -> Signals:
        maps = torch.tensor([[[real_row, padded_row]]], dtype=F64).expand(B, 1, 2, 2)
        return Signals(fusion_cross_attentions=(maps,), text_attention_mask=torch.tensor([[1, 0]] * B))

    student, teacher = signals([0.25, 0.75], [1.0, 0.0]), signals([0.5, 0.5], [0.5, 0.5])
    kl = build_objective({"cross_attention": {}}, context(spec, spec))(student, teacher)[0].item()
    assert kl == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12)
    mse = build_objective({"cross_attention": {"distance": "mse"}}, context(spec, spec))(student, teacher)[0].item()
    assert mse == pytest.approx(0.0625, rel=1e-12)


def test_cross_attention_needs_equal_image_token_counts() -> None:
    """Another patch size is fine when the patch grid is the same (same token count); else an error."""
    objective, _ = objective_for("cross_attention")
    student, teacher = module_signals(S_SPEC), module_signals(T_SPEC)
    assert torch.isfinite(objective(student, teacher)[0])
    with pytest.raises(ValueError, match=r"losses\.cross_attention: the student's fusion attends over 17 image tokens.*5.*patch grids"):
        objective(module_signals(S_SPEC, image_tokens=17), teacher)


# ---------------------------------------------------------------- what they need, errors


def test_needs_name_exactly_the_selected_modules_signals() -> None:
    # class level: the default options (what the sweep's and the cache's class-level checks read)
    assert LOSSES.get("hidden").needs == HIDDEN_STATES and LOSSES.get("attention").needs == ATTENTIONS
    assert LOSSES.get("cross_attention").needs == {"fusion_cross_attentions", "text_attention_mask"}
    cases = [
        ("hidden", {"towers": ["fusion"]}, {"fusion_hidden_states", "text_attention_mask"}),
        ("hidden", {"towers": ["vision"]}, {"image_hidden_states"}),
        ("hidden", {}, HIDDEN_STATES),
        ("attention", {"towers": ["vision", "decoder"]}, {"image_attentions", "decoder_attentions", "text_attention_mask"}),
        ("cross_attention", {"modules": ["decoder"]}, {"decoder_cross_attentions", "text_attention_mask"}),
        ("cross_attention", {"modules": ["decoder", "fusion"]},
         {"decoder_cross_attentions", "fusion_cross_attentions", "text_attention_mask"}),
    ]
    for name, params, expected in cases:
        assert parse_loss_specs({name: params})[0].needs == expected, (name, params)
        both = DualEncoderSpec(vision=VISION, text=TEXT, fusion=S_SPEC.fusion, decoder=S_SPEC.decoder)
        assert build_objective({name: params}, context(both, both)).needs == expected, (name, params)
    assert request_flags(parse_loss_specs({"cross_attention": {}})[0].needs) == {"output_attentions": True}
    # the cache cannot hold layer-wise maps: it names the selected module's signal
    (reason,) = cache_blockers(parse_loss_specs({"hidden": {"towers": ["decoder"]}}), WeightingConfig())
    assert "distill.losses.hidden needs the teacher's decoder_hidden_states" in reason


def bad_params() -> list[tuple[str, dict, str]]:
    return [
        ("hidden", {"towers": ["fusion", "audio"]}, "losses.hidden.towers"),
        ("attention", {"towers": ["decoder", "decoder"]}, "losses.attention.towers"),
        ("cross_attention", {"modules": ["text"]}, "losses.cross_attention.modules"),
        ("cross_attention", {"modules": []}, "losses.cross_attention.modules"),
        ("cross_attention", {"modules": "fusion"}, "losses.cross_attention.modules"),
        ("cross_attention", {"towers": ["fusion"]}, "losses.cross_attention.towers"),
        ("cross_attention", {"layer_map": "first"}, "losses.cross_attention.layer_map"),
        ("cross_attention", {"layer_map": [1, 2, 3]}, "losses.cross_attention.layer_map"),  # 2 student layers
        ("cross_attention", {"layer_map": [1, 5]}, "losses.cross_attention.layer_map"),  # the teacher has 4
        ("cross_attention", {"distance": "l1"}, "losses.cross_attention.distance"),
        ("cross_attention", {"heads": "sum"}, "losses.cross_attention.heads"),
        ("cross_attention", {"heads": "match"}, "losses.cross_attention.heads"),  # 2 vs 3 heads
        ("attention", {"towers": ["decoder"], "heads": "match"}, "losses.attention.heads"),
    ]


@pytest.mark.parametrize(("name", "params", "key"), bad_params())
def test_bad_params_raise_naming_the_key(name: str, params: dict, key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key)):
        build_objective({name: params}, context())


@pytest.mark.parametrize(("name", "key"), [("hidden", "towers"), ("attention", "towers"), ("cross_attention", "modules")])
def test_a_module_a_model_lacks_is_an_error_naming_the_key(name: str, key: str) -> None:
    dual_encoder = DualEncoderSpec(vision=VISION, text=TEXT)  # a CLIP: no fusion, no decoder
    with pytest.raises(ValueError, match=rf"losses\.{name}\.{key} includes fusion, but the student model has no fusion"):
        build_objective({name: {key: ["fusion"]}}, context(dual_encoder, T_SPEC))
    retrieval = DualEncoderSpec(vision=VISION, text=TEXT, fusion=T_SPEC.fusion)  # BLIP retrieval: no decoder
    with pytest.raises(ValueError, match=rf"losses\.{name}\.{key} includes decoder, but the teacher model has no decoder"):
        build_objective({name: {key: ["decoder"]}}, context(S_SPEC, retrieval))


def test_missing_signals_say_which_flag_to_set() -> None:
    student, teacher = module_signals(S_SPEC), module_signals(T_SPEC)
    cases = [
        ("hidden", {"towers": ["decoder"]}, "decoder_hidden_states", r"student's decoder hidden_states; run it with output_hidden_states=True"),
        ("attention", {"towers": ["fusion"]}, "fusion_attentions", r"student's fusion attentions; run it with output_attentions=True"),
        ("cross_attention", {}, "fusion_cross_attentions", r"student's fusion cross_attentions; run it with output_attentions=True"),
    ]
    for name, params, signal, message in cases:
        objective, _ = objective_for(name, **params)
        missing = Signals(**{k: v for k, v in student.items() if k != signal})
        with pytest.raises(ValueError, match=message):
            objective(missing, teacher)


def test_the_spec_validates_its_optional_modules() -> None:
    with pytest.raises(ValueError, match=r"student\.fusion\.width \(5\) must be divisible by student\.fusion\.heads"):
        DualEncoderSpec(fusion=TowerSpec(layers=1, width=5, heads=2)).validate("student")
    with pytest.raises(ValueError, match=r"student\.decoder\.patch_size is not allowed"):
        DualEncoderSpec(decoder=TowerSpec(patch_size=8)).validate("student")
    DualEncoderSpec(fusion=TowerSpec(), decoder=TowerSpec()).validate("student")


# ---------------------------------------------------------------- on real tiny BLIP models


def test_fusion_losses_on_a_real_blip_retrieval_model(tokenizer, make_batch) -> None:
    """A retrieval model's fusion spec is its text encoder's; the losses run on its real signals (captions of
    different lengths) and the student's cross-attention gets gradients."""
    teacher, student = tiny_blip(tokenizer, seed=0), tiny_blip(tokenizer, seed=1).train()
    spec = teacher.architecture_spec()
    assert spec.fusion == spec.text == TowerSpec(layers=2, width=32, heads=2, mlp_ratio=4.0) and spec.decoder is None
    losses = {"hidden": {"towers": ["fusion"]}, "attention": {"towers": ["fusion"]}, "cross_attention": {}}
    objective = build_objective(losses, LossContext(32, 32, student_spec=student.architecture_spec(), teacher_spec=spec))
    flags = request_flags(objective.needs)
    assert flags == {"output_attentions": True, "output_hidden_states": True}
    batch = {k: v for k, v in make_batch(4, split="train").items() if k in ("pixel_values", "input_ids", "attention_mask")}
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        t_out = teacher(**batch, **flags)
    loss, parts = objective(student(**batch, **flags), t_out)
    assert torch.isfinite(loss) and parts["part/cross_attention_fusion"] > 0
    loss.backward()
    cross = student.model.text_encoder.encoder.layer[0].crossattention.self.query.weight
    assert cross.grad is not None and cross.grad.abs().sum() > 0


def test_decoder_losses_on_a_real_blip_captioner(tokenizer, make_batch) -> None:
    """A captioner reports its decoder's spec; cross_attention and hidden on the decoder run on its signals."""
    def captioner(layers: int, width: int, seed: int) -> BlipCaptioner:
        decoder = TowerSpec(layers=layers, width=width, heads=2, mlp_ratio=2.0)
        config = captioner_config(
            blip_token_settings(tokenizer), image_size=16, vision=TowerSpec(layers=1, width=16, heads=2, patch_size=8),
            decoder=decoder, max_text_length=32,
        )
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
        with torch.no_grad():  # BLIP's vision init (std 1e-10) would give every image token the same state
            for name, weight in model.vision_model.named_parameters():
                if weight.dim() > 1:
                    weight.normal_(0.0, 0.02)
        return BlipCaptioner(model, tokenizer)

    teacher, student = captioner(2, 32, 0).eval(), captioner(1, 16, 1)
    assert teacher.architecture_spec().decoder == TowerSpec(layers=2, width=32, heads=2, mlp_ratio=2.0)
    assert teacher.architecture_spec().fusion is None
    losses = {"hidden": {"towers": ["decoder"], "layer_map": "last"}, "cross_attention": {"modules": ["decoder"]}}
    context = LossContext(32, 32, student_spec=student.architecture_spec(), teacher_spec=teacher.architecture_spec())
    objective = build_objective(losses, context)
    assert objective.losses["hidden"].layer_pairs == {"decoder": [(1, 2)]}
    flags = request_flags(objective.needs)
    batch = {k: v for k, v in make_batch(3, split="train").items() if k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        t_out = teacher(**batch, **flags)
    loss, parts = objective(student(**batch, **flags), t_out)
    assert torch.isfinite(loss) and parts["part/cross_attention_decoder"] > 0 and parts["part/hidden_decoder"] > 0
    loss.backward()
    assert student.model.text_decoder.bert.encoder.layer[0].crossattention.self.query.weight.grad.abs().sum() > 0
