"""Experiment trackers through accelerate (TensorBoard, Weights & Biases offline, MLflow with a file store): what
the loop gives `Accelerator(log_with=..., project_dir=...)` and `init_trackers`, how it logs a step's record, and
how a run's trackers end.

The loop ends its trackers with each tracker's `finish()` rather than `Accelerator.end_training()`, which also
destroys the process group: a demo or sweep trains several models in one process, and under torchrun the loop
still needs the group afterwards (`distributed.settle_collectives`)."""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from accelerate import Accelerator

from vldistill.config import TRACKERS, LogConfig, missing_tracker_packages

logger = logging.getLogger(__name__)

TRACKERS_DIR = "trackers"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as tracker hyperparameters: `a.b.c` keys; numbers, strings, booleans and None as they are,
    lists (and anything else) as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


@dataclass(frozen=True)
class Trackers:
    """The trackers of one training run: which (`names`), where they write (`folder`), the run's name (one
    TensorBoard folder / W&B project / MLflow experiment per name) and its hyperparameters."""

    names: tuple[str, ...]
    folder: Path
    run_name: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [name for name in self.names if name not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown trackers {unknown}; known: {', '.join(TRACKERS)}")
        for name in missing_tracker_packages(list(self.names)):
            raise ValueError(f"log.trackers: {name} is selected but the package {name} is not installed: pip install {name}")

    def accelerator_kwargs(self) -> dict[str, Any]:
        """What `Accelerator(...)` takes to report to these trackers."""
        return {"log_with": list(self.names), "project_dir": str(self.folder)}

    def start(self, accelerator: Accelerator) -> None:
        """Open the trackers' run on the main process: W&B offline in `folder`, MLflow's file store in
        `folder/mlruns`, the hyperparameters recorded."""
        self.folder.mkdir(parents=True, exist_ok=True)
        init_kwargs: dict[str, dict[str, Any]] = {}
        if "wandb" in self.names:
            init_kwargs["wandb"] = {"mode": "offline", "dir": str(self.folder), "name": self.run_name}
        if "mlflow" in self.names and accelerator.is_main_process:
            importlib.import_module("mlflow").set_tracking_uri((self.folder / "mlruns").resolve().as_uri())
        accelerator.init_trackers(self.run_name, config=flatten(self.hyperparameters), init_kwargs=init_kwargs)
        logger.info("reporting %s to %s (%s)", self.run_name, ", ".join(self.names), self.folder)

    @staticmethod
    def log(accelerator: Accelerator, record: Mapping[str, Any]) -> None:
        """Report one step's record (losses, weights, temperatures, lr, seconds) at its step."""
        accelerator.log({key: value for key, value in record.items() if key != "step"}, step=int(record["step"]))

    @staticmethod
    def finish(accelerator: Accelerator) -> None:
        """Close the trackers' run (flush and close the event files); the process group stays (module docstring)."""
        for tracker in accelerator.trackers:
            tracker.finish()


def trackers_for(
    log: LogConfig, run_name: str, default_folder: Path, hyperparameters: Optional[Mapping[str, Any]] = None
) -> Optional[Trackers]:
    """The trackers `log` selects for a run named `run_name`, writing to `log.dir` or else `default_folder`;
    None when none is selected."""
    if not log.trackers:
        return None
    folder = Path(log.dir) if log.dir is not None else Path(default_folder)
    return Trackers(tuple(log.trackers), folder, run_name, dict(hyperparameters or {}))
