"""Tests for vldistill.losses: every registered loss, each against an independent reference, and the objective."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import random_output
from torch import nn

from vldistill.losses import LOSSES, LossContext, build_objective
from vldistill.losses.base import ATTENTIONS, HIDDEN_STATES
from vldistill.models.signals import Signals
from vldistill.models.spec import DualEncoderSpec, TowerSpec

B, STUDENT_DIM, TEACHER_DIM = 5, 8, 12
# Towers for the layer-wise losses: the student shallower, narrower and with fewer heads.
STUDENT_SPEC = DualEncoderSpec(
    vision=TowerSpec(layers=2, width=16, heads=2, patch_size=8), text=TowerSpec(layers=2, width=16, heads=2),
    projection_dim=STUDENT_DIM, fusion=TowerSpec(layers=2, width=16, heads=2),
)
TEACHER_SPEC = DualEncoderSpec(
    vision=TowerSpec(layers=3, width=24, heads=3, patch_size=8), text=TowerSpec(layers=3, width=24, heads=3),
    projection_dim=TEACHER_DIM, fusion=TowerSpec(layers=3, width=24, heads=3),
)
TOKENS = {"image": 5, "text": 6}  # 16x16 images in 8x8 patches plus CLS; 6 text positions


def output(dim: int, scale: float, *, requires_grad: bool = False, dtype=torch.float32) -> Signals:
    """B random unit rows per tower (global RNG) and the logit scale."""
    return random_output(B, dim, scale, dtype=dtype, requires_grad=requires_grad)


def layered_output(dim: int, scale: float, spec: DualEncoderSpec, *, requires_grad: bool = False) -> Signals:
    """`output` plus random leaf hidden states and attention maps of `spec`'s shapes, and padded texts."""
    out = output(dim, scale, requires_grad=requires_grad)
    for prefix, tower in (("image", spec.vision), ("text", spec.text)):
        n = TOKENS[prefix]
        states = tuple(torch.randn(B, n, tower.width).requires_grad_(requires_grad) for _ in range(tower.layers + 1))
        maps = tuple(
            torch.softmax(torch.randn(B, tower.heads, n, n), dim=-1).requires_grad_(requires_grad)
            for _ in range(tower.layers)
        )
        out = out.replace(**{f"{prefix}_hidden_states": states, f"{prefix}_attentions": maps})
    out = out.replace(text_attention_mask=(torch.arange(TOKENS["text"]) < torch.tensor([[6], [5], [4], [3], [6]])).long())
    # BLIP signals (models/blip_signals.py): ITM logits of 3B pairs, and caption token logits over a 9-token
    # vocabulary with their labels (-100 at BOS and padding).
    labels = torch.randint(9, (B, TOKENS["text"])).masked_fill(out.text_attention_mask == 0, -100)
    labels[:, 0] = -100
    return out.replace(
        projected_image_embeds=torch.randn(B, TEACHER_DIM).requires_grad_(requires_grad),  # a prompted student's projector
        itm_logits=torch.randn(3 * B, 2).requires_grad_(requires_grad),
        itm_negatives=torch.stack([torch.arange(1, B + 1) % B, torch.arange(2, B + 2) % B]),
        token_logits=torch.randn(B, TOKENS["text"], 9).requires_grad_(requires_grad),
        caption_labels=labels,
        fusion_cross_attentions=tuple(  # BLIP's fusion encoder: text tokens attending to the image tokens
            torch.softmax(torch.randn(B, spec.fusion.heads, TOKENS["text"], TOKENS["image"]), dim=-1).requires_grad_(requires_grad)
            for _ in range(spec.fusion.layers)
        ),
        # region signals (models/regions.py): 6 regions labelled among 7 base classes, 7 = background, -1 = none
        region_embeds=torch.nn.functional.normalize(torch.randn(6, TEACHER_DIM), dim=-1).requires_grad_(requires_grad),
        region_labels=torch.tensor([0, 3, 6, 7, 7, -1]),
        region_background=torch.nn.functional.normalize(torch.randn(TEACHER_DIM), dim=0).requires_grad_(requires_grad),
        region_crop_embeds=torch.nn.functional.normalize(torch.randn(6, TEACHER_DIM), dim=-1).requires_grad_(requires_grad),
    )


