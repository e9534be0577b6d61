"""The HTML report of run folders: one self-contained page (figures embedded) that draws what the runs'
logs, summaries and result records hold."""

from vldistill.report.page import REPORT_FILE, Report, build_report, write_report, write_run_report
from vldistill.report.run import Run, read_run, read_runs

__all__ = ["REPORT_FILE", "Report", "Run", "build_report", "read_run", "read_runs", "write_report", "write_run_report"]
