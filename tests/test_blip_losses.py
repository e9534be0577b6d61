"""The BLIP losses (losses/blip.py: itm, lm, itm_kd, lm_kd) on hand-built Signals, each against a reference
computed another way (explicit loops over rows and tokens with hand-written softmax, in float64)."""

from __future__ import annotations

import math

import pytest
import torch

from vldistill.cli import main as cli_main
from vldistill.losses import LossContext, build_objective
from vldistill.models.blip_signals import concat_caption_labels
from vldistill.models.signals import Signals, concat_signals

B, T, V = 3, 5, 7
F64 = torch.float64
# Caption targets: row 0 has 4 real tokens, row 1 has 2, row 2 has 3; -100 at BOS/padding positions.
LABELS = torch.tensor([
    [4, 2, 6, 1, -100],
    [3, 5, -100, -100, -100],
    [-100, 0, 2, 2, -100],
])


def objective_for(name: str, **params):
    """The float64 objective of one loss and the loss module."""
    objective = build_objective({name: params}, LossContext(8)).double()
    return objective, objective.losses[name]


def itm_signals(scale: float = 2.0, *, requires_grad: bool = False, negatives: torch.Tensor | None = None) -> Signals:
    logits = (scale * torch.randn(3 * B, 2, dtype=F64)).requires_grad_(requires_grad)
    return Signals(itm_logits=logits, itm_negatives=negatives if negatives is not None else torch.tensor([[1, 2, 0], [2, 0, 1]]))


def caption_signals(scale: float = 2.0, *, requires_grad: bool = False) -> Signals:
    logits = (scale * torch.randn(B, T, V, dtype=F64)).requires_grad_(requires_grad)
    return Signals(token_logits=logits, caption_labels=LABELS.clone())


def log_softmax_by_hand(row: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [v / temperature for v in row]
    log_total = math.log(sum(math.exp(v) for v in scaled))
    return [v - log_total for v in scaled]


def kl_by_hand(student_row: list[float], teacher_row: list[float], temperature: float) -> float:
    log_s, log_t = log_softmax_by_hand(student_row, temperature), log_softmax_by_hand(teacher_row, temperature)
    return sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_s, log_t))


# ---------------------------------------------------------------- itm


def test_itm_hand_worked() -> None:
    """B = 1: the positive row [0, ln 3] gives p(match) = 3/4; the negative rows [ln 3, 0] and [0, 0] give p(no
    match) = 3/4 and 1/2. Loss = (ln 4/3 + ln 4/3 + ln 2) / 3."""
    objective, _ = objective_for("itm")
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0], [0.0, 0.0]], dtype=F64)
    loss, parts = objective(Signals(itm_logits=logits), None)
    assert loss.item() == pytest.approx((2 * math.log(4 / 3) + math.log(2)) / 3, rel=1e-12)
    assert parts["part/itm"].item() == pytest.approx(loss.item())


def test_itm_matches_explicit_loop_and_needs_no_teacher() -> None:
    objective, loss_fn = objective_for("itm")
    assert objective.needs == frozenset() and loss_fn.student_needs == {"itm_logits"}
    student = itm_signals(requires_grad=True)
    loss, _ = objective(student, None)
    rows = student.itm_logits.detach().tolist()
    expected = -sum(log_softmax_by_hand(row)[1 if i < B else 0] for i, row in enumerate(rows)) / (3 * B)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert (student.itm_logits.grad.abs().sum(dim=1) > 0).all()


def test_itm_rows_must_be_three_blocks() -> None:
    objective, _ = objective_for("itm")
    with pytest.raises(ValueError, match="itm_logits has 4 rows, not a multiple of 3"):
        objective(Signals(itm_logits=torch.zeros(4, 2, dtype=F64)), None)


