"""Ablation sweep: the same student, data and steps distilled with each loss (alone, beside the task loss)
and with named combinations, all from one shared teacher, each over the same seeds; with named student
variants (`sweep.students`, a module ablation as DLIP's), every run once per variant. Results in
`ablation.json`, every run compared to its variant's task losses alone (the same student without a teacher),
and the run folder's `summary.json`, result records and `report.html`."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from vldistill.config import ExperimentConfig
from vldistill.data.bundle import load_data
from vldistill.eval.suite import ITM_SUMMARY_KEYS, SUMMARY_KEYS, evaluate_model
from vldistill.export import write_card
from vldistill.fileio import write_text_atomic
from vldistill.losses import LOSSES
from vldistill.losses.registry import parse_loss_specs
from vldistill.models.contract import BuildsStudents
from vldistill.models.signals import DUAL_ENCODER_SIGNALS
from vldistill.losses.schedules import describe_schedule
from vldistill.report import write_run_report
from vldistill.train.runs import obtain_teacher, train_student

TASK_LOSS = "clip"  # the contrastive task loss every retrieval student trains with
ITM_TASK_LOSS = "itm"  # beside it, for a student with an image-text matching head (BLIP's ITC + ITM)
METRIC_KEYS = (*SUMMARY_KEYS, *ITM_SUMMARY_KEYS)  # ITM re-ranked R@1: None for a model without an ITM head
METRIC_LABELS = {
    "acc1": "acc1", "image_retrieval_recall@1": "T->I R@1", "text_retrieval_recall@1": "I->T R@1",
    "itm_image_retrieval_recall@1": "T->I R@1 (ITM)", "itm_text_retrieval_recall@1": "I->T R@1 (ITM)",
}


def student_signals(teacher: Any) -> frozenset[str]:
    """The signals a student distilled from `teacher` can return: a teacher that builds students of its own
    kind (contract.BuildsStudents, e.g. BLIP) declares them (`signal_names`); any other teacher's student is
    a CLIP (the dual-encoder signals)."""
    if not isinstance(teacher, BuildsStudents):
        return DUAL_ENCODER_SIGNALS
    names = getattr(teacher, "signal_names", None)
    if names is None:
        raise ValueError(f"a {type(teacher).__name__} teacher builds its own students but declares no signal_names; "
                         "vldistill sweep cannot tell which losses they can train with")
    return frozenset(names)


def task_losses(signals: frozenset[str] = DUAL_ENCODER_SIGNALS) -> dict[str, dict[str, Any]]:
    """How a student returning `signals` trains without a teacher: the CLIP loss, with image-text matching
    beside it when the student has an ITM head (BLIP's ITC + ITM)."""
    losses = {TASK_LOSS: {"weight": 1.0}}
    if "itm_logits" in signals:
        losses[ITM_TASK_LOSS] = {"weight": 1.0}
    return losses


def missing_signals(losses: Mapping[str, Mapping[str, Any]], signals: frozenset[str], where: str) -> list[str]:
    """The signals the `losses` (with their options) read from the teacher or the student that a student
    returning `signals` (and a teacher of its kind) does not return, sorted."""
    specs = parse_loss_specs(losses, where)
    read = frozenset().union(*(spec.needs | LOSSES.get(spec.name).student_needs for spec in specs))
    return sorted(read - signals)


def trainable_losses(signals: frozenset[str] = DUAL_ENCODER_SIGNALS) -> list[str]:
    """The registered losses (with their default options) a student returning `signals` can train with:
    for a CLIP student those of dual encoders, for a BLIP retrieval student those and the ITM and fusion
    ones, never the captioning ones."""
    return [name for name in LOSSES.names() if not missing_signals({name: {}}, signals, "losses")]


def baseline_name(signals: frozenset[str] = DUAL_ENCODER_SIGNALS) -> str:
    """The name of the run of the task losses alone ("clip"; "clip+itm" for a BLIP retrieval student)."""
    return "+".join(task_losses(signals))


def sweep_runs(
    cfg: ExperimentConfig, signals: frozenset[str] = DUAL_ENCODER_SIGNALS
) -> dict[str, dict[str, dict[str, Any]]]:
    """Run name -> losses for a student returning `signals`: the task losses alone (`task_losses`), each
    selected loss (`sweep.losses`; empty: every loss such a student can train with) beside them (a loss
    needing no teacher, such as siglip, in the CLIP loss's place), then the named combinations. A selected
    loss or combination reading signals the student lacks is a ValueError naming it."""
    task = task_losses(signals)
    runs: dict[str, dict[str, dict[str, Any]]] = {baseline_name(signals): task}
    for name in cfg.sweep.losses or trainable_losses(signals):
        if name in task:
            continue
        params = {"weight": 1.0, **cfg.sweep.loss_params.get(name, {})}
        missing = missing_signals({name: params}, signals, "sweep.loss_params")
        if missing:
            raise ValueError(f"sweep.losses: {name} reads {', '.join(missing)}, which this student does not return")
        if LOSSES.get(name).needs:
            runs[name] = {**{k: dict(v) for k, v in task.items()}, name: params}
        else:
            runs[name] = {**{k: dict(v) for k, v in task.items() if k != TASK_LOSS}, name: params}
    for name, losses in cfg.sweep.combinations.items():
        missing = missing_signals(losses, signals, f"sweep.combinations.{name}")
        if missing:
            raise ValueError(
                f"sweep.combinations.{name} reads {', '.join(missing)}, which this student does not return"
            )
        runs[name] = dict(losses)
    return runs


def _metric_keys(record: Mapping[str, Any]) -> list[str]:
    """The metric keys a per-seed or summarized record holds, in METRIC_KEYS order."""
    return [key for key in METRIC_KEYS if key in record]


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _spread(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return max(present) - min(present) if present else None


def summarize_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each metric over seeds, its spread (max - min; 0 for one seed), both over the seeds that
    measured it (None when none did, e.g. ITM re-ranking of a model without an ITM head), and the mean
    seconds."""
    keys = _metric_keys(per_seed[0])
    return {
        **{key: _mean([r.get(key) for r in per_seed]) for key in keys},
        "spread": {key: _spread([r.get(key) for r in per_seed]) for key in keys},
        "seconds": statistics.fmean(r["seconds"] for r in per_seed),
        "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in per_seed),
    }


def compare_to(record: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """`record`'s mean minus `reference`'s for each metric both hold (None where either is None), and whether
    that difference is larger than the seed-to-seed spread of either (None with a single seed: no spread was
    measured)."""
    seeds = len(record["per_seed"])
    keys = [key for key in _metric_keys(record) if key in reference]
    minus = {
        key: None if record[key] is None or reference[key] is None else record[key] - reference[key] for key in keys
    }
    beyond = {
        key: None if seeds < 2 or minus[key] is None
        else abs(minus[key]) > max(record["spread"][key], reference["spread"][key])
        for key in keys
    }
    return {"minus_task_loss": minus, "beyond_spread": beyond}


def _cell(record: dict[str, Any], key: str) -> str:
    if record.get(key) is None:
        return "-"
    if len(record.get("per_seed", ())) < 2:
        return f"{record[key]:.3f}"
    return f"{record[key]:.3f} ±{record['spread'][key] / 2:.3f}"


def _delta(record: dict[str, Any], keys: Sequence[str]) -> str:
    if "minus_task_loss" not in record or record["name"] == record.get("baseline", TASK_LOSS):
        return "-"
    marks = []
    for key in keys:
        minus = record["minus_task_loss"].get(key)
        marks.append("-" if minus is None else f"{minus:+.3f}{'*' if record['beyond_spread'][key] else ''}")
    return " / ".join(marks)


def describe_loss(name: str, spec: dict[str, Any]) -> str:
    """A loss as the table shows it: its weight when not 1 ("2·feature") and its temperature when set
    ("kd (T=2)", "kd (T=cosine 5 -> 1)")."""
    weight = spec.get("weight", 1.0)
    text = name if weight == 1 else f"{describe_schedule(weight)}·{name}"
    if "temperature" in spec:
        text += f" (T={describe_schedule(spec['temperature'])})"
    return text


def describe_params(record: dict[str, Any]) -> str:
    """A student's size as the table shows it: "21,072 (24.1%)" (parameters and % of the teacher's)."""
    if record.get("params") is None:
        return "-"
    share = record.get("params_percent_of_teacher")
    return f"{record['params']:,}" + ("" if share is None else f" ({share:.1f}%)")


def format_ablation_table(records: list[dict]) -> str:
    """A Markdown table of the sweep: (with student variants: the variant and its parameters as % of the
    teacher's,) losses, metrics (mean ± half the spread over seeds when there are several; ITM re-ranked R@1
    when measured), the difference to the task losses alone of the same student (* where it exceeds the
    spread), seconds per run and cost per step relative to `kd`."""
    variants = any("variant" in r for r in records)
    keys = [*SUMMARY_KEYS, *(k for k in ITM_SUMMARY_KEYS if any(r.get(k) is not None for r in records))]
    baseline = next((r["baseline"] for r in records if "baseline" in r), TASK_LOSS)
    labels = " / ".join(METRIC_LABELS[k].replace(" R@1", "") for k in keys)
    head = ["variant", "params (% teacher)"] if variants else []
    lines = [
        "| " + " | ".join([*head, "run", "losses", *(METRIC_LABELS[k] for k in keys),
                            f"vs {baseline} alone ({labels})", "seconds", "cost/step vs kd"]) + " |",
        "|" + "---|" * (len(head) + 2) + "---:|" * (len(keys) + 3),
    ]
    for r in records:
        losses = " + ".join(describe_loss(name, spec) for name, spec in r["losses"].items())
        relative = f"{r['cost_vs_kd']:.2f}" if r.get("cost_vs_kd") is not None else "-"
        cells = [str(r.get("variant")), describe_params(r)] if variants else []
        cells += [r["name"], losses, *(_cell(r, k) for k in keys), _delta(r, keys), f"{r['seconds']:.1f}", relative]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _with_comparisons(records: list[dict]) -> list[dict]:
    """Each record compared with the task-loss run of its own student variant (and its cost per step with
    that variant's `kd` run)."""
    for variant in dict.fromkeys(r.get("variant") for r in records):
        group = [r for r in records if r.get("variant") == variant]
        kd = next((r for r in group if r["name"] == "kd"), None)
        task = next((r for r in group if r["name"] == r["baseline"]), None)
        for r in group:
            r["cost_vs_kd"] = r["seconds_per_step"] / kd["seconds_per_step"] if kd else None
            if task is not None:
                r.update(compare_to(r, task))
    return records


def student_variants(cfg: ExperimentConfig) -> dict[Optional[str], ExperimentConfig]:
    """The config of each student variant (`sweep.students`: its spec as `student.model`), or {None: cfg}
    when the sweep names none."""
    specs = cfg.sweep.student_specs(cfg.student.model)
    if not specs:
        return {None: cfg}
    return {
        name: dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, model=spec))
        for name, spec in specs.items()
    }


