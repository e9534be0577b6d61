"""The profile table: per model and tower the parameters, FLOPs, latency at batch 1, throughput, peak memory
and size on disk, from `profile.json` (`vldistill profile --out`) or from the per-model `profile` entries of a
demo's `summary.json`, and each model's speed against the first."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from vldistill.report.markup import Cell, Markup, escape, number, paragraph, si, table, tag
from vldistill.report.run import Run
from vldistill.report.section import Section, lookup, run_heading


def summary_profile(summary: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """A profile (as `profile.json` holds it) from a demo summary: its `profile` settings and the `profile`
    entry of each model (scratch left out when it is the baseline run); None when no model has one."""
    summary = summary or {}
    models = {
        name: figures["profile"] for name, figures in (summary.get("models") or {}).items()
        if isinstance(figures.get("profile"), dict) and not (name == "scratch" and summary.get("scratch_is_baseline"))
    }
    if not models:
        return None
    return {**(summary.get("profile") or {}), "models": models}


def _pair(first: Cell, second: Cell) -> Cell:
    """Two cells' texts in one cell, 'a / b'."""
    return Cell(f"{first.text} / {second.text}", class_="num")


def _memory(memory: Any) -> Cell:
    peak, over = lookup(memory, "process_peak_mb"), lookup(memory, "over_baseline_mb")
    if not isinstance(peak, (int, float)):
        return Cell("-")
    extra = f" (+{over:,.1f})" if isinstance(over, (int, float)) else ""
    return Cell(f"{peak:,.0f}{extra}", peak, class_="num")


def _row(name: str, m: Mapping[str, Any]) -> list:
    disk = m.get("disk_bytes")
    return [
        name, si(lookup(m, "params", "total")), _pair(si(lookup(m, "params", "image")), si(lookup(m, "params", "text"))),
        si(lookup(m, "flops", "image")), si(lookup(m, "flops", "text")),
        _pair(number(lookup(m, "latency", "image", "p50_ms"), 2), number(lookup(m, "latency", "image", "p95_ms"), 2)),
        _pair(number(lookup(m, "latency", "text", "p50_ms"), 2), number(lookup(m, "latency", "text", "p95_ms"), 2)),
        number(lookup(m, "throughput", "image", "images_per_second"), 0),
        number(lookup(m, "throughput", "text", "texts_per_second"), 0),
        _memory(m.get("memory")),
        number(disk / 2**20 if isinstance(disk, (int, float)) else None, 2),
    ]


def _comparisons(profile: Mapping[str, Any]) -> list[Markup]:
    """One line per model after the first: its parameters, FLOPs and speed against the first."""
    lines = []
    for name, rel in (profile.get("relative_to_first") or {}).items():
        parts = []
        if isinstance(rel.get("params_fraction"), (int, float)):
            parts.append(f"{rel['params_fraction']:.2f}x the parameters")
        flops = rel.get("flops_fraction")
        if isinstance(flops, Mapping):
            parts.append(f"{flops.get('image', 0):.2f}x / {flops.get('text', 0):.2f}x the FLOPs (image / text)")
        fast, single = lookup(rel, "throughput_speedup", "image", "median"), lookup(rel, "latency_speedup", "image", "median")
        if isinstance(fast, (int, float)) and isinstance(single, (int, float)):
            parts.append(f"image tower {fast:.2f}x as fast at the batch, {single:.2f}x at batch 1")
        if parts:
            lines.append(tag("li", f"{name} against {rel.get('reference')}: {', '.join(parts)}"))
    return lines


def profile_block(profile: Mapping[str, Any], title: str, id_: str) -> list[Markup]:
    """The table of one profile, how it was measured and the comparisons with its first model."""
    batch = lookup(profile, "settings", "batch_size")
    at = f" @{batch}" if batch else ""
    header = ["model", "params", "image / text", "FLOPs/image", "FLOPs/text", "image ms p50 / p95",
              "text ms p50 / p95", f"images/s{at}", f"texts/s{at}", "peak MB (+model)", "disk MB"]
    rows = [_row(name, m) for name, m in (profile.get("models") or {}).items() if isinstance(m, Mapping)]
    notes = [text for text in (profile.get("flops_convention"), profile.get("memory_method"), profile.get("text_input"))
             if isinstance(text, str)]
    environment = profile.get("environment")
    if isinstance(environment, Mapping):
        notes.append(", ".join(f"{k}: {v}" for k, v in environment.items()))
    comparisons = _comparisons(profile)
    return [tag("h4", title), table(header, rows, id_=id_), *(paragraph(n, class_="note") for n in notes),
            tag("ul", comparisons) if comparisons else Markup("")]


def profile_section(runs: Sequence[Run]) -> Optional[Section]:
    """Every profile of every run: the summary's (the demo's arms) and each profile.json."""
    body: list[Markup] = []
    index = 0
    for run in runs:
        profiles = {}
        from_summary = summary_profile(run.summary)
        if from_summary:
            profiles["summary.json"] = from_summary
        profiles.update(run.profiles)
        if not profiles:
            continue
        body.append(run_heading(run, runs))
        for where, profile in profiles.items():
            body += profile_block(profile, f"from {where}", "profile" if index == 0 else f"profile-{index}")
            index += 1
    if not index:
        return None
    return Section("profile", "Profile: size, FLOPs, latency, throughput, memory", escape(body))
