"""The report page: every section the runs have, in a fixed order, assembled into one self-contained HTML
file (inline style, figures as PNG data URIs, no script and nothing fetched from elsewhere)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from vldistill import __version__
from vldistill.fileio import write_text_atomic
from vldistill.report.markup import Markup, tag
from vldistill.report.run import Run, read_runs
from vldistill.report.section import Section
from vldistill.report.sections.arms import arms_section
from vldistill.report.sections.cascade import cascade_section
from vldistill.report.sections.config import config_section
from vldistill.report.sections.curves import curves_section
from vldistill.report.sections.exports import exports_section
from vldistill.report.sections.per_class import per_class_section
from vldistill.report.sections.profile import profile_section
from vldistill.report.sections.quantize import quantize_section
from vldistill.report.sections.retrieval import retrieval_section
from vldistill.report.sections.sweep import sweep_section
from vldistill.report.sections.tradeoff import tradeoff_section

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
SECTIONS: tuple[Callable[[Sequence[Run]], Optional[Section]], ...] = (
    arms_section, tradeoff_section, curves_section, per_class_section, retrieval_section, sweep_section,
    profile_section, quantize_section, exports_section, cascade_section, config_section,
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
nav ul { columns: 2; } table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; } th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.loss { color: #b00; font-weight: bold; }
td.beyond { font-weight: bold; } caption { text-align: left; font-style: italic; padding: .3em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; } .note { font-size: .85em; color: #555; }
.ok { color: #060; } .refused { color: #b00; font-weight: bold; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
"""


@dataclass
class Report:
    """A rendered report: the page and what it holds."""

    html: str
    sections: list[Section]

    @property
    def figures(self) -> int:
        """How many figures the page embeds."""
        return sum(section.figures for section in self.sections)


def build_sections(runs: Sequence[Run]) -> list[Section]:
    """Every section the runs have something for, in the page's order."""
    return [section for build in SECTIONS if (section := build(runs)) is not None]


def assemble(runs: Sequence[Run], sections: Sequence[Section]) -> str:
    """The HTML page: a title naming the runs, a table of contents, the sections."""
    labels = ", ".join(run.label for run in runs)
    title = f"vldistill report: {labels}"
    header = [
        tag("h1", title),
        tag("p", f"{len(runs)} run folder{'s' if len(runs) != 1 else ''}: "
                 + ", ".join(str(run.path) for run in runs)
                 + f". Made by vldistill {__version__} on {time.strftime('%Y-%m-%d %H:%M:%S')}.", class_="note"),
        tag("nav", tag("ul", [tag("li", tag("a", s.title, href=f"#{s.id}")) for s in sections])),
    ]
    if not sections:
        header.append(tag("p", "The run folders hold nothing to report yet."))
    body = [tag("section", [tag("h2", s.title), s.body], id=s.id) for s in sections]
    return (
        "<!DOCTYPE html>\n"
        + tag("html", [
            Markup('<head><meta charset="utf-8">'
                   '<meta name="viewport" content="width=device-width, initial-scale=1">'),
            tag("title", title), tag("style", Markup(STYLE)), Markup("</head>"),
            tag("body", [*header, *body]),
        ], lang="en")
        + "\n"
    )


def build_report(run_dirs: Sequence[str | Path]) -> Report:
    """Read the run folders and render their report (see `SECTIONS` for what it shows)."""
    runs = read_runs(run_dirs)
    sections = build_sections(runs)
    return Report(assemble(runs, sections), sections)


def write_report(run_dirs: Sequence[str | Path], out: str | Path) -> Report:
    """Render the report of the run folders and write it to `out` atomically."""
    report = build_report(run_dirs)
    write_text_atomic(out, report.html)
    return report


def write_run_report(run_dir: str | Path) -> Optional[Path]:
    """Write `run_dir/report.html` at the end of a command. The run's results are already saved, so a report
    that fails to render is logged (with the command that retries it) rather than failing the run; the path
    written, or None."""
    out = Path(run_dir) / REPORT_FILE
    try:
        report = write_report([run_dir], out)
    except Exception:  # the report only reads what the run saved; losing it must not lose the run
        logger.exception("could not write %s; the run's results are saved: retry with `vldistill report %s`", out, run_dir)
        return None
    logger.info("wrote %s (%d sections, %d figures, %d bytes)", out, len(report.sections), report.figures,
                len(report.html.encode("utf-8")))
    return out