def student_tensors_read(needs: frozenset[str], student: Signals) -> list[torch.Tensor]:
    """Student tensors a loss with these `needs` (and student needs) must send gradients to (the last layer is
    always mapped)."""
    if "projected_image_embeds" in needs:
        return [student.projected_image_embeds]
    if "region_embeds" in needs:
        return [student.region_embeds, *([student.region_background] if "region_background" in needs else [])]
    blip = [name for name in ("itm_logits", "token_logits") if name in needs]
    if blip:
        return [student[name] for name in blip]
    if needs == HIDDEN_STATES:
        return [student.image_hidden_states[-1], student.text_hidden_states[-1]]
    if needs == ATTENTIONS:
        return [student.image_attentions[-1], student.text_attentions[-1]]
    if "fusion_cross_attentions" in needs:
        return [student.fusion_cross_attentions[-1]]
    return [student.image_embeds, student.text_embeds]


def all_tensors(out: Signals) -> list[torch.Tensor]:
    return [
        out.image_embeds, out.text_embeds, out.logit_scale,
        *out.image_hidden_states, *out.text_hidden_states, *out.image_attentions, *out.text_attentions,
        out.itm_logits, out.token_logits, *out.fusion_cross_attentions,
        out.region_embeds, out.region_background, out.region_crop_embeds,
    ]


# ---------------------------------------------------------------- references, written another way


