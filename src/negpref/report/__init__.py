"""Plots (PNG) and one self-contained HTML report per run (images inlined, no network)."""

from negpref.report.html import Section, render_html, write_html_report

__all__ = ["Section", "render_html", "write_html_report"]
