"""The demo's tables in the README and docs/demo.md, written from a run's ``summary.json``.

    python -m negpref.studies.demo.tables runs/demo/summary.json README.md docs/demo.md

rewrites every marked region ``<!-- demo:NAME -->`` ... ``<!-- /demo:NAME -->`` of the given
files (NAME one of ``REGIONS``), so the numbers a reader sees are those of a real run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from negpref.errors import NegprefError
from negpref.io import atomic_write_text
from negpref.studies.demo.report import format_spread

_REGION = re.compile(r"(<!-- demo:([a-z-]+) -->\n)(.*?)(<!-- /demo:\2 -->)", re.DOTALL)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(columns: list[str], rows: list[list]) -> str:
    lines = [_row(columns), _row(["---"] * len(columns)), *(_row(r) for r in rows)]
    return "\n".join(lines) + "\n"


def _references(summary: dict) -> list[tuple[str, dict]]:
    return [("target (before)", summary["target"]), ("retain (gold)", summary["retain"])]


def short_table(summary: dict) -> str:
    """The README's: each method at its peak-forget-quality epoch and after the last one."""
    rows = [
        [label, format_spread(ref["forget_quality"]), format_spread(ref["model_utility"]), "", ""]
        for label, ref in _references(summary)
    ]
    for name, m in summary["methods"].items():
        final = m["final"]
        rows.append(
            [
                name,
                format_spread(m["forget_quality"]),
                format_spread(m["model_utility"]),
                f"{format_spread(final['forget_quality'])} / "
                f"{format_spread(final['model_utility'])}",
                format_spread(final["forget_kl"]),
            ]
        )
    columns = ["model", "forget quality", "model utility", "final FQ / MU", "final forget KL"]
    return _table(columns, rows)


def full_table(summary: dict) -> str:
    """docs/demo.md's: adds the peak epoch and the best epoch keeping 90% of the utility."""
    rows = [
        [label, format_spread(ref["forget_quality"]), format_spread(ref["model_utility"])]
        + [""] * 5
        for label, ref in _references(summary)
    ]
    for name, m in summary["methods"].items():
        final, kept = m["final"], m["utility_kept"]
        missing = sum(v is None for v in kept["forget_quality"]["values"])
        rows.append(
            [
                name,
                format_spread(m["forget_quality"]),
                format_spread(m["model_utility"]),
                format_spread(m["peak_epoch"]),
                format_spread(final["forget_quality"]),
                format_spread(final["model_utility"]),
                format_spread(final["forget_kl"]),
                f"{format_spread(kept['forget_quality'])} ({format_spread(kept['epoch'])})"
                + (f", none in {missing} seeds" if missing else ""),
            ]
        )
    columns = [
        "model", "forget quality", "model utility", "peak epoch", "final FQ", "final MU",
        "final forget KL", "FQ with 90% MU kept (epoch)",
    ]  # fmt: skip
    return _table(columns, rows)


def _pair(record: dict) -> str:
    return f"{record['forget_quality']:.3g} / {record['model_utility']:.3g}"


def per_seed_table(summary: dict) -> str:
    """Forget quality / model utility of every model in every seed."""
    runs = summary["per_seed"]
    rows = [
        [label, *(_pair(run[key]) for run in runs)]
        for key, label in (("target", "target (before)"), ("retain", "retain (gold)"))
    ]
    rows += [[name, *(_pair(run["methods"][name]) for run in runs)] for name in summary["methods"]]
    return _table(["model (FQ / MU)", *(f"seed {run['seed']}" for run in runs)], rows)


def findings_table(summary: dict) -> str:
    """Each paper claim: its verdict over the seeds and the outcome in each seed."""
    seeds = summary["seeds"]
    rows = [
        [
            f["claim"],
            f"**{f['verdict']}** ({f['holds_in']} of {f['seeds']})",
            *("holds" if o["holds"] else "does not hold" for o in f["per_seed"]),
        ]
        for f in summary["findings"]
    ]
    return _table(["claim", f"over {len(seeds)} seeds", *(f"seed {s}" for s in seeds)], rows)


def environment_text(summary: dict) -> str:
    """The command, versions, threads and time the tables come from."""
    env, timing = summary["environment"], summary["timing"]
    packages = ", ".join(f"{name} {version}" for name, version in env["packages"].items())
    cache = "models from the cache" if timing["cached"] else "an empty model cache"
    return (
        f"`{summary['command']}` (seeds {' '.join(str(s) for s in summary['seeds'])}; "
        f"{summary['spread']}); verdicts: {summary['verdict_rule']}. Environment: python "
        f"{env['python']}, {packages}; {env['torch_threads']} torch thread per process, "
        f"{env['jobs']} worker processes, {env['cpu']} (torch CPU capability "
        f"{env['cpu_capability']}). Wall time "
        f"{timing['total_s']:.0f} s with {cache} (models {timing['models_s']:.0f} s, "
        f"unlearning and evaluation {timing['unlearn_s']:.0f} s).\n"
    )


REGIONS = {
    "table": short_table,
    "full-table": full_table,
    "per-seed": per_seed_table,
    "findings": findings_table,
    "environment": environment_text,
}


def rewrite_regions(text: str, summary: dict, source: str) -> str:
    """``text`` with every demo region's content regenerated from ``summary``."""
    unknown = sorted({m.group(2) for m in _REGION.finditer(text)} - set(REGIONS))
    if unknown:
        raise NegprefError(
            f"{source}: unknown demo region(s) {', '.join(unknown)}; known: {', '.join(REGIONS)}"
        )
    if not _REGION.search(text):
        raise NegprefError(f"{source}: no <!-- demo:NAME --> ... <!-- /demo:NAME --> region")
    return _REGION.sub(lambda m: m.group(1) + REGIONS[m.group(2)](summary) + m.group(4), text)


def _load_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NegprefError(f"{path}: not a readable summary.json ({e})") from e
    if "per_seed" not in summary:
        raise NegprefError(f"{path}: no per_seed field; write it with the multi-seed negpref demo")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", type=Path, help="summary.json of a negpref demo run")
    parser.add_argument("files", type=Path, nargs="+", help="Markdown files with demo regions")
    args = parser.parse_args(argv)
    try:
        summary = _load_summary(args.summary)
        rewritten = {
            path: rewrite_regions(path.read_text(encoding="utf-8"), summary, str(path))
            for path in args.files
        }
    except NegprefError as e:
        print(f"demo_tables: error: {e}", file=sys.stderr)
        return 2
    for path, text in rewritten.items():
        atomic_write_text(path, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
