"""Several processes (torchrun / accelerate launch): which rank this is, and gathering embeddings from
every rank so contrastive and similarity losses see the global batch, as open_clip does."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def process_rank() -> tuple[int, int]:
    """(rank, world size): torch.distributed's when initialized, else the launcher's RANK / WORLD_SIZE
    environment (set by torchrun and accelerate launch before the process group exists), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def join_process_group() -> None:
    """Under torchrun (and `accelerate launch`, which runs it), join the process group before accelerate
    does, under store keys of this restart attempt: the launcher keeps its store across `--max-restarts`
    attempts, and a restarted process otherwise reads an address of the previous attempt's processes
    (gloo "connectFullMesh ... Connection refused"; PyTorch issue #167288). Does nothing with one process,
    outside torchrun's agent store, or when the group exists."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world < 2 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
        timeout=dist.constants.default_pg_timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"vldistill/attempt-{attempt}", store), rank=int(os.environ["RANK"]),
        world_size=world,
    )


def gathering() -> bool:
    """Whether there are several ranks to gather from."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_rows(x: torch.Tensor, keep_grad: bool) -> torch.Tensor:
    """Every rank's rows of `x` concatenated in rank order. With `keep_grad`, gradients flow back to each
    rank's own rows (the all-gather's backward sums every rank's gradient for them), so that ranks
    computing the same global loss under DDP's gradient averaging give exactly the single-process
    gradient of that loss."""
    if not gathering():
        return x
    group = _gather_group()
    if keep_grad:
        return torch.cat(dist_fn.all_gather(x, group=group), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


_GROUPS: dict[int, object] = {}


def _gather_group():
    """A process group of its own for gathering embeddings, created on first use (the same point on every
    rank): its collectives, some run by the backward pass, then cannot interleave with DDP's gradient
    all-reduces on the default group, which can deadlock gloo."""
    key = id(dist.group.WORLD)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(backend=dist.get_backend())
    return _GROUPS[key]


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (just here with one process), so that all ranks take the same
    branch, e.g. skip a step or stop, and none waits in a collective the others skipped. `device` is
    where the process group's tensors live (the training device)."""
    if not gathering():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=_gather_group())
    return bool(value.item())


def every_rank_values(values: list[int], device: torch.device) -> list[list[int]]:
    """Each rank's `values` (a list of the same length on every rank), in rank order; just [values] with one
    process. `device` is where the process group's tensors live (the training device)."""
    if not gathering():
        return [list(values)]
    value = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, value, group=_gather_group())
    return [part.tolist() for part in parts]


def settle_collectives() -> None:
    """Wait for every rank, then give the process groups' worker threads time to release their finished
    work. torch 2.13 + gloo can deadlock at teardown otherwise: an all-reduce DDP launched during a backward
    pass keeps a Python object, whose release needs the GIL, and the process group's destructor joins
    that worker thread while holding the GIL (seen here in ~1 of 3 two-process runs before this; none
    in 30 after). Call it after the last training step, before the process group or model is dropped."""
    if not gathering():
        return
    dist.barrier()
    time.sleep(0.05)
