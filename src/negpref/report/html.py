"""A self-contained HTML report: headings, text, tables and PNG figures inlined as data URIs.

The page references nothing outside itself (no scripts, fonts or stylesheets from the
network), so it opens offline and can be archived next to the run. Figures are shown at the
full width of the page (never wider than their own pixels), and every figure is also a PNG
file beside the report, which the figure links to (to zoom, or to use elsewhere).
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from negpref.io import atomic_write_bytes, atomic_write_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: block; margin: 1em 0; } img { display: block; max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; } pre { background: #f6f6f6; padding: 0.6em; }
p.notice { background: #fff3cd; border: 1px solid #e0c36b; padding: 0.5em 0.8em; }
"""


@dataclass
class Section:
    """One part of the report: a heading, paragraphs, tables, figures, preformatted text."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    # each table: (column names, rows); numbers are formatted, strings escaped
    tables: list[tuple[list[str], list[list]]] = field(default_factory=list)
    figures: list[tuple[str | os.PathLike | bytes, str]] = field(
        default_factory=list
    )  # (png, caption)
    preformatted: list[str] = field(default_factory=list)


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
        return f'<td class="num">{text}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _png_uri(png: str | os.PathLike | bytes) -> str:
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _png_bytes(png: str | os.PathLike | bytes) -> bytes:
    return png if isinstance(png, bytes) else Path(png).read_bytes()


def render_html(
    title: str,
    sections: list[Section],
    figure_files: list[str] | None = None,
    notice: str | None = None,
) -> str:
    """The page. ``figure_files``: per figure in order, the PNG file (relative to the page) it
    links to; ``notice``: a highlighted line under the title (e.g. a ``--quick`` run)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if notice:
        parts.append(f'<p class="notice">{html.escape(notice)}</p>')
    links = iter(figure_files or [])
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
        for columns, rows in section.tables:
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
            body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        for png, caption in section.figures:
            img = f'<img src="{_png_uri(png)}" alt="{html.escape(caption)}">'
            link = next(links, None)
            if link is not None:
                img = f'<a href="{html.escape(link)}">{img}</a>'
                caption = f"{caption} ({link})"
            parts.append(f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts += [f"<pre>{html.escape(t)}</pre>" for t in section.preformatted]
    parts.append("</body></html>")
    return "\n".join(parts)


def save_figures(folder: Path, stem: str, sections: list[Section]) -> list[str]:
    """Every figure as a PNG in ``folder``: one already there (same bytes) is reused, the others
    are written as ``{stem}-figure-NN.png``. Returns the file names, in figure order."""
    existing = {p.read_bytes(): p.name for p in sorted(folder.glob("*.png")) if p.is_file()}
    names = []
    figures = [png for section in sections for png, _ in section.figures]
    for number, png in enumerate(figures, start=1):
        data = _png_bytes(png)
        name = existing.get(data)
        if name is None:
            name = f"{stem}-figure-{number:02d}.png"
            atomic_write_bytes(folder / name, data)
            existing[data] = name
        names.append(name)
    return names


def write_html_report(
    path: str | os.PathLike, title: str, sections: list[Section], notice: str | None = None
) -> Path:
    """Render and write atomically, every figure also saved as a PNG beside it; returns the
    path. ``notice`` is highlighted under the title."""
    path = Path(path)
    figure_files = save_figures(path.parent, path.stem, sections)
    atomic_write_text(path, render_html(title, sections, figure_files, notice))
    return path
