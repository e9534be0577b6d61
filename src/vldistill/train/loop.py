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
from typing import IO, Callable, ContextManager, Iterable, Iterator, Optional, Sequence

import torch
from accelerate import Accelerator, DistributedType
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vldistill.teachers.cache.cached import CachedTeacher
from vldistill.config import OptimConfig
from vldistill.train.checkpoint import CheckpointError, TrainState, capture_rng, restore_rng, save_checkpoint
from vldistill.train.stages import Stage, freeze_for, single_stage, stage_after
from vldistill.train.stop import StopRequests, TrainingStopped
from vldistill.train.trackers import Trackers
from vldistill.losses.registry import DistillationObjective
from vldistill.models.clip import CLIPDualEncoder
from vldistill.distributed import (
    every_rank_values, join_process_group, on_every_rank, settle_collectives,
)
from vldistill.teachers.ensemble import TeacherEnsemble, teacher_output_over
from vldistill.models.blip_signals import ITM_NEGATIVE_KEY
from vldistill.models.inputs import inputs_for
from vldistill.precision import report_cpu_bf16, training_autocast
from vldistill.models.signals import Signals, concat_signals, gather_signals, request_flags
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


def batch_rows(batch: dict[str, torch.Tensor]) -> int:
    """How many pairs a collated batch holds."""
    return int(batch["input_ids"].shape[0])


def teacher_chosen_inputs(teacher_output: Optional[Signals], start: int, rows: int) -> dict[str, torch.Tensor]:
    """What the teacher chose for the student's micro-batch of `rows` pairs starting at row `start` of the
    window: its ITM negatives, re-based to the micro-batch, so the student scores the teacher's pairs (which
    ITM distillation compares). Empty without a teacher or without ITM."""
    if teacher_output is None or teacher_output.itm_negatives is None:
        return {}
    return {"itm_negatives": teacher_output.itm_negatives[:, start : start + rows] - start}


def cache_chosen_inputs(batch: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The inputs of the ITM negatives a batch read from a teacher cache carries (teachers/cache/negatives.py),
    so the student scores the pairs whose teacher logits the cache holds. Empty for any other batch."""
    negatives = inputs_for(batch, ITM_NEGATIVE_KEY)
    return {"itm_negative_inputs": negatives} if negatives else {}


class StudentWithObjective(nn.Module):
    """The trainable part of a run: the student and the objective (which may own projections)."""

    def __init__(self, student: CLIPDualEncoder, objective: DistillationObjective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    def _student_output(self, batch: dict[str, torch.Tensor], chosen: dict[str, torch.Tensor]) -> Signals:
        wanted = self.objective.needs | self.objective.student_needs  # e.g. itm, a task loss on the student's ITM logits
        return self.student(**inputs_for(batch, ""), **request_flags(wanted), **chosen, **cache_chosen_inputs(batch))

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        teacher_output: Optional[Signals],
        cached: Sequence[Signals] = (),
        position: int = 0,
        start: int = 0,
    ):
        """The objective's total loss and its parts plus its current weights and temperatures, for logging.
        With `cached` outputs of an accumulation window, the live outputs of `batch` (rows from `start` of the
        window) take `position` among them (the logit scale and bias are the live ones) and the loss is that of
        the whole window."""
        chosen = teacher_chosen_inputs(teacher_output, start, batch_rows(batch))
        student = gather_signals(self._student_output(batch, chosen), keep_grad=True)
        if cached:
            window = concat_signals([*cached[:position], student, *cached[position + 1 :]])
            student = window.replace(logit_scale=student.logit_scale, logit_bias=student.logit_bias)
        loss, parts = self.objective(student, teacher_output)
        return loss, {**parts, **self.objective.settings()}

    @torch.no_grad()
    def cached_output(self, batch: dict[str, torch.Tensor], chosen: Optional[dict[str, torch.Tensor]] = None) -> Signals:
        """The student's gathered output on `batch` without gradients (given the teacher's `chosen` inputs,
        see `teacher_chosen_inputs`): for gap weighting's measurements, and standing for its micro-batch of an
        accumulation window while another one's gradient is taken."""
        return gather_signals(self._student_output(batch, chosen or {}), keep_grad=False)

    def loss_side_parameters(self) -> list[nn.Parameter]:
        """Parameters the loss uses directly rather than through the embedded micro-batch (the objective's
        own and the student's logit scale and bias): every pass of an accumulation window gives them the
        whole window's gradient."""
        scales = [p for name, p in self.student.named_parameters() if any(key in name for key in LOSS_SIDE_NAMES)]
        return [*self.objective.parameters(), *scales]

    @torch.no_grad()
    def refresh_gap(self, batch: dict[str, torch.Tensor], teacher_output: Signals) -> None:
        """Re-measure the objective's gap weighting on a held-out batch, the student in eval mode meanwhile."""
        self.student.eval()
        chosen = teacher_chosen_inputs(teacher_output, 0, batch_rows(batch))
        self.objective.refresh_gap(self.cached_output(batch, chosen), teacher_output)
        self.student.train()


