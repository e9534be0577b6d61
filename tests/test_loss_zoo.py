"""Tests for the added losses (siglip, affinity, icl, crd, hidden, attention), each against a reference
computed another way (explicit loops in float64, hand-worked tiny examples)."""

from __future__ import annotations

import math
import re
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from helpers import dual_output, model_inputs, random_output, unit_rows
from torch import nn
from transformers import CLIPModel

from vldistill.cli import main as cli_main
from vldistill.losses import LOSSES, LossContext, build_objective
from vldistill.models import CLIPDualEncoder, spec_from_clip_config, student_config_from_teacher
from vldistill.models.signals import Signals
from vldistill.models.spec import DualEncoderSpec, TowerSpec


B, S_DIM, T_DIM = 4, 6, 10
F64 = torch.float64


def embeddings(dim: int, scale: float, *, requires_grad: bool = False) -> Signals:
    """Random float64 normalized embeddings and a logit scale, all leaves."""
    return random_output(B, dim, scale, dtype=F64, requires_grad=requires_grad, scale_grad=requires_grad)


def objective_for(name: str, context: Optional[LossContext] = None, **params):
    """The float64 objective of one loss, and the loss module itself."""
    objective = build_objective({name: params}, context or LossContext(S_DIM, T_DIM)).double()
    return objective, objective.losses[name]


def assert_teacher_untouched(teacher: Signals) -> None:
    tensors = [teacher.image_embeds, teacher.text_embeds, teacher.logit_scale]
    for group in (teacher.image_hidden_states, teacher.text_hidden_states, teacher.image_attentions, teacher.text_attentions):
        tensors += list(group or ())
    assert all(t.grad is None for t in tensors)


def softmax_list(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def test_all_losses_are_registered_and_listed(capsys) -> None:
    expected = ["affinity", "attention", "class_kd", "clip", "crd", "cross_attention", "feature", "hidden", "icl", "itm", "itm_kd", "kd", "lm", "lm_kd", "region_image", "region_text", "siglip"]
    assert LOSSES.names() == expected
    assert cli_main(["list", "losses"]) == 0
    assert capsys.readouterr().out.split() == expected


# ---------------------------------------------------------------- siglip


def siglip_reference(out: Signals, bias: float) -> float:
    """-(1/B) sum_ij log sigmoid(z_ij (t x_i.y_j + b)) with explicit loops."""
    image, text, t = out.image_embeds.detach(), out.text_embeds.detach(), float(out.logit_scale.detach())
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-z * (t * dot(image[i], text[j]) + bias)))
    return total / n


def test_siglip_hand_worked_example() -> None:
    """Orthonormal pairs, t = 1, b = 0: logits 1 on the diagonal, 0 off it, so the loss is
    (1/2) (2 log(1 + e^-1) + 2 log 2)."""
    objective, _ = objective_for("siglip", init_bias=0.0)
    student = dual_output([[1, 0], [0, 1]], [[1, 0], [0, 1]], 1.0)
    loss, parts = objective(student, None)  # a task loss: no teacher
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)) + math.log(2), rel=1e-12)
    assert parts["part/siglip_bias"].item() == 0.0


@pytest.mark.parametrize("init_bias", [-10.0, -2.0, 1.5])
def test_siglip_matches_explicit_loops(init_bias: float) -> None:
    objective, siglip = objective_for("siglip", init_bias=init_bias)
    assert objective.needs == frozenset()
    student = embeddings(S_DIM, 10.0)
    assert objective(student, None)[0].item() == pytest.approx(siglip_reference(student, init_bias), rel=1e-10)


def test_siglip_bias_is_a_learnable_parameter_and_the_scale_gets_gradient() -> None:
    objective, siglip = objective_for("siglip")
    assert siglip.bias.item() == -10.0
    assert [name for name, _ in objective.named_parameters()] == ["losses.siglip.bias"]
    student, teacher = embeddings(S_DIM, 10.0, requires_grad=True), embeddings(T_DIM, 5.0, requires_grad=True)
    objective(student, teacher)[0].backward()
    assert_teacher_untouched(teacher)  # a task loss ignores any teacher
    assert siglip.bias.grad is not None and siglip.bias.grad.item() != 0
    assert student.logit_scale.grad is not None and student.image_embeds.grad.abs().sum() > 0
    # Descending on the bias lowers the loss.
    before = objective(student, None)[0].item()
    with torch.no_grad():
        siglip.bias -= 0.1 * siglip.bias.grad
    assert objective(student, None)[0].item() < before


