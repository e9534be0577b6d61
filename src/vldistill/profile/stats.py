"""Profile dual encoders side by side: per model and per tower (image, text) the parameters, FLOPs per image
and per text, latency at batch 1 (p50, p95), throughput at a batch (median and p25-p75), peak memory in a
fresh process and the size of the weight files, as a table and as JSON.

All models are timed in the same rounds (`throughput.interleaved_trials`), so machine load touches them
alike, and the speed-ups between them are medians of per-round ratios. A profile target is anything with
`input_spec`, `encode_image(pixel_values)` and `encode_text(input_ids, attention_mask)`: a loaded model
folder (`load_target`), or a quantized module or an ONNX session wrapper, whose parameters, FLOPs, disk size
and memory probe are given when they can be measured and are null in the JSON when not.
"""

from __future__ import annotations

import json

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vldistill.models.inputs import InputSpec
from vldistill.models.loading import load_dual_encoder_any
from vldistill.profile.counts import FLOPS_CONVENTION, TowerFlops, TowerParameters, tower_flops, tower_parameters, weight_bytes
from vldistill.profile.environment import environment
from vldistill.profile.inputs import TEXT_INPUT, image_batch, text_batch
from vldistill.profile.memory import MEMORY_METHOD, MemoryProbe, probe_memory, probe_spec
from vldistill.profile.throughput import Latency, Throughput, eval_mode, interleaved_trials, speedup

logger = logging.getLogger(__name__)

TOWERS = ("image", "text")
UNITS = {"image": "images", "text": "texts"}


class Encoder(Protocol):
    """What a profile runs: the input spec and both towers (every `models.contract.DualEncoder` is one)."""

    @property
    def input_spec(self) -> InputSpec: ...

    def encode_image(self, pixel_values: torch.Tensor) -> Any: ...

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any: ...


@dataclass(frozen=True)
class ProfileSettings:
    """How a profile measures.

    batch_size: the batch of the throughput figures and of the memory probe.
    rounds: timed rounds; in each, every model embeds `latency_calls` single images and texts, then one batch
        of each (rounds x latency_calls calls give p50 and p95; one batch per round gives the throughput).
    warmup: untimed rounds before them.
    latency_calls: timed single-input calls per tower, model and round.
    text_length: tokens per text; None: each model's maximum (a longer length is cut to a model's maximum).
    memory: measure peak memory, one fresh process per model (targets without a memory probe get null).
    parallel: memory processes at once (None: one per CPU core).
    """

    batch_size: int = 32
    rounds: int = 9
    warmup: int = 2
    latency_calls: int = 10
    text_length: Optional[int] = None
    memory: bool = True
    parallel: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "rounds", "latency_calls"):
            if getattr(self, name) < 1:
                raise ValueError(f"profile {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"profile warmup must be >= 0, got {self.warmup}")
        if self.text_length is not None and self.text_length < 1:
            raise ValueError(f"profile text_length must be >= 1, got {self.text_length}")
        if self.parallel is not None and self.parallel < 1:
            raise ValueError(f"profile parallel must be >= 1, got {self.parallel}")

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON data (text_length null: each model's maximum)."""
        return {"batch_size": self.batch_size, "rounds": self.rounds, "warmup_rounds": self.warmup,
                "latency_calls_per_round": self.latency_calls, "text_length": self.text_length}


@dataclass(frozen=True)
class ProfileTarget:
    """One model to profile.

    name: its row in the table and its key in the JSON.
    encoder: what is timed (`Encoder`: a DualEncoder, an int8 module, an ONNX session wrapper, ...).
    tokenizer: the tokenizer its texts are made with.
    counted: the torch module whose parameters and FLOPs are reported (run on the same inputs); None where
        they cannot be counted, e.g. an ONNX graph (null in the JSON). A quantized model may name its float
        original: the same parameters and multiply-adds.
    disk_bytes: bytes of its weight files (see `counts.weight_bytes`); None when it is not on disk.
    memory_probe: how a fresh process loads it for the memory figure; None: not measured (null).
    path: where it came from, for the record.
    """

    name: str
    encoder: Encoder
    tokenizer: PreTrainedTokenizerBase
    counted: Optional[nn.Module] = None
    disk_bytes: Optional[int] = None
    memory_probe: Optional[MemoryProbe] = None
    path: Optional[str] = None


def target_from_model(name: str, model, tokenizer: PreTrainedTokenizerBase, path=None) -> ProfileTarget:
    """A profile target of a loaded torch model (parameters and FLOPs counted on it), with the weight files
    and a memory probe (`load_dual_encoder_any`) of its folder `path` when given."""
    return ProfileTarget(
        name=name,
        encoder=model,
        tokenizer=tokenizer,
        counted=model if isinstance(model, nn.Module) and any(True for _ in model.parameters()) else None,
        disk_bytes=weight_bytes(path) if path is not None else None,
        memory_probe=MemoryProbe(str(path)) if path is not None else None,
        path=str(path) if path is not None else None,
    )


def load_target(path, name: Optional[str] = None) -> ProfileTarget:
    """The profile target of a model folder (or hub id) `load_dual_encoder_any` loads; named after the folder
    unless `name`."""
    model, tokenizer = load_dual_encoder_any(path)
    return target_from_model(name or Path(path).name, model, tokenizer, path)


def unique_names(paths: Sequence[str]) -> list[str]:
    """A name per model path: its folder name, or the path as given where two folder names are the same."""
    names = [Path(path).name or str(path) for path in paths]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, paths)]


