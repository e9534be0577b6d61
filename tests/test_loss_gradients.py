"""Per-loss gradient control (losses/gradients.py): `grad_scale` multiplies one loss's gradient and leaves its
value alone; `grad_clip` clips the gradient one loss contributes to a step (over all its micro-batches, and
under DDP over all processes) before the other losses' gradients are added. Each is checked against the
losses' gradients taken one by one with torch.autograd.grad."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from helpers import batches, build_clip, config_for, gradients, student_and_objective, teacher_spec

from vldistill.config import OptimConfig
from vldistill.data.tokenizer import build_word_tokenizer
from vldistill.data.grammar import vocabulary
from vldistill.distributed import settle_collectives
from vldistill.losses import parse_loss_specs
from vldistill.losses.gradients import clip_factor, scale_gradient
from vldistill.models.inputs import inputs_for
from vldistill.models.signals import request_flags
from vldistill.teachers.ensemble import TeacherEnsemble, teacher_output_over
from vldistill.train.loop import backward_window, train

LOSSES = {"clip": {}, "kd": {"weight": 0.5, "temperature": 2.0}, "feature": {}}  # feature owns a projection


def with_options(name: str, **options) -> dict:
    """LOSSES with `options` added to loss `name`'s."""
    return {**LOSSES, name: {**LOSSES[name], **options}}


@pytest.fixture(scope="module")
def tiny_teacher(tokenizer):
    return TeacherEnsemble([build_clip(config_for(teacher_spec(), tokenizer), seed=10)])


def terms(module, batch: dict, teacher_output) -> dict[str, torch.Tensor]:
    """Each loss's weighted term on `batch`, computed loss by loss from the student's output (not through the
    objective's sum)."""
    objective = module.objective
    student = module.student(**inputs_for(batch, ""), **request_flags(objective.needs | objective.student_needs))
    weights = objective.weights
    return {name: weights[name] * loss(student, teacher_output)[0] for name, loss in objective.losses.items()}


def grads_of(module, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """d value / d every trainable parameter of `module`, by name (zeros where it does not reach)."""
    names, params = zip(*[(n, p) for n, p in module.named_parameters() if p.requires_grad])
    return dict(zip(names, torch.autograd.grad(value, params, retain_graph=True, materialize_grads=True)))


def by_hand(module, batch: dict, teacher_output, name: str) -> tuple[dict, dict]:
    """The gradients of loss `name`'s term and of the other losses' terms on `batch`, taken apart."""
    values = terms(module, batch, teacher_output)
    rest = sum(v for k, v in values.items() if k != name)
    return grads_of(module, values[name]), grads_of(module, rest)


def norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()])))