# ---------------------------------------------------------------- affinity


def affinity_reference(student: Signals, teacher: Signals, temperature: float) -> float:
    """Soft cross-entropy of row softmaxes with explicit loops, both directions averaged."""

    def logits(out: Signals) -> list[list[float]]:
        image, text, t = out.image_embeds.detach(), out.text_embeds.detach(), float(out.logit_scale.detach())
        return [[t * dot(image[i], text[j]) / temperature for j in range(B)] for i in range(B)]

    def soft_ce(s: list[list[float]], t: list[list[float]]) -> float:
        rows = [-sum(p * math.log(q) for p, q in zip(softmax_list(tr), softmax_list(sr))) for sr, tr in zip(s, t)]
        return sum(rows) / len(rows)

    s, t = logits(student), logits(teacher)
    transpose = lambda m: [list(col) for col in zip(*m)]  # noqa: E731
    return (soft_ce(s, t) + soft_ce(transpose(s), transpose(t))) / 2


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_affinity_matches_explicit_loops(temperature: float) -> None:
    objective, _ = objective_for("affinity", temperature=temperature)
    student, teacher = embeddings(S_DIM, 10.0, requires_grad=True), embeddings(T_DIM, 25.0, requires_grad=True)
    loss, parts = objective(student, teacher)
    assert loss.item() == pytest.approx(affinity_reference(student, teacher, temperature), rel=1e-10)
    assert (parts["part/affinity_i2t"] + parts["part/affinity_t2i"]).item() / 2 == pytest.approx(loss.item())
    loss.backward()
    assert student.image_embeds.grad.abs().sum() > 0 and student.logit_scale.grad is not None
    assert_teacher_untouched(teacher)


def test_affinity_is_kd_plus_the_teachers_entropy() -> None:
    """Cross-entropy = KL + H(teacher), and kd carries a T^2 factor that affinity does not."""
    t = 2.0
    student, teacher = embeddings(S_DIM, 10.0), embeddings(T_DIM, 25.0)
    affinity = objective_for("affinity", temperature=t)[0](student, teacher)[0].item()
    kd = objective_for("kd", temperature=t)[0](student, teacher)[0].item()
    logits = teacher.logits_per_image() / t
    entropy = lambda m: -(F.softmax(m, -1) * F.log_softmax(m, -1)).sum(-1).mean().item()  # noqa: E731
    assert affinity == pytest.approx(kd / t**2 + (entropy(logits) + entropy(logits.t())) / 2, rel=1e-10)


# ---------------------------------------------------------------- icl


def icl_reference(student: Signals, teacher: Signals, image_w, text_w) -> float:
    """Explicit loops: project (W or identity), normalize, InfoNCE against the other modality of the
    teacher at the teacher's scale, diagonal positives."""

    def project(rows: torch.Tensor, w: Optional[torch.Tensor]) -> list[list[float]]:
        rows = rows.detach().double()
        rows = rows if w is None else rows @ w.detach().double().t()
        return [[float(x) / math.sqrt(sum(float(v) ** 2 for v in r)) for x in r] for r in rows]

    def infonce(queries: list[list[float]], keys: torch.Tensor) -> float:
        scale = float(teacher.logit_scale.detach())
        total = 0.0
        for i, q in enumerate(queries):
            logits = [scale * dot(q, keys[j].detach()) for j in range(len(queries))]
            total += -math.log(softmax_list(logits)[i])
        return total / len(queries)

    i2t = infonce(project(student.image_embeds, image_w), teacher.text_embeds)
    t2i = infonce(project(student.text_embeds, text_w), teacher.image_embeds)
    return (i2t + t2i) / 2


