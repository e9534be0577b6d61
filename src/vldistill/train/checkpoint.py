"""Training checkpoints: everything needed to continue a run exactly where it stopped, written
atomically (a folder renamed into place), the last `keep` kept, refused when from another run."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vldistill import __version__
from vldistill.fileio import atomic_directory

FORMAT = "vldistill-checkpoint"
VERSION = 2  # 2: adds the objective's weighting state
NAME = re.compile(r"^checkpoint-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, from another run or version, or incomplete."""


class CheckpointDamagedError(CheckpointError):
    """A checkpoint whose files cannot be read back (truncated or overwritten on disk)."""


@dataclass
class TrainState:
    """A run's state at a step: trainable weights (student and loss parameters), optimizer and
    scheduler states, RNG states and counters. The data position is the step itself: batches are
    drawn in a deterministic order, so resuming skips the first `step` batches. `weighting` is the
    objective's measured loss-weight state (gap weighting's ratios and references); `stage` the training
    stage the step belongs to (train/stages.Stage.record; None in a checkpoint written before stages existed)."""

    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    nonfinite_steps: int = 0
    weighting: dict[str, Any] = field(default_factory=dict)
    stage: Optional[dict[str, Any]] = None


def capture_rng() -> dict[str, Any]:
    """The Python, NumPy, torch CPU and (when present) every CUDA device's random states."""
    state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [state[0], state[1].tolist(), *state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the random states captured by `capture_rng` (CUDA ones only on a machine with as many devices)."""
    python = rng["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = rng["numpy"]
    np.random.set_state((numpy[0], np.array(numpy[1], dtype=np.uint32), *numpy[2:]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and torch.cuda.device_count() == len(rng["cuda"]):
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(folder: Path, state: TrainState, fingerprint: str, keep: int) -> Path:
    """Write `state` as `folder/checkpoint-<step>` atomically, then delete all but the newest `keep`.
    A failed write (a full disk) leaves the earlier checkpoints as they were and raises CheckpointError."""
    target = Path(folder) / f"checkpoint-{state.step:08d}"
    try:
        _write_checkpoint(target, state, fingerprint)
    except OSError as error:
        newest = latest_checkpoint(folder)
        kept = f"the newest complete one, {newest.name}, is intact" if newest else "there is no earlier one"
        raise CheckpointError(
            f"could not write checkpoint {target}: {error}; {kept}. Free space (or fix the folder) and continue "
            "with --resume"
        ) from error
    for old in checkpoints(folder)[:-keep]:
        for item in old.iterdir():
            item.unlink()
        old.rmdir()
    return target


def _write_checkpoint(target: Path, state: TrainState, fingerprint: str) -> None:
    with atomic_directory(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.weights.items()}, tmp / "weights.safetensors")
        cuda = {f"cuda_rng_{k}": device_state for k, device_state in enumerate(state.rng["cuda"])}
        save_file({"torch_rng": state.rng["torch"], **cuda}, tmp / "rng.safetensors")
        torch.save({"optimizer": state.optimizer, "scheduler": state.scheduler}, tmp / "optimizer.pt")
        meta = {
            "format": FORMAT, "version": VERSION, "vldistill": __version__, "fingerprint": fingerprint,
            "step": state.step, "nonfinite_steps": state.nonfinite_steps,
            "rng": {"python": state.rng["python"], "numpy": state.rng["numpy"]},
            "weighting": state.weighting,
            "stage": state.stage,
        }
        (tmp / "trainer.json").write_text(json.dumps(meta) + "\n")


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temp folders of an interrupted write are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME.match(p.name) and (p / "trainer.json").is_file())


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The newest complete checkpoint in `folder`, or None."""
    found = checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path, fingerprint: str) -> TrainState:
    """Read a checkpoint written by `save_checkpoint`, refusing one of another format, version or run."""
    path = Path(path)
    meta_path = path / "trainer.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a vldistill checkpoint (no trainer.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointDamagedError(f"{path}: trainer.json is damaged ({error})") from error
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')} v{meta.get('version')}, expected {FORMAT} v{VERSION}")
    if meta.get("vldistill") != __version__:
        raise CheckpointError(f"{path} was written by vldistill {meta.get('vldistill')}, this is {__version__}")
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} belongs to another run (its config or teacher differ: fingerprint {meta.get('fingerprint')}, "
            f"this run {fingerprint}); resume with the config it was written with"
        )
    try:
        trainer = torch.load(path / "optimizer.pt", weights_only=True)
        states = load_file(path / "rng.safetensors")
        cuda = [states[f"cuda_rng_{k}"] for k in range(sum(key.startswith("cuda_rng_") for key in states))]
        return TrainState(
            step=meta["step"],
            weights=load_file(path / "weights.safetensors"),
            optimizer=trainer["optimizer"],
            scheduler=trainer["scheduler"],
            rng={**meta["rng"], "torch": states["torch_rng"], "cuda": cuda},
            nonfinite_steps=meta["nonfinite_steps"],
            weighting=meta["weighting"],
            stage=meta.get("stage"),
        )
    except Exception as error:  # a truncated or overwritten file: torch, safetensors and KeyError alike
        raise CheckpointDamagedError(f"{path} is damaged: {type(error).__name__}: {error}") from error