# ---------------------------------------------------------------- lm


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_lm_matches_explicit_loop_with_label_smoothing(smoothing: float) -> None:
    """Per real token: (1 - e) (-log p_y) + e * mean_v (-log p_v); the mean over the 9 real tokens."""
    objective, _ = objective_for("lm", label_smoothing=smoothing)
    student = caption_signals()
    loss, parts = objective(student, None)
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            y = int(LABELS[b, t])
            if y == -100:
                continue
            log_p = log_softmax_by_hand(student.token_logits[b, t].tolist())
            total += (1 - smoothing) * -log_p[y] + smoothing * -sum(log_p) / V
            count += 1
    assert count == 9
    assert loss.item() == pytest.approx(total / count, rel=1e-12)
    assert parts["part/lm"].item() == pytest.approx(loss.item())


def test_lm_defaults_to_blips_label_smoothing() -> None:
    _, loss_fn = objective_for("lm")
    assert loss_fn.params.label_smoothing == 0.1


def test_lm_ignores_padded_positions() -> None:
    """Changing the logits where the label is -100 changes nothing, and no gradient reaches them."""
    objective, _ = objective_for("lm")
    student = caption_signals(requires_grad=True)
    loss, _ = objective(student, None)
    changed = student.token_logits.detach().clone()
    changed[LABELS == -100] = 50.0 * torch.randn(int((LABELS == -100).sum()), V, dtype=F64)
    assert objective(student.replace(token_logits=changed), None)[0].item() == pytest.approx(loss.item(), rel=1e-12)
    loss.backward()
    grad = student.token_logits.grad
    assert (grad[LABELS == -100] == 0).all() and (grad[LABELS != -100].abs().sum(dim=-1) > 0).all()


def test_lm_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"losses\.lm\.label_smoothing must be in \[0, 1\)"):
        objective_for("lm", label_smoothing=1.0)
    objective, _ = objective_for("lm")
    with pytest.raises(ValueError, match="hold no token to predict"):
        objective(Signals(token_logits=torch.zeros(1, 2, V, dtype=F64), caption_labels=torch.full((1, 2), -100)), None)
    with pytest.raises(ValueError, match="needs the student's caption_labels"):
        objective(Signals(token_logits=torch.zeros(1, 2, V, dtype=F64)), None)


# ---------------------------------------------------------------- itm_kd


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_itm_kd_matches_explicit_loop_and_trains_only_the_student(temperature: float) -> None:
    """T^2 * mean over the 3B rows of KL(softmax(t / T) || softmax(s / T)) over the 2 ITM classes."""
    objective, _ = objective_for("itm_kd", temperature=temperature)
    assert objective.needs == {"itm_logits", "itm_negatives"}
    student, teacher = itm_signals(1.0, requires_grad=True), itm_signals(4.0, requires_grad=True)
    loss, parts = objective(student, teacher)
    rows = zip(student.itm_logits.detach().tolist(), teacher.itm_logits.detach().tolist())
    expected = temperature**2 * sum(kl_by_hand(s, t, temperature) for s, t in rows) / (3 * B)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert loss.item() > 0 and parts["part/itm_kd"].item() == pytest.approx(loss.item())
    loss.backward()
    assert student.itm_logits.grad.abs().sum() > 0 and teacher.itm_logits.grad is None


def test_itm_kd_is_zero_on_the_teachers_logits_and_refuses_other_pairs() -> None:
    objective, _ = objective_for("itm_kd", temperature=3.0)
    teacher = itm_signals()
    assert objective(teacher, teacher)[0].item() == pytest.approx(0.0, abs=1e-12)
    other = itm_signals(negatives=torch.tensor([[2, 0, 1], [1, 2, 0]]))
    with pytest.raises(ValueError, match="scored other ITM negatives than the teacher"):
        objective(other, teacher)
    with pytest.raises(ValueError, match="needs a teacher"):
        objective(teacher, None)


