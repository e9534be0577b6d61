"""Read what a run folder holds, whichever command wrote it (demo, distill, sweep, and the deployment
commands run into it): the resolved config, the per-step logs, `summary.json`, the result records, a sweep's
`ablation.json`, and profile, quantization, cascade and ONNX export records. Every file is optional; a file
that is there but unreadable is an error naming it (and its line)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from vldistill.eval.results import read_result

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
ABLATION_FILE = "ablation.json"
LOGS_DIR = "logs"
RESULTS_DIR = "results"
PROFILE_FILES = ("profile.json",)
QUANTIZE_FILES = ("quantize.json", "quantization.json")
CASCADE_FILE, CASCADE_SUMMARY_FILE = "cascade.json", "cascade_summary.json"
EXPORT_FILE = "onnx_pair.json"
MODEL_METADATA_FILE = "vldistill.json"
RESULT_TASKS = ("zeroshot_classification", "zeroshot_retrieval")


@dataclass
class Run:
    """One run folder's records. `label` names it in the report; deployment records are keyed by where they
    were found, relative to the run folder ("." for the folder itself)."""

    path: Path
    label: str
    config_text: Optional[str] = None
    logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    summary: Optional[dict[str, Any]] = None
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    ablation: Optional[dict[str, Any]] = None
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantizations: dict[str, dict[str, Any]] = field(default_factory=dict)
    cascades: dict[str, dict[str, Any]] = field(default_factory=dict)
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """Whether nothing a vldistill command writes was found."""
        found = (self.config_text, self.summary, self.ablation)
        return all(item is None for item in found) and not any(
            (self.logs, self.results, self.profiles, self.quantizations, self.cascades, self.exports))


def read_json(path: Path) -> Any:
    """The JSON value in `path`; ValueError naming the file, line and column when it is not valid JSON."""
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None


def _json_object(path: Path) -> dict[str, Any]:
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a per-step JSONL log. A last line without its newline (a run stopped while writing)
    is skipped with a warning; any other line that is not a JSON object is a ValueError naming it."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                logger.warning("%s:%d: skipped an unfinished last line", path, number)
                continue
            raise ValueError(f"{path}:{number}: not a JSON record ({error.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{number}: a log record must be a JSON object with a 'step'")
        records.append(record)
    return records


def _results(folder: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Result records by model and task (`<model>_<task>.json`)."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")):
        task = next((t for t in RESULT_TASKS if path.stem.endswith(f"_{t}")), None)
        if task is None:
            continue
        record = read_result(path)
        found.setdefault(str(record["model"]), {})[record["task"]] = record
    return found


def _places(folder: Path) -> list[tuple[str, Path]]:
    """The run folder and its direct subfolders, as (label relative to the run folder, path)."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(".", folder), *((p.name, p) for p in subfolders)]


def _quantizations(place: str, path: Path) -> dict[str, dict[str, Any]]:
    """Quantization reports in a folder: `quantize.json` / `quantization.json` (one report or a list), and the
    `quantization` entry of a quantized model folder's vldistill.json."""
    found = {}
    for name in QUANTIZE_FILES:
        if (path / name).is_file():
            value = read_json(path / name)
            reports = value if isinstance(value, list) else [value]
            for index, report in enumerate(reports):
                if not isinstance(report, dict):
                    raise ValueError(f"{path / name}: expected quantization reports as JSON objects")
                suffix = f" #{index + 1}" if len(reports) > 1 else ""
                found[f"{_join(place, name)}{suffix}"] = report
    metadata = path / MODEL_METADATA_FILE
    if metadata.is_file():
        quantization = _json_object(metadata).get("quantization")
        if isinstance(quantization, dict):
            found[place] = quantization
    return found


def _cascade(path: Path) -> dict[str, Any]:
    """A cascade sweep: its points (`cascade.json`, a list) with `cascade_summary.json` beside them when present."""
    points = read_json(path / CASCADE_FILE)
    if not isinstance(points, list):
        raise ValueError(f"{path / CASCADE_FILE}: expected a list of threshold points")
    summary = _json_object(path / CASCADE_SUMMARY_FILE) if (path / CASCADE_SUMMARY_FILE).is_file() else {}
    return {**summary, "points": points}


def _join(place: str, name: str) -> str:
    return name if place == "." else f"{place}/{name}"


def read_run(path: str | Path, label: Optional[str] = None) -> Run:
    """Everything the report shows of the run folder `path` (see the module docstring); FileNotFoundError when
    it is not a folder, ValueError when it holds nothing a vldistill command writes or a file is unreadable."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such run folder")
    run = Run(folder, label or folder.resolve().name)
    if (folder / CONFIG_FILE).is_file():
        run.config_text = (folder / CONFIG_FILE).read_text(encoding="utf-8")
    if (folder / LOGS_DIR).is_dir():
        logs = folder / LOGS_DIR  # a subfolder's logs (the BLIP demo's captioner/) are named by their path
        run.logs = {p.relative_to(logs).with_suffix("").as_posix(): read_log(p) for p in sorted(logs.rglob("*.jsonl"))}
    if (folder / SUMMARY_FILE).is_file():
        run.summary = _json_object(folder / SUMMARY_FILE)
    if (folder / RESULTS_DIR).is_dir():
        run.results = _results(folder / RESULTS_DIR)
    if (folder / ABLATION_FILE).is_file():
        run.ablation = _json_object(folder / ABLATION_FILE)
    for place, where in _places(folder):
        for name in PROFILE_FILES:
            if (where / name).is_file():
                run.profiles[_join(place, name)] = _json_object(where / name)
        run.quantizations.update(_quantizations(place, where))
        if (where / CASCADE_FILE).is_file():
            run.cascades[place] = _cascade(where)
        if (where / EXPORT_FILE).is_file():
            run.exports[place] = _json_object(where / EXPORT_FILE)
    if run.is_empty:
        raise ValueError(
            f"{folder}: no vldistill run here (none of {CONFIG_FILE}, {SUMMARY_FILE}, {ABLATION_FILE}, {LOGS_DIR}/, "
            f"{RESULTS_DIR}/ or profile, quantization, cascade or export records)"
        )
    return run


def read_runs(paths: Sequence[str | Path]) -> list[Run]:
    """The run folders in order, labelled by folder name (by the path as given where two names are the same)."""
    if not paths:
        raise ValueError("no run folder given")
    names = [Path(p).resolve().name for p in paths]
    labels = [name if names.count(name) == 1 else str(p) for name, p in zip(names, paths)]
    return [read_run(p, label) for p, label in zip(paths, labels)]