def measured(summary: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """The figures of a model's evaluation summary the sweep compares: SUMMARY_KEYS, and the ITM re-ranked
    R@1 when the model has an ITM head (evaluate_model reports None otherwise)."""
    return {key: summary.get(key) for key in METRIC_KEYS if key in SUMMARY_KEYS or summary.get(key) is not None}


def run_sweep(cfg: ExperimentConfig, out_dir: Path, progress: bool = True) -> dict:
    """Distill one student per student variant, sweep run and seed from a shared teacher, evaluate each and
    write `out_dir/ablation.json` after every run (so a stopped sweep keeps what it finished). Students are
    saved to `out_dir/runs/[<variant>/]<run>/seed<seed>`, result records of the teacher and of each
    `[<variant>-]<run>-seed<seed>` to `out_dir/results`; at the end `summary.json` (every model's figures)
    and `report.html`."""
    start_sweep = time.perf_counter()
    out_dir = Path(out_dir)
    data = load_data(cfg.data, progress=progress)
    teacher = obtain_teacher(cfg, data, out_dir / "teacher", out_dir / "logs", progress)
    signals = student_signals(teacher.model)
    runs, baseline = sweep_runs(cfg, signals), baseline_name(signals)
    variants = student_variants(cfg)
    results_dir = out_dir / "results"
    models = {"teacher": evaluate_model(
        teacher.model, teacher.tokenizer, data, cfg.eval, "teacher", results_dir, progress, throughput=False
    )["summary"]}
    teacher_params = models["teacher"]["params"]
    records: list[dict] = []
    result: dict = {}
    for variant, variant_cfg in variants.items():
        for name, losses in runs.items():
            label = name if variant is None else f"{variant}-{name}"
            folder = out_dir / "runs" / name if variant is None else out_dir / "runs" / variant / name
            per_seed, params = [], None
            for seed in cfg.sweep.seeds:
                seeded = dataclasses.replace(variant_cfg, seed=seed)
                start = time.perf_counter()
                student = train_student(
                    seeded, data, teacher, folder / f"seed{seed}", losses=losses,
                    desc=f"sweep {label} seed {seed}", log_path=out_dir / "logs" / f"{label}-seed{seed}.jsonl",
                    progress=progress,
                )
                seconds = time.perf_counter() - start
                summary = evaluate_model(
                    student.model, student.tokenizer, data, cfg.eval, f"{label}-seed{seed}", results_dir, progress,
                    throughput=False,
                )["summary"]
                models[f"{label}-seed{seed}"] = summary
                metrics = measured(summary)
                write_card(student.path, metrics, data.name, f"{label}-seed{seed}")
                params = summary["params"]
                per_seed.append({
                    "seed": seed, **metrics, "seconds": seconds,
                    "seconds_per_step": student.result.seconds / student.result.steps,
                })
            records.append({
                **({} if variant is None else {"variant": variant}),
                "name": name, "baseline": baseline, "losses": losses,
                "params": params,
                "params_percent_of_teacher": 100 * params / teacher_params if teacher_params else None,
                **summarize_seeds(per_seed), "per_seed": per_seed,
            })
            result = {
                "dataset": data.name,
                "teacher": str(teacher.path),
                "teacher_params": teacher_params,
                "steps": cfg.distill.train.steps,
                "train_pairs": cfg.distill.train_pairs or len(data.train),
                "seeds": cfg.sweep.seeds,
                "inherit": cfg.student.inherit,
                "retrieval_match": cfg.eval.retrieval_match,
                **({} if None in variants else {
                    "students": {v: dataclasses.asdict(c.student.model) for v, c in variants.items()}
                }),
                "runs": _with_comparisons(records),
            }
            write_text_atomic(out_dir / "ablation.json", json.dumps(result, indent=2) + "\n")
    summary = {
        "command": "sweep", "wall_seconds": time.perf_counter() - start_sweep, "models": models,
        **{key: result[key] for key in ("dataset", "teacher", "steps", "train_pairs", "seeds", "retrieval_match")},
    }
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_run_report(out_dir)
    return result