def test_icl_hand_worked_example_with_equal_dims() -> None:
    """Student = teacher = orthonormal pairs, teacher scale s: each row's logits are (s, 0), so both
    directions give log(1 + e^-s); the student's own scale is not used."""
    objective, icl = objective_for("icl", LossContext(2, 2))
    assert isinstance(icl.image_projection, nn.Identity) and list(objective.parameters()) == []
    student = dual_output([[1, 0], [0, 1]], [[1, 0], [0, 1]], 99.0)
    teacher = dual_output([[1, 0], [0, 1]], [[1, 0], [0, 1]], 3.0)
    assert objective(student, teacher)[0].item() == pytest.approx(math.log(1 + math.exp(-3.0)), rel=1e-12)


def test_icl_with_different_dims_matches_loops_and_trains_its_projections() -> None:
    objective, icl = objective_for("icl")
    for projection in (icl.image_projection, icl.text_projection):
        assert isinstance(projection, nn.Linear) and projection.bias is None
        assert (projection.in_features, projection.out_features) == (S_DIM, T_DIM)
    assert set(objective.state_dict()) == {"losses.icl.image_projection.weight", "losses.icl.text_projection.weight"}
    student, teacher = embeddings(S_DIM, 10.0, requires_grad=True), embeddings(T_DIM, 20.0, requires_grad=True)
    loss, parts = objective(student, teacher)
    expected = icl_reference(student, teacher, icl.image_projection.weight, icl.text_projection.weight)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert {"part/icl_i2t", "part/icl_t2i"} <= set(parts)
    loss.backward()
    for projection in (icl.image_projection, icl.text_projection):
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert student.text_embeds.grad.abs().sum() > 0
    assert student.logit_scale.grad is None  # the teacher's scale is used
    assert_teacher_untouched(teacher)


def test_icl_uses_the_teachers_scale() -> None:
    objective, _ = objective_for("icl")
    student, teacher = embeddings(S_DIM, 10.0), embeddings(T_DIM, 20.0)
    base = objective(student, teacher)[0].item()
    other_student = Signals(image_embeds=student.image_embeds, text_embeds=student.text_embeds, logit_scale=torch.tensor(50.0, dtype=F64))
    other_teacher = Signals(image_embeds=teacher.image_embeds, text_embeds=teacher.text_embeds, logit_scale=torch.tensor(50.0, dtype=F64))
    assert objective(other_student, teacher)[0].item() == pytest.approx(base, rel=1e-12)
    assert objective(student, other_teacher)[0].item() != pytest.approx(base, rel=1e-3)


# ---------------------------------------------------------------- crd


def crd_reference(student: Signals, teacher: Signals, temperature: float) -> dict[str, float]:
    """Explicit loops: per row i, softmax over j (j != i for the same-modality relations) of cosine / T,
    KL(teacher || student), mean over rows."""

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))

    def relation_kl(s_a, s_b, t_a, t_b, skip_self: bool) -> float:
        total = 0.0
        for i in range(B):
            cols = [j for j in range(B) if not (skip_self and j == i)]
            p_s = softmax_list([cos(s_a[i], s_b[j]) / temperature for j in cols])
            p_t = softmax_list([cos(t_a[i], t_b[j]) / temperature for j in cols])
            total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
        return total / B

    si, st = student.image_embeds.detach(), student.text_embeds.detach()
    ti, tt = teacher.image_embeds.detach(), teacher.text_embeds.detach()
    return {
        "image": relation_kl(si, si, ti, ti, True),
        "text": relation_kl(st, st, tt, tt, True),
        "cross": relation_kl(si, st, ti, tt, False),
    }


@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_crd_matches_explicit_loops(temperature: float) -> None:
    objective, _ = objective_for("crd", temperature=temperature)
    assert list(objective.parameters()) == []
    student, teacher = embeddings(S_DIM, 10.0, requires_grad=True), embeddings(T_DIM, 20.0, requires_grad=True)
    loss, parts = objective(student, teacher)
    expected = crd_reference(student, teacher, temperature)
    for key in ("image", "text", "cross"):
        assert parts[f"part/crd_{key}"].item() == pytest.approx(expected[key], rel=1e-9)
    assert loss.item() == pytest.approx(sum(expected.values()) / 3, rel=1e-9)
    loss.backward()
    assert student.image_embeds.grad.abs().sum() > 0 and student.text_embeds.grad.abs().sum() > 0
    assert_teacher_untouched(teacher)