def clip_reference(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """Symmetric InfoNCE with explicit loops in float64: -log(exp(s_ii) / sum_j exp(s_ij))."""
    image, text = image.detach().double(), text.detach().double()
    n = image.shape[0]
    sim = [[scale * float(image[i] @ text[j]) for j in range(n)] for i in range(n)]
    i2t = sum(-math.log(math.exp(sim[i][i]) / sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)) / n
    t2i = sum(-math.log(math.exp(sim[i][i]) / sum(math.exp(sim[j][i]) for j in range(n))) for i in range(n)) / n
    return (i2t + t2i) / 2


def kd_reference(student: Signals, teacher: Signals, temperature: float) -> float:
    """Hinton KD with explicit probabilities, each model with its own logit scale, both directions."""

    def logits(out: Signals) -> torch.Tensor:
        return float(out.logit_scale) * out.image_embeds.detach().double() @ out.text_embeds.detach().double().t()

    def kl(s: torch.Tensor, t: torch.Tensor) -> float:
        p_s = torch.exp(s / temperature) / torch.exp(s / temperature).sum(dim=1, keepdim=True)
        p_t = torch.exp(t / temperature) / torch.exp(t / temperature).sum(dim=1, keepdim=True)
        return float((p_t * (p_t.log() - p_s.log())).sum() / s.shape[0] * temperature**2)

    s, t = logits(student), logits(teacher)
    return (kl(s, t) + kl(s.t(), t.t())) / 2


def cosine_by_hand(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.detach().double(), b.detach().double()
    return (a * b).sum(-1) / (a.pow(2).sum(-1).sqrt() * b.pow(2).sum(-1).sqrt())


# ---------------------------------------------------------------- every registered loss


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_gives_finite_scalar_and_student_gradients(name: str) -> None:
    classes = torch.nn.functional.normalize(torch.randn(7, TEACHER_DIM), dim=-1)  # class_kd's stored class names
    context = LossContext(
        STUDENT_DIM, TEACHER_DIM, student_spec=STUDENT_SPEC, teacher_spec=TEACHER_SPEC, class_embeddings=classes
    )
    objective = build_objective({name: {}}, context)
    student = layered_output(STUDENT_DIM, 10.0, STUDENT_SPEC, requires_grad=True)
    teacher = layered_output(TEACHER_DIM, 20.0, TEACHER_SPEC, requires_grad=True)  # must still receive no gradient

    loss, parts = objective(student, teacher)

    assert loss.ndim == 0 and torch.isfinite(loss)
    assert parts["loss/total"] == pytest.approx(loss.item())
    assert all(torch.isfinite(v) and not v.requires_grad for v in parts.values())
    loss.backward()
    for tensor in student_tensors_read(objective.needs | objective.student_needs, student):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    assert all(tensor.grad is None for tensor in all_tensors(teacher))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in objective.parameters())


# ---------------------------------------------------------------- clip


def test_clip_loss_matches_explicit_infonce() -> None:
    objective = build_objective({"clip": {}}, LossContext(STUDENT_DIM))
    student = output(STUDENT_DIM, 7.5, dtype=torch.float64)
    loss, parts = objective(student, None)  # a task loss needs no teacher
    assert loss.item() == pytest.approx(clip_reference(student.image_embeds, student.text_embeds, 7.5), rel=1e-10)
    assert parts["part/clip"].item() == pytest.approx(loss.item())


def test_clip_loss_is_asymmetric_in_its_two_directions_but_averages_them() -> None:
    """Swapping images and texts transposes the logits; the symmetric loss must not change."""
    objective = build_objective({"clip": {}}, LossContext(STUDENT_DIM))
    student = output(STUDENT_DIM, 5.0, dtype=torch.float64)
    swapped = Signals(image_embeds=student.text_embeds, text_embeds=student.image_embeds, logit_scale=student.logit_scale)
    assert objective(student, None)[0].item() == pytest.approx(objective(swapped, None)[0].item(), rel=1e-12)


# ---------------------------------------------------------------- kd


@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_kd_matches_explicit_probabilities(temperature: float) -> None:
    objective = build_objective({"kd": {"temperature": temperature}}, LossContext(STUDENT_DIM, TEACHER_DIM))
    student = output(STUDENT_DIM, 10.0, dtype=torch.float64)
    teacher = output(TEACHER_DIM, 30.0, dtype=torch.float64)
    loss, parts = objective(student, teacher)
    assert loss.item() == pytest.approx(kd_reference(student, teacher, temperature), rel=1e-9)
    assert loss.item() > 0
    assert (parts["part/kd_i2t"] + parts["part/kd_t2i"]).item() / 2 == pytest.approx(loss.item())


def test_kd_is_zero_for_identical_logits() -> None:
    objective = build_objective({"kd": {"temperature": 3.0}}, LossContext(STUDENT_DIM, STUDENT_DIM))
    student = output(STUDENT_DIM, 12.0)
    teacher = Signals(image_embeds=student.image_embeds.clone(), text_embeds=student.text_embeds.clone(), logit_scale=torch.tensor(12.0))
    assert objective(student, teacher)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_kd_temperature_squared_factor() -> None:
    """softmax(L / T) = softmax((L / T) / 1), so loss(T, scales a, b) = T^2 * loss(1, scales a / T, b / T)."""
    t = 2.0
    student = output(STUDENT_DIM, 10.0, dtype=torch.float64)
    teacher = output(TEACHER_DIM, 25.0, dtype=torch.float64)
    scaled_student = Signals(image_embeds=student.image_embeds, text_embeds=student.text_embeds, logit_scale=student.logit_scale / t)
    scaled_teacher = Signals(image_embeds=teacher.image_embeds, text_embeds=teacher.text_embeds, logit_scale=teacher.logit_scale / t)
    context = LossContext(STUDENT_DIM, TEACHER_DIM)
    at_t = build_objective({"kd": {"temperature": t}}, context)(student, teacher)[0]
    at_1 = build_objective({"kd": {"temperature": 1.0}}, context)(scaled_student, scaled_teacher)[0]
    assert at_t.item() == pytest.approx(t**2 * at_1.item(), rel=1e-10)
    assert at_t.item() != pytest.approx(at_1.item(), rel=1e-3)  # the factor is really there


def test_kd_uses_each_models_own_logit_scale() -> None:
    objective = build_objective({"kd": {}}, LossContext(STUDENT_DIM, STUDENT_DIM))
    student = output(STUDENT_DIM, 10.0, dtype=torch.float64)
    same_embeds = lambda scale: Signals(  image_embeds=# noqa: E731
        student.image_embeds, text_embeds=student.text_embeds, logit_scale=torch.tensor(scale, dtype=torch.float64)
    )
    # Same embeddings, same scale: nothing to distill. Same embeddings, other teacher scale: a loss.
    assert objective(student, same_embeds(10.0))[0].item() == pytest.approx(0.0, abs=1e-12)
    sharper = objective(student, same_embeds(40.0))[0].item()
    assert sharper > 1e-3
    assert sharper == pytest.approx(kd_reference(student, same_embeds(40.0), 1.0), rel=1e-9)
    # Swapping which model has which scale changes the value (KL is not symmetric), so neither
    # scale is ignored or shared.
    swapped_student = Signals(image_embeds=student.image_embeds, text_embeds=student.text_embeds, logit_scale=torch.tensor(40.0, dtype=torch.float64))
    swapped = objective(swapped_student, same_embeds(10.0))[0].item()
    assert swapped == pytest.approx(kd_reference(swapped_student, same_embeds(10.0), 1.0), rel=1e-9)
    assert swapped != pytest.approx(sharper, rel=1e-3)


def test_kd_student_logit_scale_receives_gradient() -> None:
    objective = build_objective({"kd": {}}, LossContext(STUDENT_DIM, TEACHER_DIM))
    student = output(STUDENT_DIM, 10.0)
    student.logit_scale.requires_grad_(True)
    teacher = output(TEACHER_DIM, 20.0)
    teacher.logit_scale.requires_grad_(True)
    objective(student, teacher)[0].backward()
    assert student.logit_scale.grad is not None and student.logit_scale.grad != 0
    assert teacher.logit_scale.grad is None


# ---------------------------------------------------------------- feature


def test_feature_cosine_with_equal_dims_is_one_minus_mean_cosine() -> None:
    objective = build_objective({"feature": {"distance": "cosine"}}, LossContext(STUDENT_DIM, STUDENT_DIM))
    feature = objective.losses["feature"]
    assert isinstance(feature.image_projection, nn.Identity) and isinstance(feature.text_projection, nn.Identity)
    assert list(objective.parameters()) == []
    student, teacher = output(STUDENT_DIM, 10.0), output(STUDENT_DIM, 10.0)
    loss, parts = objective(student, teacher)
    image = 1 - cosine_by_hand(student.image_embeds, teacher.image_embeds).mean().item()
    text = 1 - cosine_by_hand(student.text_embeds, teacher.text_embeds).mean().item()
    assert parts["part/feature_image"].item() == pytest.approx(image, abs=1e-6)
    assert parts["part/feature_text"].item() == pytest.approx(text, abs=1e-6)
    assert loss.item() == pytest.approx((image + text) / 2, abs=1e-6)


def test_feature_mse_is_mean_squared_norm_of_difference() -> None:
    context = LossContext(STUDENT_DIM, STUDENT_DIM)
    mse = build_objective({"feature": {"distance": "mse"}}, context)
    student, teacher = output(STUDENT_DIM, 10.0), output(STUDENT_DIM, 10.0)
    loss, parts = mse(student, teacher)
    image = (student.image_embeds - teacher.image_embeds).double().norm(dim=-1).pow(2).mean().item()
    text = (student.text_embeds - teacher.text_embeds).double().norm(dim=-1).pow(2).mean().item()
    assert parts["part/feature_image"].item() == pytest.approx(image, rel=1e-5)
    assert loss.item() == pytest.approx((image + text) / 2, rel=1e-5)
    # On unit vectors |a - b|^2 = 2 (1 - cos): the two distances agree up to the factor 2.
    cosine = build_objective({"feature": {"distance": "cosine"}}, context)(student, teacher)[0]
    assert loss.item() == pytest.approx(2 * cosine.item(), rel=1e-5)


def test_feature_normalizes_the_student_but_is_zero_for_a_scaled_copy() -> None:
    objective = build_objective({"feature": {}}, LossContext(STUDENT_DIM, STUDENT_DIM))
    teacher = output(STUDENT_DIM, 10.0)
    student = Signals(image_embeds=3.0 * teacher.image_embeds, text_embeds=0.5 * teacher.text_embeds, logit_scale=torch.tensor(1.0))
    assert objective(student, teacher)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_feature_with_different_dims_learns_a_linear_projection() -> None:
    objective = build_objective({"feature": {"distance": "cosine"}}, LossContext(STUDENT_DIM, TEACHER_DIM))
    feature = objective.losses["feature"]
    projections = (feature.image_projection, feature.text_projection)
    for projection in projections:
        assert isinstance(projection, nn.Linear)
        assert (projection.in_features, projection.out_features) == (STUDENT_DIM, TEACHER_DIM)
        assert projection.bias is None
    params = list(objective.parameters())
    assert len(params) == 2 and all(any(p is q.weight for p in params) for q in projections)
    assert set(objective.state_dict()) == {"losses.feature.image_projection.weight", "losses.feature.text_projection.weight"}

    student, teacher = output(STUDENT_DIM, 10.0, requires_grad=True), output(TEACHER_DIM, 10.0)
    loss, _ = objective(student, teacher)
    # Reference: normalize(W s), then 1 - cosine with the teacher.
    image_projected = student.image_embeds.detach().double() @ feature.image_projection.weight.detach().double().t()
    text_projected = student.text_embeds.detach().double() @ feature.text_projection.weight.detach().double().t()
    expected = (
        (1 - cosine_by_hand(image_projected, teacher.image_embeds).mean())
        + (1 - cosine_by_hand(text_projected, teacher.text_embeds).mean())
    ) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    for projection in projections:
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0


def test_feature_projection_is_trained_by_an_optimizer_on_objective_parameters() -> None:
    objective = build_objective({"feature": {}}, LossContext(STUDENT_DIM, TEACHER_DIM))
    student, teacher = output(STUDENT_DIM, 10.0), output(TEACHER_DIM, 10.0)
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.5)
    before = objective(student, teacher)[0].item()
    for _ in range(20):
        optimizer.zero_grad()
        objective(student, teacher)[0].backward()
        optimizer.step()
    assert objective(student, teacher)[0].item() < before


