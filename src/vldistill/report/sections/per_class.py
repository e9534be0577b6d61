"""Per-class zero-shot accuracy of the teacher against a student (the `per_class` entry of the zero-shot
classification records), with the classes the student lost most marked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from vldistill.report.markup import Markup, escape, figure, number, paragraph, signed, table
from vldistill.report.plots import new_figure, to_png
from vldistill.report.run import Run
from vldistill.report.section import Section, run_heading

TASK = "zeroshot_classification"
MARKED = 5  # classes annotated on the plot
LISTED = 10  # classes in the table


@dataclass
class ClassPair:
    """One class: its name, test samples, and the teacher's and the student's top-1 accuracy on it."""

    name: str
    samples: int
    teacher: float
    student: float

    @property
    def loss(self) -> float:
        """How many points of accuracy the student lost on the class against the teacher."""
        return self.teacher - self.student


def per_class(record: Optional[dict[str, Any]]) -> Optional[dict[str, dict[str, Any]]]:
    """Class name -> its entry of a classification record's `per_class` (None when not recorded)."""
    entries = (record or {}).get("per_class")
    if not isinstance(entries, list):
        return None
    return {str(entry["class"]): entry for entry in entries if isinstance(entry, dict) and "class" in entry}


def choose_student(run: Run) -> Optional[str]:
    """The student to compare with the teacher: `student` when the run has one, else the non-teacher model with
    the best acc1 (a sweep's best run); preferring models whose records hold per-class figures."""
    records = {name: tasks[TASK] for name, tasks in run.results.items() if name != "teacher" and TASK in tasks}
    candidates = {name: record for name, record in records.items() if per_class(record)} or records
    if "student" in candidates:
        return "student"
    if not candidates:
        return None
    return max(candidates, key=lambda name: candidates[name]["metrics"].get("acc1", float("-inf")))


def pair_classes(teacher: dict[str, dict[str, Any]], student: dict[str, dict[str, Any]]) -> list[ClassPair]:
    """The classes both measured on at least one sample, largest loss first (ties by name)."""
    pairs = []
    for name, entry in teacher.items():
        other = student.get(name)
        if other is None or entry.get("acc1") is None or other.get("acc1") is None:
            continue
        pairs.append(ClassPair(name, int(entry.get("samples", 0)), float(entry["acc1"]), float(other["acc1"])))
    return sorted(pairs, key=lambda pair: (-pair.loss, pair.name))


def per_class_png(pairs: Sequence[ClassPair], student: str, marked: int = MARKED) -> bytes:
    """Teacher accuracy (x) against student accuracy (y) per class, the diagonal where they are equal, the
    `marked` largest losses in red and named."""
    fig = new_figure(6.4, 5.2)
    ax = fig.subplots()
    worst = [pair for pair in pairs[:marked] if pair.loss > 0]
    rest = pairs[len(worst):]
    ax.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--", label="student = teacher")
    ax.scatter([p.teacher for p in rest], [p.student for p in rest], s=[8 + 4 * p.samples for p in rest],
               alpha=0.4, color="tab:blue", label="classes (size: samples)")
    if worst:
        ax.scatter([p.teacher for p in worst], [p.student for p in worst], s=[8 + 4 * p.samples for p in worst],
                   color="tab:red", label=f"the {len(worst)} largest losses")
        for pair in worst:
            ax.annotate(pair.name, (pair.teacher, pair.student), textcoords="offset points", xytext=(-4, -10),
                        ha="right", fontsize=7, color="tab:red")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("teacher top-1 accuracy on the class")
    ax.set_ylabel(f"{student} top-1 accuracy on the class")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return to_png(fig)


def _run_block(run: Run, runs: Sequence[Run], id_: str) -> tuple[list[Markup], int]:
    teacher_record = run.results.get("teacher", {}).get(TASK)
    name = choose_student(run)
    if teacher_record is None or name is None:
        return [], 0
    teacher, student = per_class(teacher_record), per_class(run.results[name][TASK])
    if teacher is None or student is None:
        return [paragraph(f"{run.label}: the classification records of the teacher and {name} hold no per-class "
                          "accuracy (written by an older vldistill)", class_="note")], 0
    pairs = pair_classes(teacher, student)
    if not pairs:
        return [], 0
    lost = sum(pair.loss > 0 for pair in pairs)
    gained = sum(pair.loss < 0 for pair in pairs)
    summary = paragraph(
        f"{len(pairs)} classes: {name} is below the teacher on {lost}, above on {gained}, equal on "
        f"{len(pairs) - lost - gained}."
    )
    rows = [[p.name, number(p.samples), number(p.teacher), number(p.student),
             signed(p.student - p.teacher, class_="loss" if p.loss > 0 else None)] for p in pairs[:LISTED]]
    caption = f"per-class zero-shot accuracy, teacher against {name}; red: the largest losses"
    return [run_heading(run, runs), figure(per_class_png(pairs, name), caption), summary,
            table(["class", "samples", "teacher", name, f"{name} - teacher"], rows, id_=id_,
                  caption=f"{min(LISTED, len(pairs))} classes, the largest losses of {name} first")], 1


def per_class_section(runs: Sequence[Run]) -> Optional[Section]:
    """Per run with a teacher and a student classification record: the scatter and the largest losses."""
    body: list[Markup] = []
    count = 0
    for run in runs:
        blocks, figures = _run_block(run, runs, "class-losses" if count == 0 else f"class-losses-{count}")
        body += blocks
        count += figures
    if not body:
        return None
    return Section("per-class", "Per-class zero-shot accuracy", escape(body), count)
