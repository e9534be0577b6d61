"""Two CPU processes (gloo) on halves of a batch give the same loss and gradients as one process on
the whole batch: embeddings are gathered across ranks, so negatives and similarity matrices are global.

Opt-in (VLDISTILL_DISTRIBUTED_TESTS=1): on this 2-core machine about one run in eight still hangs in a
gloo collective (see NOTES.md), and a hang must not stall CI."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import build_clip, config_for, teacher_spec
from torch.nn.parallel import DistributedDataParallel

from vldistill.data.synthetic import make_split, vocabulary
from vldistill.data.tokenizer import build_word_tokenizer, make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.losses import LossContext, build_objective
from vldistill.models import DualEncoderSpec, TowerSpec
from vldistill.models.ensemble import TeacherEnsemble
from vldistill.train.loop import StudentWithObjective

LOSSES = {"clip": {}, "kd": {"temperature": 2.0}, "feature": {}, "crd": {}, "icl": {}}
STUDENT = DualEncoderSpec(vision=TowerSpec(layers=1, width=16, heads=1, patch_size=8),
                          text=TowerSpec(layers=1, width=16, heads=1), projection_dim=16)


def setup():
    """The same models, objective and 8-pair batch in every process."""
    tokenizer = build_word_tokenizer(vocabulary(), max_length=32)
    teacher = build_clip(config_for(teacher_spec(), tokenizer), seed=0)
    student = build_clip(config_for(STUDENT, tokenizer), seed=1).train()
    torch.manual_seed(2)
    objective = build_objective(LOSSES, LossContext(16, 32))
    data = make_split("test", 8, image_size=16)
    batch = {"pixel_values": to_pixel_values(data.images), **make_tokenize(tokenizer, 32)(data.captions)}
    return StudentWithObjective(student, objective), TeacherEnsemble([teacher]), batch


def loss_and_grads(module, teacher, batch):
    loss, _ = module(batch, teacher(batch, frozenset({"embeddings"})))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    module, teacher, batch = setup()
    half = {k: v[rank * 4 : (rank + 1) * 4] for k, v in batch.items()}
    ddp = DistributedDataParallel(module)
    loss, _ = ddp(half, teacher(half, frozenset({"embeddings"})))
    loss.backward()
    if rank == 0:
        grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.skipif(
    os.environ.get("VLDISTILL_DISTRIBUTED_TESTS") != "1", reason="opt-in: set VLDISTILL_DISTRIBUTED_TESTS=1"
)
def test_two_processes_match_one_on_the_whole_batch(tmp_path):
    torch.set_num_threads(1)
    module, teacher, batch = setup()
    loss, grads = loss_and_grads(module, teacher, batch)
    out = tmp_path / "rank0.pt"
    mp.spawn(rank_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    assert torch.allclose(distributed["loss"], loss, atol=1e-5)
    assert distributed["grads"].keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.allclose(distributed["grads"][name], grad, atol=1e-5, rtol=1e-4), name