# ---------------------------------------------------------------- lm_kd


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_lm_kd_matches_explicit_loop_over_real_tokens(temperature: float) -> None:
    """T^2 * mean over the 9 real tokens of KL(softmax(t / T) || softmax(s / T)) over the vocabulary."""
    objective, loss_fn = objective_for("lm_kd", temperature=temperature)
    assert objective.needs == {"token_logits"} and loss_fn.student_needs == {"token_logits", "caption_labels"}
    student, teacher = caption_signals(1.0, requires_grad=True), caption_signals(3.0, requires_grad=True)
    loss, _ = objective(student, teacher)
    terms = [
        kl_by_hand(student.token_logits[b, t].tolist(), teacher.token_logits[b, t].tolist(), temperature)
        for b in range(B) for t in range(T) if LABELS[b, t] != -100
    ]
    assert len(terms) == 9
    assert loss.item() == pytest.approx(temperature**2 * sum(terms) / len(terms), rel=1e-10)
    loss.backward()
    assert teacher.token_logits.grad is None
    grad = student.token_logits.grad
    assert (grad[LABELS == -100] == 0).all() and (grad[LABELS != -100].abs().sum(dim=-1) > 0).all()


def test_lm_kd_ignores_padded_positions_of_either_model() -> None:
    objective, _ = objective_for("lm_kd", temperature=2.0)
    student, teacher = caption_signals(1.0), caption_signals(3.0)
    loss = objective(student, teacher)[0].item()
    pad = LABELS == -100
    s_logits, t_logits = student.token_logits.clone(), teacher.token_logits.clone()
    s_logits[pad], t_logits[pad] = 9.0, -9.0 * torch.arange(V, dtype=F64)
    changed = objective(student.replace(token_logits=s_logits), teacher.replace(token_logits=t_logits))[0].item()
    assert changed == pytest.approx(loss, rel=1e-12)
    assert objective(student, student)[0].item() == pytest.approx(0.0, abs=1e-12)


def test_lm_kd_needs_one_vocabulary() -> None:
    objective, _ = objective_for("lm_kd")
    teacher = Signals(token_logits=torch.zeros(B, T, V + 1, dtype=F64))
    with pytest.raises(ValueError, match=r"student token_logits \(3, 5, 7\) vs teacher \(3, 5, 8\)"):
        objective(caption_signals(), teacher)


# ---------------------------------------------------------------- contract and listing


def test_caption_labels_concatenate_padded_with_ignore_index() -> None:
    """Micro-batches padded to different lengths: labels pad with -100 (never a target), logits with zeros."""
    first = Signals(token_logits=torch.ones(1, 2, V), caption_labels=torch.tensor([[5, -100]]))
    second = Signals(token_logits=torch.ones(1, 4, V), caption_labels=torch.tensor([[1, 2, 3, -100]]))
    joined = concat_signals([first, second])
    assert joined.caption_labels.tolist() == [[5, -100, -100, -100], [1, 2, 3, -100]]
    assert joined.token_logits.shape == (2, 4, V) and joined.token_logits[0, 2:].abs().sum() == 0
    assert concat_caption_labels([torch.tensor([[7]])]).tolist() == [[7]]


def test_combined_objective_on_captioning_and_itm_signals() -> None:
    """Signals without embeddings (a BLIP model's) go through one weighted objective: the total is the sum."""
    objective = build_objective({"itm": {}, "lm": {"weight": 0.5}, "itm_kd": {}, "lm_kd": {"weight": 2.0}}, LossContext(8)).double()
    assert objective.student_needs == {"itm_logits", "token_logits", "caption_labels"}
    student = Signals(**itm_signals(), **caption_signals())
    teacher = Signals(**itm_signals(3.0), **caption_signals(3.0))
    loss, parts = objective(student, teacher)
    expected = parts["loss/itm"] + 0.5 * parts["loss/lm"] + parts["loss/itm_kd"] + 2.0 * parts["loss/lm_kd"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_list_losses_shows_the_blip_losses(capsys) -> None:
    assert cli_main(["list", "losses"]) == 0
    assert {"itm", "lm", "itm_kd", "lm_kd"} <= set(capsys.readouterr().out.split())