def test_crd_hand_worked_facts() -> None:
    """With B = 2 each same-modality row has one other sample (softmax = 1): those parts are 0. The
    loss is scale-invariant (cosine) and 0 for a student equal to its teacher."""
    objective, _ = objective_for("crd")
    student = dual_output([[1, 0], [0, 1]], [[0.8, 0.6], [0.6, 0.8]], 1.0)
    teacher = dual_output([[1, 0], [0, 1]], [[1, 0], [0, 1]], 1.0)
    loss, parts = objective(student, teacher)
    assert parts["part/crd_image"].item() == 0 and parts["part/crd_text"].item() == 0
    # cross, row 0: teacher softmax((1, 0) / 0.1), student softmax((0.8, 0.6) / 0.1); row 1 is its mirror image.
    p_t, p_s = softmax_list([10.0, 0.0]), softmax_list([8.0, 6.0])
    row = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    assert parts["part/crd_cross"].item() == pytest.approx(row, rel=1e-12)
    assert loss.item() == pytest.approx(row / 3, rel=1e-12)
    scaled = Signals(image_embeds=3 * student.image_embeds, text_embeds=0.5 * student.text_embeds, logit_scale=student.logit_scale)
    assert objective(scaled, teacher)[0].item() == pytest.approx(loss.item(), rel=1e-12)
    assert objective(teacher, teacher)[0].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("losses", "key"),
    [
        ({"siglip": {"init_bias": math.nan}}, "losses.siglip.init_bias"),
        ({"siglip": {"init_bias": -math.inf}}, "losses.siglip.init_bias"),
        ({"siglip": {"init_bias": "low"}}, "losses.siglip.init_bias"),
        ({"siglip": {"bias": -10.0}}, "losses.siglip.bias"),
        ({"affinity": {"temperature": 0}}, "losses.affinity.temperature"),
        ({"affinity": {"temperature": -2.0}}, "losses.affinity.temperature"),
        ({"icl": {"temperature": 1.0}}, "losses.icl.temperature"),
        ({"crd": {"temperature": 0.0}}, "losses.crd.temperature"),
        ({"crd": {"temperature": -0.1}}, "losses.crd.temperature"),
        ({"crd": {"temprature": 0.1}}, "losses.crd.temprature"),
    ],
)
def test_bad_params_raise_naming_the_key(losses: dict, key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key)):
        build_objective(losses, LossContext(S_DIM, T_DIM))


# ---------------------------------------------------------------- layer-wise: shared fixtures

S_SPEC = DualEncoderSpec(
    vision=TowerSpec(layers=2, width=4, heads=2, patch_size=8), text=TowerSpec(layers=2, width=4, heads=2), projection_dim=S_DIM
)
T_SPEC = DualEncoderSpec(
    vision=TowerSpec(layers=4, width=6, heads=3, patch_size=8), text=TowerSpec(layers=4, width=6, heads=3), projection_dim=T_DIM
)
N_IMAGE, N_TEXT = 5, 4
TEXT_LENGTHS = [4, 2, 3, 4]  # real tokens per caption; the rest is padding


def layer_context(student_spec: DualEncoderSpec = S_SPEC, teacher_spec: DualEncoderSpec = T_SPEC) -> LossContext:
    return LossContext(S_DIM, T_DIM, student_spec=student_spec, teacher_spec=teacher_spec)


def layered(spec: DualEncoderSpec, *, requires_grad: bool = False, image_tokens: int = N_IMAGE) -> Signals:
    """float64 leaf hidden states (embeddings + one per layer) and attention maps for `spec`, padded texts."""
    out = embeddings(spec.projection_dim, 10.0)
    for prefix, tower, n in (("image", spec.vision, image_tokens), ("text", spec.text, N_TEXT)):
        states = tuple(torch.randn(B, n, tower.width, dtype=F64) for _ in range(tower.layers + 1))
        maps = tuple(torch.softmax(torch.randn(B, tower.heads, n, n, dtype=F64), -1) for _ in range(tower.layers))
        out = out.replace(**{
            f"{prefix}_hidden_states": tuple(s.requires_grad_(requires_grad) for s in states),
            f"{prefix}_attentions": tuple(m.requires_grad_(requires_grad) for m in maps),
        })
    out = out.replace(text_attention_mask=(torch.arange(N_TEXT)[None] < torch.tensor(TEXT_LENGTHS)[:, None]).long())
    return out


