"""EWC (train/ewc.py): the penalty against a hand computation, the Fisher information against gradients taken
another way, saving and the refusal of another model's or a stale Fisher, and the loop adding the penalty."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import batches, student_and_objective
from vldistill.config import OptimConfig
from vldistill.train.ewc import (
    EWCPenalty, FisherInformation, FisherMismatchError, estimate_fisher, load_fisher, save_fisher,
)
from vldistill.train.loop import add_penalty, train

CLIP = {"clip": {"weight": 1.0}}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = nn.Parameter(torch.tensor([[3.0]]))


def tiny_info() -> FisherInformation:
    return FisherInformation(
        fisher={"a": torch.tensor([0.5, 2.0]), "b": torch.tensor([[4.0]])},
        anchor={"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[2.5]])},
        batches=3,
    )


def test_the_penalty_is_half_lambda_times_the_fisher_weighted_squared_distance_and_its_gradient() -> None:
    model = Tiny()
    penalty = EWCPenalty(tiny_info(), strength=3.0)
    # 3/2 * (0.5*1^2 + 2*1^2 + 4*0.5^2) = 1.5 * 3.5
    assert penalty(model).item() == pytest.approx(5.25)
    model.a.grad = torch.tensor([10.0, 10.0])  # the objective's gradient so far; b has none yet
    value = add_penalty(model, penalty)
    assert float(value) == pytest.approx(5.25) and not value.requires_grad
    # d/dtheta = lambda * F * (theta - anchor): a: 3*[0.5*1, 2*1] = [1.5, 6]; b: 3*4*0.5 = 6
    assert model.a.grad.tolist() == pytest.approx([11.5, 16.0])
    assert model.b.grad.item() == pytest.approx(6.0)


def test_the_fisher_is_the_mean_squared_gradient_of_the_objective_over_the_batches(tokenizer) -> None:
    module = student_and_objective(tokenizer, CLIP)
    _, parts = batches(tokenizer, 12, 3)
    info = estimate_fisher(module.student, module.objective, iter(parts), count=2)
    assert info.batches == 2
    reference = copy.deepcopy(module).eval()
    squares = {}
    for batch in parts[:2]:
        reference.zero_grad()
        loss, _ = reference(batch, None)
        loss.backward()
        for name, param in reference.student.named_parameters():
            squares[name] = squares.get(name, 0) + param.grad**2 / 2
    assert set(info.fisher) == set(squares) and len(squares) > 40
    for name, value in squares.items():
        torch.testing.assert_close(info.fisher[name], value, rtol=1e-4, atol=1e-10)
        assert torch.equal(info.anchor[name], dict(module.student.named_parameters())[name].detach())
    assert sum(float(v.sum()) for v in info.fisher.values()) > 0
    assert all(p.grad is None for p in module.parameters())  # the estimate leaves no gradient behind
    with pytest.raises(ValueError, match="needs 5 batches, but the data gave 3"):
        estimate_fisher(module.student, module.objective, iter(parts), count=5)


def test_a_saved_fisher_reads_back_and_another_or_a_changed_model_is_refused(tmp_path) -> None:
    path = save_fisher(tmp_path / "fisher.safetensors", tiny_info())
    model = Tiny()
    read = load_fisher(path, model)
    assert read.batches == 3
    assert read.fisher["a"].tolist() == [0.5, 2.0] and read.anchor["b"].tolist() == [[2.5]]
    with pytest.raises(FisherMismatchError, match=r"stale: .* differ .* \(2 parameters, e\.g\. a\)"):
        load_fisher(path, model, same_weights=True)
    with torch.no_grad():
        model.a.copy_(torch.tensor([0.0, 1.0]))
        model.b.copy_(torch.tensor([[2.5]]))
    load_fisher(path, model, same_weights=True)  # the anchor's weights: accepted
    other = Tiny()
    other.b = nn.Parameter(torch.zeros(2, 1))
    with pytest.raises(FisherMismatchError, match=r"parameter b has shape \(2, 1\) in the model but \(1, 1\)"):
        load_fisher(path, other)
    with pytest.raises(FisherMismatchError, match="parameters this model does not have \\(a, b; 2 in all\\)"):
        load_fisher(path, nn.Linear(2, 2))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable Fisher information file"):
        load_fisher(tmp_path / "junk.safetensors")


def test_the_loop_adds_the_penalty_to_every_step_and_logs_it(tokenizer) -> None:
    _, parts = batches(tokenizer, 16, 2)
    optim = OptimConfig(steps=2, batch_size=8, lr=5e-3, warmup_steps=0, log_every=1, grad_clip=None)
    module = student_and_objective(tokenizer, CLIP)
    info = estimate_fisher(module.student, module.objective, iter(parts), count=2)
    info.fisher = {name: torch.ones_like(f) for name, f in info.fisher.items()}
    penalty = EWCPenalty(info, strength=100.0)
    one = copy.deepcopy(module)
    torch.manual_seed(5)
    train(one.student, one.objective, parts[:1], OptimConfig(**{**optim.__dict__, "steps": 1}), progress=False, penalty=penalty)
    torch.manual_seed(5)
    result = train(module.student, module.objective, parts, optim, progress=False, penalty=penalty)
    first, second = result.history
    assert first["loss/ewc"] == 0.0  # at the anchor
    assert second["loss/ewc"] == pytest.approx(penalty(one.student).item(), rel=1e-5) and second["loss/ewc"] > 0
    assert second["loss/total"] == pytest.approx(second["loss/clip"] + second["loss/ewc"], rel=1e-6)
    # The strong penalty holds the student nearer the anchor than a plain run does.
    plain = student_and_objective(tokenizer, CLIP)
    torch.manual_seed(5)
    train(plain.student, plain.objective, parts, optim, progress=False)
    assert penalty(module.student).item() < penalty(plain.student).item()
