"""Reporting: model cards and printed summaries."""