def perturb_padding(out: Signals) -> Signals:
    """A copy whose text hidden states and attention maps differ only at padded tokens (rows and columns)."""
    pad = out.text_attention_mask == 0  # (B, N)
    states = tuple(torch.where(pad[..., None], s + 5.0, s) for s in out.text_hidden_states)
    pad_pairs = (pad[:, None, :, None] | pad[:, None, None, :]).expand_as(out.text_attentions[0])
    maps = tuple(torch.where(pad_pairs, torch.rand_like(m), m) for m in out.text_attentions)
    return Signals(
        image_embeds=out.image_embeds, text_embeds=out.text_embeds, logit_scale=out.logit_scale, image_hidden_states=out.image_hidden_states, text_hidden_states=states,
        image_attentions=out.image_attentions, text_attentions=maps, text_attention_mask=out.text_attention_mask,)


def bad_layer_params() -> list[tuple[str, dict, str]]:
    """(loss, params, key the error must name) for both layer-wise losses."""
    cases = []
    for name in ("hidden", "attention"):
        cases += [
            (name, {"towers": ["audio"]}, f"losses.{name}.towers"),
            (name, {"towers": []}, f"losses.{name}.towers"),
            (name, {"towers": ["text", "text"]}, f"losses.{name}.towers"),
            (name, {"towers": "text"}, f"losses.{name}.towers"),
            (name, {"layer_map": "first"}, f"losses.{name}.layer_map"),
            (name, {"layer_map": [0, 2]}, f"losses.{name}.layer_map"),
            (name, {"layer_map": [True, 2]}, f"losses.{name}.layer_map"),
            (name, {"layer_map": 3}, f"losses.{name}.layer_map"),
            (name, {"layer_map": [1, 2, 3]}, f"losses.{name}.layer_map"),  # 3 entries, 2 student layers
            (name, {"layer_map": [1, 5]}, f"losses.{name}.layer_map"),  # the teacher has 4 layers
            (name, {"layr_map": "last"}, f"losses.{name}.layr_map"),
        ]
    return cases + [
        ("attention", {"distance": "l1"}, "losses.attention.distance"),
        ("attention", {"heads": "sum"}, "losses.attention.heads"),
        ("attention", {"heads": "match"}, "losses.attention.heads"),  # 2 vs 3 heads
    ]


@pytest.mark.parametrize(("name", "params", "key"), bad_layer_params())
def test_layerwise_bad_params_raise_naming_the_key(name: str, params: dict, key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key)):
        build_objective({name: params}, layer_context())


@pytest.mark.parametrize("name", ["hidden", "attention"])
def test_layerwise_losses_need_specs_and_outputs(name: str) -> None:
    with pytest.raises(ValueError, match=r"student_spec=.*teacher_spec="):
        build_objective({name: {}}, LossContext(S_DIM, T_DIM))
    objective = build_objective({name: {}}, layer_context())
    teacher = layered(T_SPEC)
    kind = "hidden_states" if name == "hidden" else "attentions"
    with pytest.raises(ValueError, match=f"student's vision {kind}.*output_{kind}=True"):
        objective(embeddings(S_DIM, 10.0), teacher)


def test_last_needs_a_student_no_deeper_than_the_teacher() -> None:
    deep = DualEncoderSpec(vision=TowerSpec(layers=5, width=4, heads=2, patch_size=8), text=S_SPEC.text)
    with pytest.raises(ValueError, match=r"losses\.hidden\.layer_map = 'last'.*vision"):
        build_objective({"hidden": {"layer_map": "last"}}, layer_context(deep))
    # "uniform" repeats teacher layers instead.
    hidden = build_objective({"hidden": {}}, layer_context(deep)).losses["hidden"]
    assert hidden.layer_pairs["vision"] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 4)]


@pytest.mark.parametrize(
    ("layer_map", "pairs"),
    [("uniform", [(1, 2), (2, 4)]), ("last", [(1, 3), (2, 4)]), ([1, 3], [(1, 1), (2, 3)])],
)
@pytest.mark.parametrize("name", ["hidden", "attention"])
def test_layer_maps(name: str, layer_map, pairs: list[tuple[int, int]]) -> None:
    loss = build_objective({name: {"layer_map": layer_map}}, layer_context()).losses[name]
    assert loss.layer_pairs == {"vision": pairs, "text": pairs}


