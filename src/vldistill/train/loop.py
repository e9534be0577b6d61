"""The one training loop (accelerate): pretraining a teacher and distilling a student both run here,
unchanged on CPU, one GPU or several processes.

Gradient accumulation (`accumulation_steps` = K > 1) keeps the semantics of the whole batch, as open_clip's
`accum_freq` does: the student first embeds all K micro-batches without gradients; then, one micro-batch
at a time, its live outputs take their place among the others' cached outputs and the loss of the whole
window (K micro-batches x every process) is backpropagated through that micro-batch only. Negatives,
similarity matrices, the teacher's combined logits and per-sample means therefore span the global batch
of the optimizer step, and the summed gradient equals that of one pass over it (up to float rounding;
dropout would differ between the passes). The price is one extra student forward pass per micro-batch."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import signal
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Optional, Sequence

import torch
from accelerate import Accelerator, DistributedType
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vldistill.cache.teacher import CachedTeacher
from vldistill.config import OptimConfig
from vldistill.train.checkpoint import TrainState, capture_rng, restore_rng, save_checkpoint
from vldistill.train.stop import StopRequests, TrainingStopped
from vldistill.losses.base import TEACHER_ATTENTIONS, TEACHER_HIDDEN_STATES
from vldistill.losses.registry import DistillationObjective
from vldistill.models.clip import CLIPDualEncoder
from vldistill.distributed import (
    every_rank_values, join_process_group, on_every_rank, settle_collectives,
)
from vldistill.models.ensemble import TeacherEnsemble, teacher_output_over
from vldistill.models.inputs import inputs_for
from vldistill.models.outputs import DualEncoderOutput, concat_outputs, gather_embeddings
from vldistill.trained import TrainResult


LOSS_SIDE_NAMES = ("logit_scale", "logit_bias")


@dataclass
class Checkpointer:
    """Where and how often a run writes checkpoints (every `every` steps and at the end; the newest
    `keep` kept), and the fingerprint that ties them to this run."""

    folder: Path
    every: int
    keep: int
    fingerprint: str

    def due(self, step: int, steps: int) -> bool:
        """Whether a checkpoint is written after `step`."""
        return step == steps or step % self.every == 0


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


class StudentWithObjective(nn.Module):
    """The trainable part of a run: the student and the objective (which may own projections)."""

    def __init__(self, student: CLIPDualEncoder, objective: DistillationObjective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    def _student_output(self, batch: dict[str, torch.Tensor]) -> DualEncoderOutput:
        return self.student(
            **inputs_for(batch, ""),
            output_hidden_states=TEACHER_HIDDEN_STATES in self.objective.needs,
            output_attentions=TEACHER_ATTENTIONS in self.objective.needs,
        )

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        teacher_output: Optional[DualEncoderOutput],
        cached: Sequence[DualEncoderOutput] = (),
        position: int = 0,
    ):
        """The objective's total loss and its parts plus its current weights and temperatures, for logging.
        With `cached` outputs of an accumulation window, the live outputs of `batch` take `position` among
        them (the logit scale and bias are the live ones) and the loss is that of the whole window."""
        student = gather_embeddings(self._student_output(batch), keep_grad=True)
        if cached:
            window = concat_outputs([*cached[:position], student, *cached[position + 1 :]])
            student = dataclasses.replace(window, logit_scale=student.logit_scale, logit_bias=student.logit_bias)
        loss, parts = self.objective(student, teacher_output)
        return loss, {**parts, **self.objective.settings()}

    @torch.no_grad()
    def cached_output(self, batch: dict[str, torch.Tensor]) -> DualEncoderOutput:
        """The student's gathered output on `batch` without gradients: for gap weighting's measurements, and
        standing for its micro-batch of an accumulation window while another one's gradient is taken."""
        return gather_embeddings(self._student_output(batch), keep_grad=False)

    def loss_side_parameters(self) -> list[nn.Parameter]:
        """Parameters the loss uses directly rather than through the embedded micro-batch (the objective's
        own and the student's logit scale and bias): every pass of an accumulation window gives them the
        whole window's gradient."""
        scales = [p for name, p in self.student.named_parameters() if any(key in name for key in LOSS_SIDE_NAMES)]
        return [*self.objective.parameters(), *scales]

    @torch.no_grad()
    def refresh_gap(self, batch: dict[str, torch.Tensor], teacher_output: DualEncoderOutput) -> None:
        """Re-measure the objective's gap weighting on a held-out batch, the student in eval mode meanwhile."""
        self.student.eval()
        self.objective.refresh_gap(self.cached_output(batch), teacher_output)
        self.student.train()


