"""Reports of finished runs: ``report.md`` and its plots, rendered from the run directory's files alone."""

from alambic.report.markdown import render_report

__all__ = ["render_report"]