# ---------------------------------------------------------------- the objective


def test_objective_is_the_weighted_sum_of_its_losses() -> None:
    context = LossContext(STUDENT_DIM, TEACHER_DIM)
    objective = build_objective(
        {"clip": {"weight": 0.5}, "kd": {"weight": 2.0, "temperature": 2.0}, "feature": {"weight": 0.25, "distance": "mse"}},
        context,
    )
    assert objective.weights == {"clip": 0.5, "kd": 2.0, "feature": 0.25}
    student = output(STUDENT_DIM, 10.0, dtype=torch.float64)
    teacher = output(TEACHER_DIM, 20.0, dtype=torch.float64)
    objective.double()
    total, parts = objective(student, teacher)

    feature_alone = build_objective({"feature": {"distance": "mse"}}, context).double()
    feature_alone.load_state_dict(objective.state_dict(), strict=False)
    assert torch.equal(
        feature_alone.losses["feature"].image_projection.weight, objective.losses["feature"].image_projection.weight
    )
    clip = clip_reference(student.image_embeds, student.text_embeds, 10.0)
    kd = kd_reference(student, teacher, 2.0)
    feature = feature_alone(student, teacher)[0].item()

    assert total.item() == pytest.approx(0.5 * clip + 2.0 * kd + 0.25 * feature, rel=1e-9)
    assert parts["loss/clip"].item() == pytest.approx(clip, rel=1e-9)
    assert parts["loss/kd"].item() == pytest.approx(kd, rel=1e-9)
    assert parts["loss/feature"].item() == pytest.approx(feature, rel=1e-9)
    assert parts["loss/total"].item() == pytest.approx(total.item())
    assert {"part/clip", "part/kd_i2t", "part/kd_t2i", "part/feature_image", "part/feature_text"} <= set(parts)