def uses_bf16(precision: str) -> bool:
    """Whether a config's `precision` autocasts to bfloat16: "bf16" always (refused on a GPU without bf16),
    "auto" on a GPU that supports it (CPUs without bf16 units run it slower than fp32), "fp32" never."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return cuda and torch.cuda.is_bf16_supported()
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("precision bf16: this GPU does not support bfloat16; use fp32 (or auto)")
    return precision == "bf16"


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in open_clip: no decay on biases, norms, embeddings' gains and the logit scale."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    student: CLIPDualEncoder,
    objective: DistillationObjective,
    batches: Iterable[dict[str, torch.Tensor]],
    optim: OptimConfig,
    *,
    teacher: Optional[nn.Module] = None,
    checkpointer: Optional[Checkpointer] = None,
    resume: Optional[TrainState] = None,
    desc: str = "train",
    log_path: Optional[Path] = None,
    held_out_batch: Optional[dict[str, torch.Tensor]] = None,
    progress: bool = True,
) -> TrainResult:
    """Train `student` (and the objective's own parameters) for `optim.steps` optimizer steps, AdamW +
    warmup-cosine, each step over `optim.accumulation_steps` consecutive micro-batches of `batches` (see
    the module docstring for what accumulation keeps global).

    When the objective needs a teacher (a dual encoder, a `TeacherEnsemble`, or a `CachedTeacher` reading
    stored outputs), it is called on every batch in eval mode without gradients.
    Before each step the objective's weight and temperature schedules move to that step; under gap
    weighting its weights are re-measured on `held_out_batch` (required then) every `every` steps from the
    first. Losses, weights, temperatures, the learning rate and the loop's seconds so far are logged every
    `optim.log_every` steps to the history and `log_path` (JSONL). A progress bar on the main process
    when `progress`.
    """
    if objective.needs and teacher is None:
        raise ValueError(f"the selected losses need a teacher ({', '.join(sorted(objective.needs))}), but none was given")
    if objective.needs_held_out and held_out_batch is None:
        raise ValueError("gap weighting (distill.weighting.kind: gap) needs a held_out_batch to measure the gap on")
    steps = optim.steps
    # cpu=True on a machine without an accelerator: accelerate then runs several processes as DDP over gloo
    # (without it, processes started by torchrun would each train alone).
    join_process_group()
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    # Our own autocast, not accelerate's mixed_precision: that is fixed once per process, and one process may
    # pretrain a teacher in fp32 and then distill in bf16.
    autocast = functools.partial(
        torch.autocast, accelerator.device.type, dtype=torch.bfloat16, enabled=uses_bf16(optim.precision)
    )
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "FSDP (accelerate launch --use_fsdp) is not supported: vldistill replicates the student with DDP, and "
            "its checkpoints and saved students read whole parameters, which FSDP shards. Launch without "
            "--use_fsdp; to save memory, cache the teacher's outputs (vldistill cache) instead"
        )
    module = StudentWithObjective(student, objective)
    optimizer = torch.optim.AdamW(parameter_groups(module, optim.weight_decay), lr=optim.lr)
    # The scheduler is stepped once per optimizer step by us (not prepared: accelerate would step it
    # once per process).
    scheduler = get_cosine_schedule_with_warmup(optimizer, optim.warmup_steps, steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    if resume is not None:
        accelerator.unwrap_model(module).load_state_dict(resume.weights)
        objective.load_weighting_state(resume.weighting)
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        restore_rng(resume.rng)
    if teacher is not None and objective.needs:
        if not isinstance(teacher, (TeacherEnsemble, CachedTeacher)):
            teacher = TeacherEnsemble([teacher])
        teacher = teacher.to(accelerator.device).eval()
    if objective.needs_held_out:
        held_out_batch = {k: v.to(accelerator.device) for k, v in held_out_batch.items()}
        held_out_teacher = teacher(held_out_batch, objective.needs)
    module.train()
    history: list[dict[str, float]] = []
    log_file = None
    if log_path is not None and accelerator.is_main_process:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a" if resume is not None else "w")
    start = time.perf_counter()
    step = resume.step if resume is not None else 0
    nonfinite = resume.nonfinite_steps if resume is not None else 0
    consecutive_nonfinite = 0
    bar = tqdm(
        total=steps, initial=step, desc=desc, disable=not (progress and accelerator.is_main_process), dynamic_ncols=True
    )

    def write_checkpoint() -> None:
        if checkpointer is not None and accelerator.is_main_process:
            state = TrainState(
                step, accelerator.unwrap_model(module).state_dict(), optimizer.state_dict(),
                scheduler.state_dict(), capture_rng(), nonfinite, objective.weighting_state(),
            )
            save_checkpoint(checkpointer.folder, state, checkpointer.fingerprint, checkpointer.keep)

    stop = StopRequests()
    stop.install()
    try:
        for window in _windows(batches, optim.accumulation_steps):
            objective.set_progress(step, steps)
            if objective.gap_due(step):
                with autocast():
                    accelerator.unwrap_model(module).refresh_gap(held_out_batch, held_out_teacher)
            check_equal_batches(window, accelerator.device)
            window = [{k: v.to(accelerator.device) for k, v in batch.items()} for batch in window]
            with autocast():
                teacher_output = teacher_output_over(teacher, window, objective.needs) if objective.needs else None
            loss, parts = backward_window(accelerator, module, window, teacher_output, autocast)
            if loss is not None:
                consecutive_nonfinite = 0
                if optim.grad_clip is not None:
                    accelerator.clip_grad_norm_(module.parameters(), optim.grad_clip)
                optimizer.step()
                accelerator.unwrap_model(module).student.clamp_logit_scale()
            else:  # skip the update, count it, stop after too many in a row
                nonfinite += 1
                consecutive_nonfinite += 1
                if consecutive_nonfinite >= optim.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{consecutive_nonfinite} non-finite losses in a row (last at step {step + 1}: "
                        + ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items() if k.startswith("loss/"))
                        + f"); stopping (distill.train.max_nonfinite={optim.max_nonfinite}). The weights are those "
                        "of the last finite step: lower the learning rate or check the data"
                    )
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % optim.log_every == 0 or step == steps:
                record = {
                    "step": step, "seconds": round(time.perf_counter() - start, 3), "lr": scheduler.get_last_lr()[0],
                    **{k: float(v) for k, v in parts.items()},
                }
                history.append(record)
                bar.set_postfix(loss=f"{record['loss/total']:.3f}")
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
            due = checkpointer is not None and checkpointer.due(step, steps)
            if due:
                write_checkpoint()
            if step == steps:
                break
            if not on_every_rank(not stop.requested, accelerator.device):  # a signal reached some rank
                if not due:
                    write_checkpoint()
                settle_collectives()
                raise TrainingStopped(_stopped_message(stop, step, steps, checkpointer), stop.signal_number or signal.SIGTERM)
    finally:
        stop.restore()
        bar.close()
        if log_file is not None:
            log_file.close()
    settle_collectives()
    return TrainResult(steps=step, seconds=time.perf_counter() - start, history=history, nonfinite_steps=nonfinite)


def _stopped_message(stop: StopRequests, step: int, steps: int, checkpointer: Optional[Checkpointer]) -> str:
    """What a run stopped by a signal tells the user: where it stopped and how to continue."""
    cause = signal.Signals(stop.signal_number).name if stop.requested else "a stop signal on another process"
    if checkpointer is None:
        return f"stopped by {cause} after step {step} of {steps}; no checkpoints (distill.checkpoint.every), so a rerun starts over"
    return (
        f"stopped by {cause} after step {step} of {steps}; checkpoint written to {checkpointer.folder}: "
        "run the same command with --resume to continue"
    )


def _windows(batches: Iterable[dict[str, torch.Tensor]], size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """The micro-batches grouped into accumulation windows of `size` (one optimizer step each)."""
    iterator = iter(batches)
    while window := list(itertools.islice(iterator, size)):
        if len(window) < size:
            raise ValueError(f"the data ended inside an accumulation window ({len(window)} of {size} micro-batches)")
        yield window


def check_equal_batches(window: list[dict[str, torch.Tensor]], device: torch.device) -> None:
    """Raise ValueError on every rank when the ranks' micro-batches of this window hold different numbers of
    pairs: the embedding gather needs equal ones (gloo fails on a mismatch, NCCL would hang). The data
    loaders keep them equal (see data.pairs.pair_loader); this turns a bug or a custom batch source that
    does not into a clear error."""
    sizes = every_rank_values([len(batch["pixel_values"]) for batch in window], device)
    if any(rank_sizes != sizes[0] for rank_sizes in sizes):
        shown = "; ".join(f"rank {rank}: {rank_sizes}" for rank, rank_sizes in enumerate(sizes))
        raise ValueError(f"the processes' batches differ in size (pairs per micro-batch, {shown}); every process needs equal batches")


def backward_window(
    accelerator: Accelerator,
    module: nn.Module,
    window: list[dict[str, torch.Tensor]],
    teacher_output: Optional[DualEncoderOutput],
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
    """Accumulate the gradient of the window's loss (see the module docstring) and return the loss and its
    parts; the loss is None when it was NaN or infinite on any rank (then nothing was backpropagated).
    Forward passes run under `autocast`; DDP synchronizes gradients only on the window's last backward pass.
    A window of one micro-batch is a plain step: nothing cached, one pass."""
    inner = accelerator.unwrap_model(module)
    cached = []
    if len(window) > 1:
        with autocast():
            cached = [inner.cached_output(batch) for batch in window]
    for position, batch in enumerate(window):
        last = position == len(window) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(module):
            with autocast():
                loss, parts = module(batch, teacher_output, cached, position)
            if position == 0 and not on_every_rank(bool(torch.isfinite(loss)), loss.device):
                return None, parts
            accelerator.backward(loss)
    if cached:
        for param in inner.loss_side_parameters():  # each pass gave them the whole window's gradient
            if param.grad is not None:
                param.grad.div_(len(window))
    return loss, parts
