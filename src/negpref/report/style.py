"""Line styles that tell curves apart without colour: a marker (and dash pattern) per curve."""

from __future__ import annotations

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", "-.", ":")


def curve_style(index: int, n_points: int, dashes: bool = True) -> dict:
    """Matplotlib ``plot`` keywords for the ``index``-th curve of ``n_points`` points: its own
    marker, about eight per curve, and (with ``dashes``) its own dash pattern."""
    style = {"marker": MARKERS[index % len(MARKERS)], "markevery": max(1, n_points // 8), "ms": 4}
    if dashes:
        style["linestyle"] = DASHES[index % len(DASHES)]
    return style
