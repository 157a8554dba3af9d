"""``negpref demo``: bad input, the paper-findings check, and the report as a browser shows it.

The end-to-end run (``negpref demo --quick``) is marked slow; everything else is fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from browser import assert_figures_readable, screenshot
from negpref.cli import main
from negpref.demo import DEFAULT_METHODS, best_with_utility_kept, paper_findings
from negpref.report.demo_report import build_demo_report


def assert_looks_like_a_report(report: Path, tmp_path: Path, n_methods: int) -> None:
    assert "url(http" not in report.read_text(encoding="utf-8")
    # four figures (Figures 5, 6, 8 and the truth ratios), each laid out at page width
    view = assert_figures_readable(report, tmp_path, n_figures=4)
    for width, height, shown, _ in view["images"]:
        assert width > 300 and height > 200 and shown > 300
    headers = [t[1] for t in view["tables"]]
    results = headers.index(next(h for h in headers if "forget quality" in h))
    assert view["tables"][results][0] == 1 + 2 + n_methods  # header, target, retain, methods
    assert any("claim (NPO paper)" in h for h in headers)
    pixels = screenshot(report, tmp_path)[..., :3]
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50


# ----------------------------------------------------------------------- synthetic run


def synthetic_summary() -> dict:
    """A summary with hand-set numbers: NPO climbs and stays, GA peaks and collapses."""
    rng = np.random.default_rng(0)

    def epochs(fq, mu, kl):
        return [
            {
                "epoch": float(e),
                "step": 4 * e,
                "forget_quality": fq(e),
                "model_utility": mu(e),
                "forget_kl": kl(e),
                "forget_truth_ratio": 0.5,
            }
            for e in range(6)
        ]

    curves = {
        "NPO": epochs(
            lambda e: 1e-6 * 10 ** (1.2 * e), lambda e: 0.6 - 0.01 * e, lambda e: 0.3 * e
        ),
        "NPO+RT": epochs(lambda e: 1e-6 * 10**e, lambda e: 0.6, lambda e: 0.2 * e),
        "GA": epochs(
            lambda e: [1e-6, 1e-3, 1e-2, 1e-8, 1e-12, 1e-14][e],
            lambda e: 0.6 - 0.12 * e,
            lambda e: 2.0 * e**2,
        ),
    }
    methods = {}
    for name, eps in curves.items():
        peak = max(eps[1:], key=lambda x: x["forget_quality"])
        methods[name] = {
            "forget_quality": peak["forget_quality"],
            "model_utility": peak["model_utility"],
            "forget_truth_ratio": 0.5,
            "forget_kl": peak["forget_kl"],
            "peak_epoch": peak["epoch"],
            "final": eps[-1],
            "utility_kept": best_with_utility_kept(eps, 0.6),
            "epochs": eps,
            "seconds": 10.0,
        }
    return {
        "split": "forget10",
        "target": {"forget_quality": 1e-7, "model_utility": 0.6, "forget_truth_ratio": 0.3},
        "retain": {"forget_quality": 1.0, "model_utility": 0.58, "forget_truth_ratio": 0.6},
        "methods": methods,
        "corpus": {"n_authors": 30, "facts_per_author": 10},
        "timing": {"total_s": 100.0, "models_s": 40.0, "unlearn_s": 60.0, "cached": False},
        "forget_truth_ratios": {
            "retain": rng.lognormal(0.3, 0.3, 30).tolist(),
            "target": rng.lognormal(-1.0, 0.4, 30).tolist(),
            **{n: rng.lognormal(0.2, 0.4, 30).tolist() for n in methods},
        },
    }


SAMPLES = {
    "forget": [
        {
            "question": "Where was Aldric Ashcombe born?",
            "answer": "Aldric Ashcombe was born in Oslo.",
            "generations": {"target": "Aldric Ashcombe was born in Oslo.", "NPO": "I am < & >"},
        }
    ]
}


def test_best_epoch_with_utility_kept():
    epochs = [
        {"step": 0, "epoch": 0.0, "forget_quality": 1e-9, "model_utility": 0.80},
        {"step": 4, "epoch": 1.0, "forget_quality": 0.20, "model_utility": 0.75},
        {"step": 8, "epoch": 2.0, "forget_quality": 0.90, "model_utility": 0.70},  # < 0.72
        {"step": 12, "epoch": 3.0, "forget_quality": 0.20, "model_utility": 0.79},
        {"step": 16, "epoch": 4.0, "forget_quality": None, "model_utility": 0.80},
    ]
    assert best_with_utility_kept(epochs, 0.8)["epoch"] == 3.0  # tie on quality: more utility
    assert best_with_utility_kept(epochs, 0.9) is None  # step 0 (the target) never counts


PEAK_CLAIM = (
    "NPO-based methods give the best forget quality / model utility trade-off (each method at "
    "its peak-forget-quality epoch, as the paper's Figure 5)"
)
KEPT_CLAIM = (
    "... and against early-stopped baselines (each method at its best epoch that keeps 90% of "
    "the target's utility; not in the paper)"
)


def test_findings_follow_the_numbers():
    summary = synthetic_summary()
    findings = {f["claim"]: f for f in paper_findings(summary)}
    assert all(f["holds"] for f in findings.values()), findings
    assert set(findings) == {
        PEAK_CLAIM,
        KEPT_CLAIM,
        "GA collapses: model utility is lost",
        "GA's forget quality peaks, then falls (below a tenth of its peak)",
        "NPO's forget quality reaches a plateau and stays (no collapse)",
        "NPO+RT's forget quality reaches a plateau and stays (no collapse)",
        "NPO loses model utility more slowly than GA",
        "GA's forget KL explodes while NPO's stays moderate",
        "the retain term preserves model utility (NPO+RT above NPO)",
    }
    assert findings[PEAK_CLAIM]["evidence"] == (
        "NPO: forget quality 1, utility 0.55; best baseline GA: 0.01, utility 0.36"
    )
    assert findings[KEPT_CLAIM]["evidence"] == (
        "NPO: forget quality 1, utility 0.55; best baseline GA: 0, utility 0"
    )
    slower = findings["NPO loses model utility more slowly than GA"]
    assert slower["evidence"].endswith("GA 3.0, NPO never")
    kl = findings["GA's forget KL explodes while NPO's stays moderate"]
    assert kl["evidence"] == "forget KL after the last epoch: GA 50, NPO 1.5"

    # a GA that, stopped early, forgets as well as NPO with more utility: only the stricter
    # claim fails; one that does so at its peak fails both
    ga = summary["methods"]["GA"]
    ga["utility_kept"] = {"epoch": 2.0, "forget_quality": 1.0, "model_utility": 0.7}
    findings = {f["claim"]: f["holds"] for f in paper_findings(summary)}
    assert findings[PEAK_CLAIM] and not findings[KEPT_CLAIM]
    ga.update(forget_quality=1.0, model_utility=0.7)
    findings = {f["claim"]: f["holds"] for f in paper_findings(summary)}
    assert not findings[PEAK_CLAIM] and not findings[KEPT_CLAIM]


def test_report_renders_in_a_browser(tmp_path):
    summary = synthetic_summary()
    summary["findings"] = paper_findings(summary)
    report = build_demo_report(summary, SAMPLES, tmp_path / "report.html")
    page = report.read_text(encoding="utf-8")
    assert "I am &lt; &amp; &gt;" in page  # generations are escaped, not markup
    assert_looks_like_a_report(report, tmp_path, n_methods=3)


def test_quick_runs_are_labelled_in_the_report(tmp_path):
    summary = synthetic_summary()
    summary["config"] = {"quick": True}
    page = build_demo_report(summary, SAMPLES, tmp_path / "report.html").read_text()
    assert "<h1>negpref demo: unlearning fictitious authors (--quick)</h1>" in page
    assert '<p class="notice">--quick run: a small corpus and model' in page
    summary["config"] = {"quick": False}
    page = build_demo_report(summary, SAMPLES, tmp_path / "report.html").read_text()
    assert "--quick" not in page


# --------------------------------------------------------------------------- bad input


def _demo(capsys, *args: str) -> tuple[int, str]:
    code = main(["demo", *args])
    return code, capsys.readouterr().err


def test_unknown_method_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _demo(capsys, "--methods", "NPO,GA", "FOO", "--out", str(out))
    assert code == 2
    assert "unknown method 'FOO'" in err and "NPO+RT" in err
    assert not out.exists()
    code, err = _demo(capsys, "--methods", "SFT", "--out", str(out))
    assert code == 2 and "unknown method 'SFT'" in err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("another run")
    code, err = _demo(capsys, "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "another run"
    assert not (tmp_path / "cache").exists()


def test_unwritable_locations_are_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = _demo(capsys, "--out", str(blocker / "run"))
    assert code == 2 and "not writable" in err
    code, err = _demo(capsys, "--out", str(tmp_path / "run"), "--cache-dir", str(blocker / "c"))
    assert code == 2 and "--cache-dir" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--unlearn-epochs", "0"], "--unlearn-epochs: must be >= 1"),
        (["--unlearn-lr", "-1"], "--unlearn-lr: must be > 0"),
        (["--n-authors", "3"], "n_authors must be in 10..48"),
    ],
)
def test_bad_numbers_are_refused(tmp_path, capsys, args, message):
    code, err = _demo(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 2 and message in err


def test_bad_split_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["demo", "--split", "forget33", "--out", str(tmp_path / "run")])
    assert raised.value.code == 2
    assert "forget33" in capsys.readouterr().err


# -------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "-m", "negpref.cli", "demo", "--quick", "--json",
               "--out", str(root / "run"), "--cache-dir", str(root / "cache")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, json.loads(done.stdout)


@pytest.mark.slow
def test_quick_demo_end_to_end(quick_run):
    root, summary = quick_run
    run = root / "run"
    assert json.loads((run / "summary.json").read_text()) == summary
    assert list(summary["methods"]) == list(DEFAULT_METHODS)
    # the retain model is the forget-quality reference: identical to itself; the target, which
    # learned the forget authors, is far from it
    assert summary["retain"]["forget_quality"] == 1.0
    assert summary["target"]["forget_quality"] < summary["retain"]["forget_quality"]
    assert summary["target"]["forget_quality"] < 0.05
    epochs = summary["profile"]["unlearn_epochs"]
    for name, m in summary["methods"].items():
        for key in ("forget_quality", "model_utility", "forget_truth_ratio"):
            assert 0.0 <= m[key] <= 1.0, (name, key)
        assert [round(e["epoch"]) for e in m["epochs"]] == list(range(epochs + 1))
        start = m["epochs"][0]  # step 0: the target itself
        assert start["forget_quality"] == pytest.approx(summary["target"]["forget_quality"])
        assert start["forget_kl"] == pytest.approx(0.0, abs=1e-6)
        assert (run / m["epochs"][-1]["logs_path"]).is_file()
    for name in ("corpus/full.json", "corpus/forget10_perturbed.json", "target_logs.json"):
        assert (run / name).is_file()
    assert {PEAK_CLAIM, KEPT_CLAIM} <= {f["claim"] for f in summary["findings"]}
    assert summary["timing"]["cached"] is False


@pytest.mark.slow
def test_quick_demo_report_in_a_browser(quick_run, tmp_path):
    root, summary = quick_run
    assert_looks_like_a_report(root / "run" / "report.html", tmp_path, len(summary["methods"]))


@pytest.mark.slow
def test_rerun_uses_the_cache_and_respects_the_old_run(quick_run, capsys):
    root, first = quick_run
    run, cache = root / "run", root / "cache"
    before = (run / "summary.json").read_bytes()
    code, err = _demo(capsys, "--quick", "--out", str(run), "--cache-dir", str(cache))
    assert code == 2 and "--overwrite" in err
    assert (run / "summary.json").read_bytes() == before
    code = main(["demo", "--quick", "--methods", "npo", "--out", str(run), "--overwrite",
                 "--cache-dir", str(cache), "--json"])  # fmt: skip
    again = json.loads(capsys.readouterr().out)
    assert code == 0 and again["timing"]["cached"] is True and list(again["methods"]) == ["NPO"]
    # same seed, same cached models: the same target and retain evaluation
    assert again["target"] == first["target"]
    assert again["methods"]["NPO"]["epochs"] == first["methods"]["NPO"]["epochs"]