@dataclass
class ModelProfile:
    """The measured figures of one model (None where they could not be measured)."""

    path: Optional[str]
    image_size: int
    text_length: int
    parameters: Optional[TowerParameters]
    flops: Optional[TowerFlops]
    latency: dict[str, Latency]
    throughput: dict[str, Throughput]
    memory: Optional[dict[str, Optional[float]]]
    disk_bytes: Optional[int]

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON data (the keys are listed in `profile_targets`)."""
        return {
            "path": self.path,
            "image_size": self.image_size,
            "text_length": self.text_length,
            "params": self.parameters.as_dict() if self.parameters else None,
            "flops": self.flops.as_dict() if self.flops else None,
            "latency": {tower: self.latency[tower].as_dict() for tower in TOWERS},
            "throughput": {tower: self.throughput[tower].as_dict(UNITS[tower]) for tower in TOWERS},
            "memory": self.memory,
            "disk_bytes": self.disk_bytes,
        }


@dataclass
class Profile:
    """Several models measured side by side: their figures in the order given, and how they were measured."""

    settings: ProfileSettings
    models: dict[str, ModelProfile]
    environment: dict[str, object] = field(default_factory=environment)

    def relative(self, name: str, reference: str) -> dict[str, Any]:
        """`name` against `reference`: its parameters and FLOPs as fractions of the reference's, and how many
        times faster it is per tower at batch 1 and at the throughput batch (medians of per-round ratios,
        with their p25-p75)."""
        model, ref = self.models[name], self.models[reference]
        flops = None
        if model.flops and ref.flops:
            flops = {tower: getattr(model.flops, tower) / getattr(ref.flops, tower) for tower in TOWERS}
        return {
            "reference": reference,
            "params_fraction": model.parameters.total / ref.parameters.total if model.parameters and ref.parameters else None,
            "flops_fraction": flops,
            "latency_speedup": {tower: speedup(model.latency[tower], ref.latency[tower]) for tower in TOWERS},
            "throughput_speedup": {tower: speedup(model.throughput[tower], ref.throughput[tower]) for tower in TOWERS},
        }

    def as_dict(self) -> dict[str, Any]:
        """The whole profile as JSON data (see `profile_targets` for the keys)."""
        names = list(self.models)
        return {
            "flops_convention": FLOPS_CONVENTION,
            "memory_method": MEMORY_METHOD if self.settings.memory else None,
            "text_input": TEXT_INPUT,
            "settings": self.settings.as_dict(),
            "environment": self.environment,
            "models": {name: profile.as_dict() for name, profile in self.models.items()},
            "relative_to_first": {name: self.relative(name, names[0]) for name in names[1:]},
        }


@dataclass
class _Inputs:
    """One model's inputs: a batch of images and of texts (the first row of each is the single input)."""

    pixels: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def text_length(self) -> int:
        return self.input_ids.shape[1]


def _inputs(target: ProfileTarget, settings: ProfileSettings) -> _Inputs:
    """The batch a target is profiled on: its image size, its text length (see `ProfileSettings`)."""
    spec = target.encoder.input_spec
    length = min(settings.text_length or spec.max_text_length, spec.max_text_length)
    if settings.text_length is not None and settings.text_length > spec.max_text_length:
        logger.info("%s takes at most %d tokens: profiled on texts of %d tokens", target.name, length, length)
    input_ids, attention_mask = text_batch(target.tokenizer, length, settings.batch_size)
    return _Inputs(image_batch(spec.image_size, settings.batch_size), input_ids, attention_mask)