# ---------------------------------------------------------------- hidden


def hidden_reference(student: Signals, teacher: Signals, hidden, tower: str) -> float:
    """Explicit loops: for each mapped layer, sum of squared errors of W s vs t over real tokens and
    features, divided by their count; mean over layers."""
    prefix = "image" if tower == "vision" else "text"
    s_states, t_states = getattr(student, f"{prefix}_hidden_states"), getattr(teacher, f"{prefix}_hidden_states")
    values = []
    for (s_layer, t_layer), layer_map in zip(hidden.layer_pairs[tower], hidden.maps[tower]):
        w = layer_map.weight.detach() if isinstance(layer_map, nn.Linear) else None
        s, t = s_states[s_layer].detach(), t_states[t_layer].detach()
        total, count = 0.0, 0
        for b in range(B):
            tokens = TEXT_LENGTHS[b] if tower == "text" else s.shape[1]
            if tower == "vision" and s.shape[1] != t.shape[1]:
                tokens = 1
            for n in range(tokens):
                mapped = s[b, n] if w is None else w @ s[b, n]
                total += sum((float(x) - float(y)) ** 2 for x, y in zip(mapped, t[b, n]))
                count += t.shape[-1]
        values.append(total / count)
    return sum(values) / len(values)


def test_hidden_matches_explicit_loops_and_trains_its_maps() -> None:
    objective, hidden = objective_for("hidden", layer_context())
    names = {name for name, _ in objective.named_parameters()}
    assert names == {f"losses.hidden.maps.{tower}.{i}.weight" for tower in ("vision", "text") for i in (0, 1)}
    for maps in hidden.maps.values():
        assert all(isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (4, 6) and m.bias is None for m in maps)
    student, teacher = layered(S_SPEC, requires_grad=True), layered(T_SPEC, requires_grad=True)
    loss, parts = objective(student, teacher)
    vision, text = hidden_reference(student, teacher, hidden, "vision"), hidden_reference(student, teacher, hidden, "text")
    assert parts["part/hidden_vision"].item() == pytest.approx(vision, rel=1e-10)
    assert parts["part/hidden_text"].item() == pytest.approx(text, rel=1e-10)
    assert loss.item() == pytest.approx((vision + text) / 2, rel=1e-10)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.parameters())
    assert student.text_hidden_states[2].grad.abs().sum() > 0
    assert student.text_hidden_states[0].grad is None  # the embeddings output is not distilled
    assert_teacher_untouched(teacher)


def test_hidden_uses_the_mapped_layers_with_equal_widths() -> None:
    """Equal widths: no maps. A teacher whose layers 2 and 4 are the student's layers 1 and 2 gives 0
    under the uniform map and a positive loss under 'last' (layers 3 and 4)."""
    spec = DualEncoderSpec(vision=TowerSpec(layers=4, width=4, heads=2, patch_size=8), text=TowerSpec(layers=4, width=4, heads=2))
    uniform, hidden = objective_for("hidden", layer_context(S_SPEC, spec))
    assert list(uniform.parameters()) == [] and all(isinstance(m, nn.Identity) for m in hidden.maps["text"])
    student, teacher = layered(S_SPEC), layered(spec)
    for prefix in ("image", "text"):
        s_states, t_states = getattr(student, f"{prefix}_hidden_states"), list(getattr(teacher, f"{prefix}_hidden_states"))
        t_states[2], t_states[4] = s_states[1].clone(), s_states[2].clone()
        setattr(teacher, f"{prefix}_hidden_states", tuple(t_states))
    assert uniform(student, teacher)[0].item() == pytest.approx(0.0, abs=1e-15)
    assert objective_for("hidden", layer_context(S_SPEC, spec), layer_map="last")[0](student, teacher)[0].item() > 0.1


def test_hidden_ignores_padded_text_tokens() -> None:
    objective, _ = objective_for("hidden", layer_context(), towers=["text"])
    student, teacher = layered(S_SPEC), layered(T_SPEC)
    loss, parts = objective(student, teacher)
    assert set(parts) == {"loss/hidden", "part/hidden_text", "loss/total"}
    assert objective(perturb_padding(student), perturb_padding(teacher))[0].item() == pytest.approx(loss.item(), rel=1e-12)


