"""Every report writer's page in headless Chromium: figures at page width, PNGs beside it.

Reports are built from tiny runs or hand-made results (seconds each); the demo report is
checked in ``test_demo.py`` the same way (``browser.assert_figures_readable``).
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from browser import assert_figures_readable
from negpref.align.config import AlignConfig
from negpref.align.run import write_report
from negpref.cli import main
from negpref.report import Section, write_html_report
from negpref.studies.u2a_toy import ablation_report
from negpref.training.run_log import RunLog
from negpref.u2a.report import run_sections

matplotlib.use("Agg")

pytestmark = pytest.mark.usefixtures("one_thread")


def png(width_in: float, height_in: float = 3.0, dpi: int = 100) -> bytes:
    fig, ax = plt.subplots(figsize=(width_in, height_in))
    ax.plot([0, 1, 2], [1, 0, 2])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def test_wide_and_narrow_figures_and_the_png_files(tmp_path):
    wide, narrow = png(18), png(4)  # 1800 px and 400 px
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "already.png").write_bytes(narrow)
    sections = [Section("A", figures=[(wide, "wide"), (narrow, "narrow"), (wide, "again")])]
    report = write_html_report(folder / "report.html", "t", sections, notice="--quick run")
    view = assert_figures_readable(report, tmp_path, n_figures=3)
    (w_natural, _, w_shown, room), (n_natural, _, n_shown, _), _ = view["images"]
    assert w_natural == 1800 and w_shown == room  # scaled to the page, not to 520 px
    assert n_natural == n_shown == 400  # a small figure keeps its own size
    # one file per distinct figure; an identical PNG already there is linked, not copied
    assert sorted(p.name for p in folder.glob("*.png")) == ["already.png", "report-figure-01.png"]
    assert '<p class="notice">--quick run</p>' in report.read_text()


def test_synthetic_reports(tmp_path, capsys):
    small = ["--instances", "1", "--steps", "10", "--fit-steps", "100"]
    runs = {
        "figure4": (["--alpha", "1", "--methods", "GA", "NPO", "IDK+RT", *small], 2),
        "beta-sweep": (["--betas", "0.1", "1", *small], 2),
        "divergence": (["--steps", "50"], 1),
    }
    for study, (args, n_figures) in runs.items():
        out = tmp_path / study
        assert main(["synthetic", study, *args, "--out", str(out)]) == 0, capsys.readouterr()
        assert_figures_readable(out / "report.html", tmp_path, n_figures)


def test_u2a_synthetic_report(tmp_path):
    out = tmp_path / "u2a"
    assert main(["u2a", "synthetic", "--seeds", "0", "--out", str(out)]) == 0
    assert_figures_readable(out / "report.html", tmp_path, n_figures=2)


def test_u2a_run_and_ablation_reports(tmp_path):
    rng = np.random.default_rng(0)
    gains = rng.normal(0, 1, 30).tolist()
    log = [
        {"round": r, "set_size": 2 + r, "objective": 0.1 * r, "g": -0.1 * r, "accepted": r != 2}
        for r in range(5)
    ]
    result = SimpleNamespace(
        selected=[3, 7, 11],
        weights=[0.5, 0.3, 0.2],
        initial_gains=gains,
        objective_initial=0.0,
        objective_final=0.4,
        stop_reason="no gain",
        log=log,
    )
    labels = [f"sample {i}" for i in range(30)]
    for name in ("run", "ablation"):
        (tmp_path / name).mkdir()
    run = write_html_report(
        tmp_path / "run" / "report.html", "u2a", run_sections(result, labels, {})
    )
    assert_figures_readable(run, tmp_path, n_figures=3)

    def stat(mean):
        return {"mean": mean, "std": 0.05, "well_formed": 0.9}

    ablation = {
        "rows": [{"k": k, "top_k": stat(0.5 + 0.05 * k), "random_k": stat(0.4)} for k in (2, 4, 8)],
        "kinds": ["mostly_bad" if i % 3 else "mostly_good" for i in range(30)],
        "gains": gains,
        "mostly_bad_in_top": {2: 2, 4: 3, 8: 6},
        "u2a": [],
        "base_reward": stat(0.3),
        "all_negatives": stat(0.35),
        "n_candidates": 30,
        "objective": "reward",
        "loss": "GA",
        "inner_steps": 10,
        "seeds": [0],
        "gain_concentration": {"top 10%": 0.4},
    }
    sections, _ = ablation_report(ablation, {})
    report = write_html_report(tmp_path / "ablation" / "report.html", "ablation", sections)
    assert_figures_readable(report, tmp_path, n_figures=2)


def test_align_reports(tmp_path, capsys):
    out = tmp_path / "constraints"
    argv = ["align", "constraint-study", "--out", str(out), "--prompts", "2", "--responses", "2"]
    assert main(argv) == 0
    assert_figures_readable(out / "report.html", tmp_path, n_figures=2)

    steps = [
        {"step": s, "loss": 0.7 - 0.01 * s, "rewards/margins": 0.02 * s,
         "rewards/accuracies": min(1.0, 0.5 + 0.02 * s), "logps/chosen": -30.0 + 0.1 * s}
        for s in range(1, 21)
    ]  # fmt: skip
    history = RunLog(tmp_path, is_main=False, keep_through=-1)
    history.metrics = steps
    history.evals = [{"step": 0, "reward": 0.1}, {"step": 20, "reward": 0.3}]
    summary = {"final": steps[-1], "steps": 20, "data": {"records": 8}}
    path = tmp_path / "align" / "report.html"
    path.parent.mkdir()
    write_report(path, AlignConfig(), summary, history)
    assert_figures_readable(path, tmp_path, n_figures=1)


def test_align_compare_report(tmp_path, capsys):
    out = tmp_path / "compare"
    argv = [
        "align", "compare", "--seeds", "0", "--variants", "dpo", "mcpo", "--steps", "2",
        "--eval-every", "1", "--records", "8", "--k", "2", "--batch-size", "4",
        "--sft-steps", "2", "--eval-samples", "1", "--max-new-tokens", "4", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert_figures_readable(out / "report.html", tmp_path, n_figures=1)