def _timed_calls(targets: Sequence[ProfileTarget], inputs: dict[str, _Inputs], batch_size: int) -> dict[tuple, Any]:
    """The calls of one round, keyed (tower, batch, name): every model's single image, then single text,
    then image batch, then text batch, so that each kind of call of the models follows each other."""
    calls = {}
    for batch in (1, batch_size):
        for tower in TOWERS:
            for target in targets:
                x = inputs[target.name]
                if tower == "image":
                    call = partial(target.encoder.encode_image, x.pixels[:batch])
                else:
                    call = partial(target.encoder.encode_text, x.input_ids[:batch], x.attention_mask[:batch])
                calls[(tower, batch, target.name)] = call
    return calls


def architecture_key(target: ProfileTarget) -> str:
    """What a model's memory depends on: its class and architecture config (the folder, for a model that
    does not describe its architecture), so models that differ only in their weights share one probe."""
    describe = getattr(target.encoder, "architecture_config", None)
    if describe is None:
        return f"path:{target.path}"
    return f"{type(target.encoder).__name__}:{json.dumps(describe(), sort_keys=True, default=str)}"


def profile_targets(targets: Sequence[ProfileTarget], settings: ProfileSettings = ProfileSettings(), progress: bool = False) -> Profile:
    """Profile the targets side by side (see the module docstring): first what is counted (parameters and
    FLOPs of each target's `counted` module, its disk bytes), then peak memory in fresh processes, then every
    target timed in the same rounds. `Profile.as_dict()` gives the JSON:

        {"flops_convention", "memory_method", "text_input", "settings": {"batch_size", "rounds",
         "warmup_rounds", "latency_calls_per_round", "text_length"}, "environment": {"torch", "threads", "cpu"},
         "models": {NAME: {"path", "image_size", "text_length",
                           "params": {"total", "image", "text", "shared", "other"} | null,
                           "flops": {"image", "text"} | null,
                           "latency": {"image"|"text": {"p50_ms", "p95_ms", "calls"}},
                           "throughput": {"image": {"images_per_second", "images_per_second_p25",
                                                    "images_per_second_p75", "trials"},
                                          "text": {"texts_per_second", ...same...}},
                           "memory": {"process_peak_mb", "over_baseline_mb"} | null,
                           "disk_bytes": int | null}},
         "relative_to_first": {NAME: {"reference", "params_fraction", "flops_fraction": {"image", "text"},
                                      "latency_speedup"|"throughput_speedup": {"image"|"text":
                                                                               {"median", "p25", "p75"}}}}}
    """
    if not targets:
        raise ValueError("nothing to profile: give at least one model")
    names = [target.name for target in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"profile targets need distinct names, got {names}")
    inputs = {target.name: _inputs(target, settings) for target in targets}
    counted = {}
    for target in targets:
        x = inputs[target.name]
        if target.counted is not None:
            counted[target.name] = (tower_parameters(target.counted, x.pixels, x.input_ids, x.attention_mask),
                                    tower_flops(target.counted, x.pixels, x.input_ids, x.attention_mask))
    memory = {}
    if settings.memory:
        probed = {}  # one probe per architecture: same-architecture models (the demo's students) peak alike
        for target in targets:
            if target.memory_probe is not None:
                probed.setdefault(architecture_key(target), target.name)
        specs = {
            target.name: probe_spec(target.memory_probe, target.encoder.input_spec.image_size,
                                    inputs[target.name].input_ids[0].tolist(),
                                    inputs[target.name].attention_mask[0].tolist(), settings.batch_size)
            for target in targets if target.name in probed.values()
        }
        measured = probe_memory(specs, settings.parallel, progress=progress)
        memory = {
            target.name: measured[probed[architecture_key(target)]]
            for target in targets if target.memory_probe is not None
        }
    calls = _timed_calls(targets, inputs, settings.batch_size)
    repeats = {key: settings.latency_calls for key in calls if key[1] == 1}
    with eval_mode(target.encoder for target in targets):
        seconds = interleaved_trials(calls, settings.rounds, settings.warmup, repeats, progress, desc="timing")
    models = {}
    for target in targets:
        name = target.name
        models[name] = ModelProfile(
            path=target.path,
            image_size=target.encoder.input_spec.image_size,
            text_length=inputs[name].text_length,
            parameters=counted.get(name, (None, None))[0],
            flops=counted.get(name, (None, None))[1],
            latency={tower: Latency(seconds[(tower, 1, name)]) for tower in TOWERS},
            throughput={tower: Throughput(settings.batch_size, tuple(s for (s,) in seconds[(tower, settings.batch_size, name)]))
                        for tower in TOWERS},
            memory=memory.get(name),
            disk_bytes=target.disk_bytes,
        )
    return Profile(settings, models)