def uses_bf16(precision: str) -> bool:
    """Whether a config's `precision` autocasts to bfloat16: "bf16" always (refused on a GPU without bf16),
    "auto" on a GPU that supports it (on a CPU bf16 measured slower than fp32, README "bf16 on CPU"), "fp32" never."""
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
    trackers: Optional[Trackers] = None,
    stages: Sequence[Stage] = (),
    penalty: Optional[Callable[[nn.Module], torch.Tensor]] = None,
) -> TrainResult:
    """Train `student` (and the objective's own parameters) for `optim.steps` optimizer steps, AdamW +
    warmup-cosine, each step over `optim.accumulation_steps` consecutive micro-batches of `batches` (see
    the module docstring for what accumulation keeps global). With `stages` (train/stages.py), each stage
    trains only its parameters with a fresh optimizer and schedule of its own; the log and the progress bar
    name it, checkpoints record it; the parameters' requires_grad flags are restored at the end.
    A `penalty` (e.g. train/ewc.EWCPenalty) is a term of the student's parameters added to every step's loss
    once (not per micro-batch), its gradient to the trainable parameters' (`add_penalty`), logged as `loss/ewc`.

    When the objective needs a teacher (a dual encoder, a `TeacherEnsemble`, or a `CachedTeacher` reading
    stored outputs), it is called on every batch in eval mode without gradients.
    Before each step the objective's weight and temperature schedules move to that step; under gap
    weighting its weights are re-measured on `held_out_batch` (required then) every `every` steps from the
    first. Losses, weights, temperatures, the learning rate and the loop's seconds so far are logged every
    `optim.log_every` steps to the history and `log_path` (JSONL), and to the experiment `trackers` when given.
    A progress bar on the main process when `progress`.
    """
    check_inputs(objective, teacher, held_out_batch)
    run = _Run.prepare(student, objective, optim, checkpointer, trackers, list(stages) or [single_stage(optim)], desc)
    run.penalty = penalty
    if resume is not None:
        run.restore(resume)
    else:
        run.begin_stage(run.stages[0])
    run.attach_teacher(teacher, held_out_batch)
    run.module.train()
    run.open_log(log_path, append=resume is not None)
    run.start = time.perf_counter()
    run.bar = tqdm(
        total=optim.steps, initial=run.step, desc=run.stage.label(desc), disable=not (progress and run.accelerator.is_main_process),
        dynamic_ncols=True,
    )
    stop = StopRequests()
    stop.install()
    try:
        for window in _windows(batches, optim.accumulation_steps):
            if run.step == run.stage.end:  # the stage before is done
                run.begin_stage(run.stages[run.stage.index + 1])
            loss, parts = run.backward(window)
            run.update(loss, parts)
            run.log(parts)
            if run.finished_or_stopped(stop):
                break
    finally:
        stop.restore()
        run.close()
    settle_collectives()
    return TrainResult(
        steps=run.step, seconds=time.perf_counter() - run.start, history=run.history, nonfinite_steps=run.nonfinite
    )


def check_inputs(
    objective: DistillationObjective, teacher: Optional[nn.Module], held_out_batch: Optional[dict[str, torch.Tensor]]
) -> None:
    """Raise ValueError when the objective needs a teacher or a held-out batch that was not given."""
    if objective.needs and teacher is None:
        raise ValueError(f"the selected losses need a teacher ({', '.join(sorted(objective.needs))}), but none was given")
    if objective.needs_held_out and held_out_batch is None:
        raise ValueError("gap weighting (distill.weighting.kind: gap) needs a held_out_batch to measure the gap on")


def _accelerator(trackers: Optional[Trackers] = None) -> Accelerator:
    """The process's accelerator (reporting to `trackers`), refusing FSDP. cpu=True on a machine without an
    accelerator: accelerate then runs several processes as DDP over gloo (without it, processes started by
    torchrun would each train alone)."""
    join_process_group()
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), **(trackers.accelerator_kwargs() if trackers else {}))
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "FSDP (accelerate launch --use_fsdp) is not supported: vldistill replicates the student with DDP, and "
            "its checkpoints and saved students read whole parameters, which FSDP shards. Launch without "
            "--use_fsdp; to save memory, cache the teacher's outputs (vldistill cache) instead"
        )
    return accelerator


