"""The resolved config of each run (`config.yaml`, as the command saved it)."""

from __future__ import annotations

from typing import Optional, Sequence

from vldistill.report.markup import Markup, details, escape, preformatted
from vldistill.report.run import CONFIG_FILE, Run
from vldistill.report.section import Section


def config_section(runs: Sequence[Run]) -> Optional[Section]:
    """The config of every run that saved one, shown as written (collapsed when there are several runs)."""
    blocks = [
        details(f"{CONFIG_FILE} of {run.label}", preformatted(run.config_text), open_=len(runs) == 1)
        for run in runs if run.config_text is not None
    ]
    if not blocks:
        return None
    return Section("config", "Resolved config", escape([Markup(b) for b in blocks]))