def assert_gradients(found: dict, expected: dict) -> None:
    """Every expected gradient matches (float32 sums in another order: relative to the tensor's scale)."""
    assert set(found) <= set(expected) and len(found) > 20
    for name, grad in expected.items():
        got = found.get(name, torch.zeros_like(grad))
        assert (got - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-6, name


def test_scale_gradient_keeps_the_value_and_scales_the_gradient():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = scale_gradient((x**2).sum(), 0.7)
    y.backward()
    assert y.item() == 14.0
    assert torch.allclose(x.grad, 0.7 * 2 * x.detach())
    assert clip_factor(4.0, 1.0) == 0.25 and clip_factor(0.5, 1.0) == 1.0


def test_grad_scale_multiplies_that_losss_gradient_only_and_keeps_its_value(tokenizer, tiny_teacher):
    batch, _ = batches(tokenizer, 6, parts=1)
    scaled = student_and_objective(tokenizer, with_options("kd", grad_scale=0.7))
    teacher_output = teacher_output_over(tiny_teacher, [batch], scaled.objective.needs)
    loss, parts = scaled(batch, teacher_output)
    loss.backward()
    reference = student_and_objective(tokenizer, LOSSES)
    plain_loss, plain_parts = reference(batch, teacher_output)
    assert parts["loss/kd"].item() == plain_parts["loss/kd"].item()
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    assert parts["weight/kd"] == 0.5 and parts["grad_scale/kd"] == 0.7
    g_kd, g_rest = by_hand(reference, batch, teacher_output, "kd")
    assert norm(g_kd) > 0.1 * norm(g_rest)  # the scaled loss matters to the comparison
    assert_gradients(gradients(scaled), {k: 0.7 * g_kd[k] + g_rest[k] for k in g_kd})


def test_grad_scale_follows_its_schedule(tokenizer):
    module = student_and_objective(tokenizer, with_options("kd", grad_scale={"kind": "linear", "start": 1.0, "end": 0.5}))
    module.objective.set_progress(1, 3)
    assert module.objective.settings()["grad_scale/kd"] == 0.75


@pytest.mark.parametrize("name", ["kd", "feature"])
def test_grad_clip_below_the_norm_clips_that_losss_gradient_before_the_others_are_added(tokenizer, tiny_teacher, name):
    batch, _ = batches(tokenizer, 6, parts=1)
    reference = student_and_objective(tokenizer, LOSSES)
    teacher_output = teacher_output_over(tiny_teacher, [batch], reference.objective.needs)
    g_clip, g_rest = by_hand(reference, batch, teacher_output, name)
    own = norm(g_clip)
    clipped = student_and_objective(tokenizer, with_options(name, grad_clip=own / 4))
    loss, parts = backward_window(Accelerator(cpu=True), clipped, [batch], teacher_output)
    assert parts["grad_norm/" + name].item() == pytest.approx(own, rel=1e-5)
    assert parts[f"loss/{name}"].item() == pytest.approx(reference(batch, teacher_output)[1][f"loss/{name}"].item(), rel=1e-6)
    assert_gradients(gradients(clipped), {k: g_clip[k] / 4 + g_rest[k] for k in g_clip})


def test_grad_clip_above_the_norm_changes_nothing(tokenizer, tiny_teacher):
    batch, _ = batches(tokenizer, 6, parts=1)
    plain = student_and_objective(tokenizer, LOSSES)
    teacher_output = teacher_output_over(tiny_teacher, [batch], plain.objective.needs)
    backward_window(Accelerator(cpu=True), plain, [batch], teacher_output)
    loose = student_and_objective(tokenizer, with_options("kd", grad_clip=1e6))
    _, parts = backward_window(Accelerator(cpu=True), loose, [batch], teacher_output)
    assert 0 < parts["grad_norm/kd"].item() < 1e6
    assert_gradients(gradients(loose), gradients(plain))


def test_grad_clip_under_accumulation_clips_the_whole_steps_contribution(tokenizer, tiny_teacher):
    """Two micro-batches: the kd loss's gradient summed over both (its whole-batch gradient) is clipped once."""
    whole, micro = batches(tokenizer, 12, parts=2)
    reference = student_and_objective(tokenizer, LOSSES)
    needs = reference.objective.needs
    g_kd, g_rest = by_hand(reference, whole, teacher_output_over(tiny_teacher, [whole], needs), "kd")
    own = norm(g_kd)
    assert any("logit_scale" in k and g.abs().sum() > 0 for k, g in g_kd.items())  # a loss-side parameter too
    clipped = student_and_objective(tokenizer, with_options("kd", grad_clip=own / 4))
    _, parts = backward_window(Accelerator(cpu=True), clipped, micro, teacher_output_over(tiny_teacher, micro, needs))
    assert parts["grad_norm/kd"].item() == pytest.approx(own, rel=1e-5)
    assert_gradients(gradients(clipped), {k: g_kd[k] / 4 + g_rest[k] for k in g_kd})


def test_training_logs_the_clipped_losss_gradient_norm(tokenizer, tiny_teacher):
    module = student_and_objective(tokenizer, with_options("kd", grad_clip=0.01))
    data = [batches(tokenizer, 4, parts=1, seed=s)[0] for s in range(2)]
    optim = OptimConfig(steps=2, batch_size=4, warmup_steps=1, lr=1e-3, log_every=1)
    result = train(module.student, module.objective, data, optim, teacher=tiny_teacher, progress=False)
    assert [record["grad_norm/kd"] > 0.01 for record in result.history] == [True, True]
    assert "grad_norm/clip" not in result.history[0]


@pytest.mark.parametrize("key, value, problem", [
    ("grad_clip", 0, "grad_clip must be a finite number > 0, got 0"),
    ("grad_clip", -1.5, "grad_clip must be a finite number > 0"),
    ("grad_clip", "big", "grad_clip must be a finite number > 0, got 'big'"),
    ("grad_clip", True, "grad_clip must be a finite number > 0"),
    ("grad_clip", float("inf"), "grad_clip must be a finite number > 0"),
    ("grad_scale", 0, "grad_scale must be a finite number > 0"),
    ("grad_scale", {"kind": "linear", "start": 1.0, "end": 0.0}, "grad_scale.end must be a finite number > 0"),
    ("grad_scale", {"kind": "wobble"}, "grad_scale.kind must be one of"),
])
def test_an_invalid_gradient_option_is_refused_by_key(key, value, problem):
    with pytest.raises(ValueError, match=f"distill.losses.kd.{problem}".replace(".", r"\.").replace("(", r"\(")):
        parse_loss_specs({"kd": {key: value}}, "distill.losses")


def test_every_loss_accepts_the_gradient_options_and_says_so():
    spec, = parse_loss_specs({"hidden": {"grad_clip": 2, "grad_scale": 0.5}})
    assert spec.grad_clip == 2.0 and spec.grad_scale.at(0.3) == 0.5
    with pytest.raises(ValueError, match=r"allowed keys: weight, temperature, grad_scale, grad_clip$"):
        parse_loss_specs({"kd": {"grad_norm": 1}})


# ---------------------------------------------------------------- two processes (DDP over gloo)


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    tokenizer = build_word_tokenizer(vocabulary(), max_length=32)
    teacher = TeacherEnsemble([build_clip(config_for(teacher_spec(), tokenizer), seed=10)])
    limit = torch.load(out + ".limit", weights_only=True)
    module = accelerator.prepare(student_and_objective(tokenizer, with_options("feature", grad_clip=limit)))
    _, parts = batches(tokenizer, 12, parts=world * 2)
    window = [parts[k * world + rank] for k in range(2)]  # 2 micro-batches of 3 pairs per process
    needs = accelerator.unwrap_model(module).objective.needs
    for _ in range(2):  # a second step: DDP would refuse it had the first left a parameter without gradient
        accelerator.unwrap_model(module).zero_grad(set_to_none=True)
        _, logged = backward_window(accelerator, module, window, teacher_output_over(teacher, window, needs))
    settle_collectives()
    if rank == 0:
        torch.save({"norm": logged["grad_norm/feature"], "grads": gradients(accelerator.unwrap_model(module))}, out)


@pytest.mark.slow
def test_two_processes_clip_the_global_contribution(tmp_path, tokenizer, tiny_teacher):
    """Under DDP with accumulation the feature loss's gradient (its projection used by no other loss) is
    averaged over the processes, then clipped: what one process computes on the whole batch."""
    torch.set_num_threads(1)
    whole, _ = batches(tokenizer, 12, parts=1)
    reference = student_and_objective(tokenizer, LOSSES)
    g_feature, g_rest = by_hand(reference, whole, teacher_output_over(tiny_teacher, [whole], reference.objective.needs), "feature")
    own = norm(g_feature)
    out = tmp_path / "rank0.pt"
    torch.save(own / 4, str(out) + ".limit")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.start_processes(ddp_worker, args=(2, port, str(out)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("two-process run did not finish in 120 s (hung collective)")
    found = torch.load(out, weights_only=True)
    assert found["norm"].item() == pytest.approx(own, rel=1e-5)
    assert_gradients(found["grads"], {k: g_feature[k] / 4 + g_rest[k] for k in g_feature})