@dataclass
class _Run:
    """One run of the loop: what `train` prepared (accelerator, module, optimizer, scheduler, teacher) and what
    moves with the steps (the step, the non-finite counts, the history, the log file, the progress bar)."""

    accelerator: Accelerator
    autocast: Callable[[], ContextManager]
    module: nn.Module
    objective: DistillationObjective
    optim: OptimConfig
    checkpointer: Optional[Checkpointer]
    stages: list[Stage]
    desc: str
    requires_grad: dict[str, bool]
    """Each parameter's requires_grad flag before the run (the stages change them; `close` restores them)."""
    stage: Optional[Stage] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    teacher: Optional[nn.Module] = None
    held_out_batch: Optional[dict[str, torch.Tensor]] = None
    held_out_teacher: Optional[Signals] = None
    step: int = 0
    nonfinite: int = 0
    consecutive_nonfinite: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    log_file: Optional[IO[str]] = None
    start: float = 0.0
    bar: Optional[tqdm] = None
    trackers: Optional[Trackers] = None
    penalty: Optional[Callable[[nn.Module], torch.Tensor]] = None

    @classmethod
    def prepare(
        cls, student: CLIPDualEncoder, objective: DistillationObjective, optim: OptimConfig,
        checkpointer: Optional[Checkpointer], trackers: Optional[Trackers], stages: list[Stage], desc: str,
    ) -> _Run:
        """The accelerator, the student's autocast, and the student with its objective (its optimizer comes
        with its first stage, `begin_stage`). A bf16 run on the CPU first probes and logs how bf16 compares with
        fp32 there."""
        accelerator = _accelerator(trackers)
        if trackers is not None:
            trackers.start(accelerator)
        # Our own autocast, not accelerate's mixed_precision: that is fixed once per process, and one process may
        # pretrain a teacher in fp32 and then distill in bf16.
        bf16 = uses_bf16(optim.precision)
        autocast = functools.partial(training_autocast, accelerator.device.type, bf16)
        if bf16 and accelerator.device.type == "cpu" and accelerator.is_main_process:
            report_cpu_bf16(f"bf16 training (precision: {optim.precision})", training=True)
        module = StudentWithObjective(student, objective)
        flags = {name: param.requires_grad for name, param in module.named_parameters()}
        return cls(accelerator, autocast, module, objective, optim, checkpointer, stages, desc, flags, trackers=trackers)

    def begin_stage(self, stage: Stage) -> None:
        """Start `stage`: only its parameters require a gradient, under a fresh AdamW at its learning rate and
        a warmup-cosine schedule over its steps (the module is prepared again, so DDP sees the new flags)."""
        inner = self.accelerator.unwrap_model(self.module)
        freeze_for(inner, stage)
        optimizer = torch.optim.AdamW(parameter_groups(inner, self.optim.weight_decay), lr=stage.lr)
        # The scheduler is stepped once per optimizer step by us (not prepared: accelerate would step it
        # once per process).
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, stage.warmup_steps, stage.steps)
        self.module, self.optimizer = self.accelerator.prepare(inner, optimizer)
        self.stage = stage
        if self.bar is not None:
            self.bar.set_description(stage.label(self.desc))

    def restore(self, resume: TrainState) -> None:
        """Continue from a checkpoint: weights, gap weighting, step, count, the stage (its optimizer and
        scheduler; a fresh one when the checkpoint ended the stage before), random state."""
        self.accelerator.unwrap_model(self.module).load_state_dict(resume.weights)
        self.objective.load_weighting_state(resume.weighting)
        self.step, self.nonfinite = resume.step, resume.nonfinite_steps
        stage = stage_after(self.stages, self.step)
        written = resume.stage or single_stage(self.optim).record()  # a checkpoint from before stages: one
        recorded = next((s for s in self.stages if s.record() == written), None)
        ended_before = recorded is not None and recorded.index == stage.index - 1 and self.step == recorded.end
        if not (recorded is stage or ended_before):
            raise CheckpointError(
                f"the checkpoint at step {self.step} was written in stage {written['index']} ({written['name'] or 'unnamed'}, "
                f"steps {written['start'] + 1}-{written['start'] + written['steps']}), but this run's step {self.step + 1} "
                f"is in stage {stage.index} ({stage.name or 'unnamed'}, steps {stage.start + 1}-{stage.end}): resume "
                "with the stages it was written with"
            )
        self.begin_stage(stage)
        if recorded is stage:
            self.optimizer.load_state_dict(resume.optimizer)
            self.scheduler.load_state_dict(resume.scheduler)
        restore_rng(resume.rng)

    def attach_teacher(self, teacher: Optional[nn.Module], held_out_batch: Optional[dict[str, torch.Tensor]]) -> None:
        """Put the teacher (a lone model wrapped as an fp32 ensemble of one) on the device in eval mode when the
        objective needs one, and take its output on the held-out batch when gap weighting needs that. bf16
        teachers on the CPU first probe and log how bf16 compares with fp32 there."""
        if teacher is not None and self.objective.needs:
            if not isinstance(teacher, (TeacherEnsemble, CachedTeacher)):
                teacher = TeacherEnsemble([teacher])
            teacher = teacher.to(self.accelerator.device).eval()
            bf16_teacher = isinstance(teacher, TeacherEnsemble) and teacher.precision == "bf16"
            if bf16_teacher and self.accelerator.device.type == "cpu" and self.accelerator.is_main_process:
                report_cpu_bf16("bf16 teachers (teacher.precision: bf16)", training=False)
        self.teacher = teacher
        if self.objective.needs_held_out:
            self.held_out_batch = {k: v.to(self.accelerator.device) for k, v in held_out_batch.items()}
            self.held_out_teacher = teacher(self.held_out_batch, self.objective.needs)

    def open_log(self, log_path: Optional[Path], append: bool) -> None:
        """Open the JSONL log on the main process (appended to when resuming)."""
        if log_path is not None and self.accelerator.is_main_process:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            self.log_file = open(log_path, "a" if append else "w")

    def backward(self, window: list[dict[str, torch.Tensor]]) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
        """Move the schedules to this step (re-measuring gap weighting when due), take the teacher's output on the
        window and accumulate the window's gradient; the loss (None when non-finite) and its parts."""
        accelerator, objective = self.accelerator, self.objective
        objective.set_progress(self.step, self.optim.steps)
        if objective.gap_due(self.step):
            with self.autocast():
                accelerator.unwrap_model(self.module).refresh_gap(self.held_out_batch, self.held_out_teacher)
        check_equal_batches(window, accelerator.device)
        window = [{k: v.to(accelerator.device) for k, v in batch.items()} for batch in window]
        # The teachers run in their own precision (teacher.precision), not under the student's autocast.
        teacher_output = teacher_output_over(self.teacher, window, objective.needs) if objective.needs else None
        loss, parts = backward_window(accelerator, self.module, window, teacher_output, self.autocast)
        if self.penalty is not None and loss is not None:
            value = add_penalty(accelerator.unwrap_model(self.module).student, self.penalty)
            loss, parts = loss + value, {**parts, "loss/total": parts["loss/total"] + value, "loss/ewc": value}
        return loss, parts

    def update(self, loss: Optional[torch.Tensor], parts: dict[str, torch.Tensor]) -> None:
        """Finish the step: the optimizer update (clipped, logit scale clamped), or for a non-finite loss none,
        counted; then the scheduler moves and the step count advances."""
        if loss is not None:
            self.consecutive_nonfinite = 0
            if self.optim.grad_clip is not None:
                self.accelerator.clip_grad_norm_(self.module.parameters(), self.optim.grad_clip)
            self.optimizer.step()
            self.accelerator.unwrap_model(self.module).student.clamp_logit_scale()
        else:
            self.skip_nonfinite(parts)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bar.update(1)

    def skip_nonfinite(self, parts: dict[str, torch.Tensor]) -> None:
        """Count a skipped non-finite step; NonFiniteLossError after `optim.max_nonfinite` in a row."""
        self.nonfinite += 1
        self.consecutive_nonfinite += 1
        if self.consecutive_nonfinite >= self.optim.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} non-finite losses in a row (last at step {self.step + 1}: "
                + ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items() if k.startswith("loss/"))
                + f"); stopping (distill.train.max_nonfinite={self.optim.max_nonfinite}). The weights are those "
                "of the last finite step: lower the learning rate or check the data"
            )

    def log(self, parts: dict[str, torch.Tensor]) -> None:
        """Every `optim.log_every` steps and at the last one: a record of the step's losses, weights and
        temperatures, the learning rate and the seconds so far, to the history, the progress bar, the log and
        the trackers."""
        if self.step % self.optim.log_every and self.step != self.stage.end:
            return
        record = {
            "step": self.step, "seconds": round(time.perf_counter() - self.start, 3),
            "lr": self.scheduler.get_last_lr()[0], **{k: float(v) for k, v in parts.items()},
        }
        if self.stage.name is not None:
            record["stage"] = self.stage.name
        self.history.append(record)
        self.bar.set_postfix(loss=f"{record['loss/total']:.3f}")
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()
        if self.trackers is not None:
            self.trackers.log(self.accelerator, record)

    def finished_or_stopped(self, stop: StopRequests) -> bool:
        """Write the checkpoint due after this step; True after the last step. When a stop signal reached any
        rank, checkpoint this step (if not just done) and raise TrainingStopped."""
        due = self.checkpointer is not None and self.checkpointer.due(self.step, self.optim.steps)
        if due:
            self.write_checkpoint()
        if self.step == self.optim.steps:
            return True
        if not on_every_rank(not stop.requested, self.accelerator.device):  # a signal reached some rank
            if not due:
                self.write_checkpoint()
            settle_collectives()
            raise TrainingStopped(
                _stopped_message(stop, self.step, self.optim.steps, self.checkpointer),
                stop.signal_number or signal.SIGTERM,
            )
        return False

    def write_checkpoint(self) -> None:
        """Save the run's state after this step (main process only, when checkpointing)."""
        if self.checkpointer is not None and self.accelerator.is_main_process:
            state = TrainState(
                self.step, self.accelerator.unwrap_model(self.module).state_dict(), self.optimizer.state_dict(),
                self.scheduler.state_dict(), capture_rng(), self.nonfinite, self.objective.weighting_state(),
                self.stage.record(),
            )
            save_checkpoint(self.checkpointer.folder, state, self.checkpointer.fingerprint, self.checkpointer.keep)

    def close(self) -> None:
        """Restore the parameters' requires_grad flags; close the progress bar, the log file and the trackers' run."""
        for name, param in self.accelerator.unwrap_model(self.module).named_parameters():
            param.requires_grad_(self.requires_grad[name])
        if self.bar is not None:
            self.bar.close()
        if self.log_file is not None:
            self.log_file.close()
        if self.trackers is not None:
            self.trackers.finish(self.accelerator)


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