def test_hidden_vision_compares_cls_only_when_token_counts_differ() -> None:
    """A student with 2x2 patches on the same images has more tokens: only index 0 (CLS) is compared."""
    fine = DualEncoderSpec(vision=TowerSpec(layers=2, width=4, heads=2, patch_size=4), text=S_SPEC.text, projection_dim=S_DIM)
    objective, hidden = objective_for("hidden", layer_context(fine), towers=["vision"])
    student, teacher = layered(fine, image_tokens=17), layered(T_SPEC)
    loss = objective(student, teacher)[0]
    assert loss.item() == pytest.approx(hidden_reference(student, teacher, hidden, "vision"), rel=1e-10)
    patches_changed = Signals(
        image_embeds=student.image_embeds, text_embeds=student.text_embeds, logit_scale=student.logit_scale,
        image_hidden_states=tuple(torch.cat([s[:, :1], torch.randn_like(s[:, 1:])], dim=1) for s in student.image_hidden_states),)
    assert objective(patches_changed, teacher)[0].item() == pytest.approx(loss.item(), rel=1e-12)


# ---------------------------------------------------------------- attention


def attention_reference(student: Signals, teacher: Signals, loss, tower: str, distance: str, heads: str) -> float:
    """Explicit loops over batch, heads, real query rows and real keys; mean over mapped layers."""
    prefix = "image" if tower == "vision" else "text"
    s_maps, t_maps = getattr(student, f"{prefix}_attentions"), getattr(teacher, f"{prefix}_attentions")
    values = []
    for s_layer, t_layer in loss.layer_pairs[tower]:
        s, t = s_maps[s_layer - 1].detach(), t_maps[t_layer - 1].detach()
        if heads == "average":
            s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
        total, count = 0.0, 0
        for b in range(B):
            n = TEXT_LENGTHS[b] if tower == "text" else s.shape[-1]
            for h in range(s.shape[1]):
                for q in range(n):
                    if distance == "kl":
                        total += sum(float(t[b, h, q, k]) * math.log(float(t[b, h, q, k] / s[b, h, q, k])) for k in range(n))
                        count += 1
                    else:
                        total += sum(float(t[b, h, q, k] - s[b, h, q, k]) ** 2 for k in range(n))
                        count += n
        values.append(total / count)
    return sum(values) / len(values)


@pytest.mark.parametrize(("distance", "heads"), [("kl", "average"), ("mse", "average"), ("kl", "match"), ("mse", "match")])
def test_attention_matches_explicit_loops(distance: str, heads: str) -> None:
    spec = T_SPEC if heads == "average" else DualEncoderSpec(
        vision=TowerSpec(layers=4, width=6, heads=2, patch_size=8), text=TowerSpec(layers=4, width=6, heads=2), projection_dim=T_DIM
    )
    objective, attention = objective_for("attention", layer_context(S_SPEC, spec), distance=distance, heads=heads)
    assert list(objective.parameters()) == []
    student, teacher = layered(S_SPEC, requires_grad=True), layered(spec, requires_grad=True)
    loss, parts = objective(student, teacher)
    for tower in ("vision", "text"):
        expected = attention_reference(student, teacher, attention, tower, distance, heads)
        assert parts[f"part/attention_{tower}"].item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert student.image_attentions[1].grad.abs().sum() > 0 and student.text_attentions[0].grad.abs().sum() > 0
    assert_teacher_untouched(teacher)