def profile_folders(paths: Sequence[str], settings: ProfileSettings = ProfileSettings(), progress: bool = False) -> Profile:
    """Load every model folder (or hub id) and profile them side by side (see `profile_targets`)."""
    targets = [load_target(path, name) for path, name in zip(paths, unique_names(paths))]
    return profile_targets(targets, settings, progress)


def _human(value: Optional[float], digits: int = 3) -> str:
    """A count with an SI suffix and `digits` significant digits (1.23G, 45.6M, 789K); '-' for None."""
    if value is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def _ms(value: float) -> str:
    """Milliseconds with about 3 significant digits (0.74, 6.14, 12.3, 431)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    """The first cell left-aligned, the others right-aligned, in their widths."""
    return f"{cells[0]:<{widths[0]}}" + "".join(f"{cell:>{width}}" for cell, width in zip(cells[1:], widths[1:]))


def _table_cells(name: str, m: dict[str, Any]) -> list[str]:
    """One model's row of the profile table."""
    params, flops = m["params"] or {}, m["flops"] or {}
    latency, throughput, memory = m["latency"], m["throughput"], m["memory"]
    peak = "-" if memory is None else f"{memory['process_peak_mb']:,.0f}"
    if memory is not None and memory["over_baseline_mb"] is not None:
        peak += f" (+{memory['over_baseline_mb']:,.1f})"
    return [
        name,
        _human(params.get("total")),
        f"{_human(params.get('image'))} / {_human(params.get('text'))}",
        f"{_human(flops.get('image'))} / {_human(flops.get('text'))}",
        f"{_ms(latency['image']['p50_ms'])} / {_ms(latency['image']['p95_ms'])}",
        f"{_ms(latency['text']['p50_ms'])} / {_ms(latency['text']['p95_ms'])}",
        f"{throughput['image']['images_per_second']:,.0f} / {throughput['text']['texts_per_second']:,.0f}",
        peak,
        "-" if m["disk_bytes"] is None else f"{_human(m['disk_bytes'])}B",
    ]


def _comparison(name: str, rel: dict[str, Any], batch: int) -> str:
    """One line: a model's parameters, FLOPs and speed against the reference's."""
    parts = []
    if rel["params_fraction"] is not None:
        parts.append(f"{rel['params_fraction']:.2f}x the parameters")
    if rel["flops_fraction"] is not None:
        fraction = rel["flops_fraction"]
        parts.append(f"{fraction['image']:.2f}x / {fraction['text']:.2f}x the FLOPs (image / text)")
    fast, single = rel["throughput_speedup"], rel["latency_speedup"]
    parts.append(
        f"{fast['image']['median']:.2f}x / {fast['text']['median']:.2f}x as fast at batch {batch}, "
        f"{single['image']['median']:.2f}x / {single['text']['median']:.2f}x at batch 1"
    )
    return f"{name} vs {rel['reference']}: {', '.join(parts)}"


def format_profile(report: dict[str, Any]) -> str:
    """The profile JSON (`Profile.as_dict()`) as a fixed-width table, one row per model, then one line per
    model after the first comparing it with the first."""
    batch = report["settings"]["batch_size"]
    header = ["model", "params", "image / text", "FLOPs img / txt", "ms img p50 / p95", "ms txt p50 / p95",
              f"/s @{batch} img / txt", "peak MB (+model)", "disk"]
    rows = [_table_cells(name, m) for name, m in report["models"].items()]
    widths = [max(len(row[i]) for row in [header, *rows]) + (0 if i == 0 else 2) for i in range(len(header))]
    lines = [_row(header, widths), *(_row(row, widths) for row in rows)]
    lines += [_comparison(name, rel, batch) for name, rel in report["relative_to_first"].items()]
    return "\n".join(lines)