def add_penalty(student: nn.Module, penalty: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
    """Add the gradient of `penalty(student)` to the student's trainable parameters' gradients (after a step's
    backward passes; the same on every process, so after DDP's averaging) and return its value, detached."""
    params = [param for param in student.parameters() if param.requires_grad]
    value = penalty(student)
    if value.requires_grad:
        grads = torch.autograd.grad(value, params, allow_unused=True, materialize_grads=True)
        for param, grad in zip(params, grads):
            param.grad = grad if param.grad is None else param.grad.add_(grad)
    return value.detach()


def backward_window(
    accelerator: Accelerator,
    module: nn.Module,
    window: list[dict[str, torch.Tensor]],
    teacher_output: Optional[Signals],
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
    """Accumulate the gradient of the window's loss (see the module docstring) and return the loss and its
    parts; the loss is None when it was NaN or infinite on any rank (then nothing was backpropagated).
    Forward passes run under `autocast`; DDP synchronizes gradients only on the window's last backward pass.
    A window of one micro-batch is a plain step: nothing cached, one pass. Losses with their own `grad_clip`
    are backpropagated apart and added clipped at the end (losses/gradients.py); their norms join the parts."""
    inner = accelerator.unwrap_model(module)
    control = inner.objective.gradients
    trainable = [param for param in inner.parameters() if param.requires_grad]
    starts = [sum(batch_rows(batch) for batch in window[:k]) for k in range(len(window))]
    cached = []
    if len(window) > 1:
        with autocast():
            cached = [
                inner.cached_output(batch, teacher_chosen_inputs(teacher_output, start, batch_rows(batch)))
                for batch, start in zip(window, starts)
            ]
    for position, batch in enumerate(window):
        last = position == len(window) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(module):
            with autocast():
                loss, parts = module(batch, teacher_output, cached, position, starts[position])
            if position == 0 and not on_every_rank(bool(torch.isfinite(loss)), loss.device):
                return None, parts
            control.backward(loss, trainable, accelerator.backward)
    loss_side = inner.loss_side_parameters() if cached else []
    for param in loss_side:  # each pass gave them the whole window's gradient
        if param.grad is not None:
            param.grad.div_(len(window))
    norms = control.finish(trainable, loss_side, len(window), functools.partial(accelerator.reduce, reduction="mean"))
    return loss, {**parts, **norms}