def test_attention_hand_worked_kl_and_head_modes() -> None:
    """One real 2-token row pair: teacher (1/2, 1/2), student (1/4, 3/4) gives KL = (1/2) ln 2 + (1/2) ln(2/3).
    Two student heads that average to the teacher's give 0 with heads=average but not with heads=match."""
    spec = DualEncoderSpec(vision=TowerSpec(layers=1, width=4, heads=2, patch_size=8), text=TowerSpec(layers=1, width=4, heads=2))
    context = layer_context(spec, spec)
    teacher_row, student_row = [[0.5, 0.5], [0.5, 0.5]], [[0.25, 0.75], [0.75, 0.25]]

    def maps(rows_head0, rows_head1) -> Signals:
        attention = torch.tensor([[rows_head0, rows_head1]], dtype=F64).expand(B, 2, 2, 2)
        return Signals(
            image_embeds=unit_rows(B, 2, dtype=F64), text_embeds=unit_rows(B, 2, dtype=F64), logit_scale=torch.tensor(1.0), image_attentions=(attention,), text_attentions=(attention,)
        )

    student, teacher = maps(student_row, [[0.75, 0.25], [0.25, 0.75]]), maps(teacher_row, teacher_row)
    match = build_objective({"attention": {"heads": "match"}}, context)(student, teacher)[0].item()
    assert match == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12)
    assert build_objective({"attention": {}}, context)(student, teacher)[0].item() == pytest.approx(0.0, abs=1e-15)


def test_attention_ignores_padding_and_zero_probabilities() -> None:
    objective, _ = objective_for("attention", layer_context(), towers=["text"])
    student, teacher = layered(S_SPEC, requires_grad=True), layered(T_SPEC)
    loss = objective(student, teacher)[0]
    assert objective(perturb_padding(student), perturb_padding(teacher))[0].item() == pytest.approx(loss.item(), rel=1e-12)
    # Causal maps: zero probability above the diagonal in both models; the loss and gradients stay finite.
    causal = torch.tril(torch.ones(N_TEXT, N_TEXT, dtype=torch.bool))
    for out in (student, teacher):
        out.text_attentions = tuple(
            torch.softmax(torch.randn_like(m).masked_fill(~causal, -math.inf), -1).requires_grad_(out is student)
            for m in out.text_attentions
        )
    loss = objective(student, teacher)[0]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(m.grad).all() for m in student.text_attentions[1:])


def test_attention_needs_equal_vision_token_counts() -> None:
    other_patches = DualEncoderSpec(vision=TowerSpec(layers=2, width=4, heads=2, patch_size=4), text=S_SPEC.text)
    with pytest.raises(ValueError, match=r"losses\.attention\.towers includes vision.*patch size 4"):
        build_objective({"attention": {}}, layer_context(other_patches))
    build_objective({"attention": {"towers": ["text"]}}, layer_context(other_patches))  # text only is fine
    objective = build_objective({"attention": {}}, layer_context())
    with pytest.raises(ValueError, match=r"17 tokens.*5"):  # another image size, same patch size
        objective(layered(S_SPEC, image_tokens=17), layered(T_SPEC))


# ---------------------------------------------------------------- on a real tiny CLIP


def test_layerwise_losses_on_real_clip_outputs(teacher: CLIPDualEncoder, make_batch) -> None:
    """Hidden + attention on a real forward: padded text keys get exactly zero attention in both models
    (so masked KL rows need no renormalization), the student and the maps get gradients, the teacher none."""
    spec = DualEncoderSpec(vision=TowerSpec(layers=1, width=16, heads=1, patch_size=8), text=TowerSpec(layers=1, width=16, heads=1))
    student = CLIPDualEncoder(CLIPModel(student_config_from_teacher(teacher.model.config, spec)))
    context = LossContext(
        student.embed_dim, teacher.embed_dim,
        student_spec=spec_from_clip_config(student.model.config), teacher_spec=spec_from_clip_config(teacher.model.config),
    )
    objective = build_objective({"hidden": {}, "attention": {}}, context)
    batch = model_inputs(make_batch(4, split="train"))  # captions of different lengths
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        t_out = teacher(**batch, output_hidden_states=True, output_attentions=True)
    s_out = student(**batch, output_hidden_states=True, output_attentions=True)
    pad_keys = batch["attention_mask"][:, None, None, :] == 0
    for maps in (s_out.text_attentions[0], t_out.text_attentions[-1]):
        assert (maps.masked_select(pad_keys.expand_as(maps)) == 0).all()
    loss, parts = objective(s_out, t_out)
    assert torch.isfinite(loss) and {"part/hidden_text", "part/attention_vision"} <= set(parts)
    loss.backward()
    assert all(p.grad is not None for p in objective.parameters()) and len(list(objective.parameters())) == 2
    assert student.model.text_model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())