def test_zero_weight_contributes_nothing() -> None:
    objective = build_objective({"clip": {"weight": 0}, "kd": {}}, LossContext(STUDENT_DIM, TEACHER_DIM))
    student, teacher = output(STUDENT_DIM, 10.0), output(TEACHER_DIM, 20.0)
    total, parts = objective(student, teacher)
    assert parts["loss/clip"].item() > 0
    assert total.item() == pytest.approx(parts["loss/kd"].item())


def test_objective_needs() -> None:
    context = LossContext(STUDENT_DIM, TEACHER_DIM)
    assert build_objective({"clip": {}}, context).needs == frozenset()
    embeddings = frozenset({"image_embeds", "text_embeds", "logit_scale"})
    assert build_objective({"kd": {}}, context).needs == embeddings
    assert build_objective({"feature": {}}, context).needs == embeddings
    assert build_objective({"clip": {}, "kd": {}}, context).needs == embeddings


def test_unknown_loss_lists_the_known_names() -> None:
    with pytest.raises(ValueError) as error:
        build_objective({"clip": {}, "nosuchloss": {}}, LossContext(STUDENT_DIM))
    message = str(error.value)
    assert "nosuchloss" in message
    assert ", ".join(LOSSES.names()) in message
    assert all(name in message for name in ("clip", "kd", "feature"))


def test_empty_losses_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        build_objective({}, LossContext(STUDENT_DIM))


@pytest.mark.parametrize("name", ["kd", "feature"])
def test_loss_needing_a_teacher_raises_without_one(name: str) -> None:
    objective = build_objective({"clip": {}, name: {}}, LossContext(STUDENT_DIM, STUDENT_DIM))
    with pytest.raises(ValueError, match=rf"{name}.*needs a teacher"):
        objective(output(STUDENT_DIM, 10.0), None)


@pytest.mark.parametrize(
    ("losses", "key"),
    [
        ({"kd": {"temperature": 0}}, "losses.kd.temperature"),
        ({"kd": {"temperature": -1.5}}, "losses.kd.temperature"),
        ({"kd": {"temprature": 2.0}}, "losses.kd.temprature"),
        ({"clip": {"temperature": 2.0}}, "losses.clip.temperature"),
        ({"feature": {"distance": "l1"}}, "losses.feature.distance"),
        ({"clip": {"weight": -1}}, "losses.clip.weight"),
        ({"clip": {"weight": True}}, "losses.clip.weight"),
        ({"kd": {"temperature": "hot"}}, "losses.kd.temperature"),
    ],
)
def test_bad_params_raise_naming_the_key(losses: dict, key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key)):
        build_objective(losses, LossContext(STUDENT_DIM, TEACHER_DIM))
