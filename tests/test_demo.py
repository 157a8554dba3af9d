"""``negpref demo``: bad input, the paper-findings check, figures and verdicts over seeds, the
report as a browser shows it, and the quick run against its committed summary.

The end-to-end run (``negpref demo --quick``) is marked slow; everything else is fast.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import negpref.studies.demo.models
from browser import assert_figures_readable, screenshot
from negpref.cli import build_parser, main
from negpref.config import build_config
from negpref.data.fictitious import generate_corpus
from negpref.studies.demo import DEFAULT_METHODS, DEFAULT_SEEDS, DemoConfig
from negpref.studies.demo.findings import (
    best_with_utility_kept,
    judge_findings,
    over_seeds,
    paper_findings,
    spread,
    verdict,
)
from negpref.studies.demo.models import model_entries
from negpref.studies.demo.report import build_demo_report
from negpref.studies.demo.run import worker_pool
from negpref.studies.demo.settings import command_line
from negpref.studies.demo.tables import main as demo_tables_main
from negpref.studies.demo.tables import rewrite_regions

DATA = Path(__file__).parent / "data"


def quick_reference(environment: dict) -> Path:
    """The committed ``--quick`` numbers for this CPU model and its torch kernels (AVX2 and
    AVX-512 kernels sum in other orders, and CPU models were seen to differ too, so each has
    its own exact numbers)."""
    cpu = re.sub(r"[^a-z0-9]+", "-", environment["cpu"].lower()).strip("-")
    return DATA / f"demo_quick_summary.{environment['cpu_capability']}.{cpu}.json"


def refresh(reference: Path) -> str:
    return (
        "negpref demo --quick --out runs/quick --overwrite && "
        f"cp runs/quick/summary.json tests/data/{reference.name}"
    )


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


def synthetic_study(seeds=(0, 1, 2)) -> dict:
    """A multi-seed summary as ``run_demo`` writes it, from per-seed synthetic summaries whose
    NPO forget quality differs by seed."""
    per_seed = []
    for i, seed in enumerate(seeds):
        run = synthetic_summary()
        run["seed"] = seed
        run["methods"]["NPO"]["forget_quality"] = [1.0, 0.5, 0.25][i % 3]
        run["findings"] = paper_findings(run)
        per_seed.append(run)
    first = per_seed[0]
    return {
        "split": "forget10",
        "seeds": list(seeds),
        "command": "negpref demo --seeds " + " ".join(map(str, seeds)),
        "environment": {
            "python": "3.11.7",
            "packages": {"torch": "2.13.0", "tokenizers": "0.23.3"},
            "torch_threads": 1,
            "jobs": 2,
            "cpu_capability": "AVX512",
            "cpu": "AMD EPYC",
        },
        "spread": "mean and sample standard deviation over the seeds",
        "verdict_rule": "holds: in every seed",
        "corpus": first["corpus"],
        "timing": first["timing"],
        **over_seeds(per_seed),
        "per_seed": per_seed,
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


def test_spread_over_seeds():
    figure = spread([0.2, None, 0.4])
    assert figure["mean"] == pytest.approx(0.3)  # float sums of two numbers: ~1 ulp
    assert figure["std"] == pytest.approx(0.1 * 2**0.5)  # sample std (n - 1) of 0.2, 0.4
    assert (figure["min"], figure["max"]) == (0.2, 0.4)
    assert figure["values"] == [0.2, None, 0.4]  # the seed without the figure stays visible
    assert spread([0.5])["std"] == 0.0
    assert spread([None, None])["mean"] is None


def test_verdict_rule():
    assert [verdict(k, 3) for k in (3, 2, 1, 0)] == ["holds", "mixed", "mixed", "does not hold"]
    assert verdict(1, 1) == "holds" and verdict(0, 1) == "does not hold"


def test_findings_are_judged_over_seeds():
    runs = []
    for seed, ga_peak in ((0, 0.01), (1, 1.0), (2, 0.01)):
        run = synthetic_summary()
        run["seed"] = seed
        # seed 1: GA reaches NPO's forget quality at its peak with more utility
        run["methods"]["GA"].update(forget_quality=ga_peak, model_utility=0.7)
        run["findings"] = paper_findings(run)
        runs.append(run)
    judged = {f["claim"]: f for f in judge_findings(runs)}
    peak = judged[PEAK_CLAIM]
    assert (peak["verdict"], peak["holds_in"], peak["seeds"]) == ("mixed", 2, 3)
    assert [(o["seed"], o["holds"]) for o in peak["per_seed"]] == [(0, True), (1, False), (2, True)]
    assert peak["per_seed"][1]["evidence"] == (
        "NPO: forget quality 1, utility 0.55; best baseline GA: 1, utility 0.7"
    )
    assert judged["GA collapses: model utility is lost"]["verdict"] == "holds"
    for run in runs:
        run["methods"]["NPO+RT"]["final"]["model_utility"] = 0.1
        run["findings"] = paper_findings(run)
    retain_term = judge_findings(runs)[-1]
    assert retain_term["claim"].startswith("the retain term preserves model utility")
    assert (retain_term["verdict"], retain_term["holds_in"]) == ("does not hold", 0)


def test_figures_over_seeds():
    study = synthetic_study()
    npo = study["methods"]["NPO"]
    values = [1.0, 0.5, 0.25]
    assert npo["forget_quality"]["values"] == values
    assert npo["forget_quality"]["mean"] == pytest.approx(np.mean(values))  # 3 terms: ~1 ulp
    assert npo["forget_quality"]["std"] == pytest.approx(np.std(values, ddof=1))
    # the per-epoch curves: same epochs in every seed, each figure spread over the seeds
    assert [e["epoch"] for e in npo["epochs"]] == [float(e) for e in range(6)]
    assert npo["epochs"][2]["forget_kl"]["values"] == [0.6, 0.6, 0.6]
    assert npo["epochs"][2]["forget_kl"]["std"] == 0.0
    assert study["target"]["model_utility"]["mean"] == pytest.approx(0.6)
    # GA is below 90% of the target's utility from epoch 1 on, in every seed; NPO keeps it
    # and forgets best at its last epoch
    assert study["methods"]["GA"]["utility_kept"]["forget_quality"]["values"] == [None] * 3
    assert study["methods"]["NPO"]["utility_kept"]["epoch"]["values"] == [5.0] * 3


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_pool_keeps_task_order_and_raises_a_task_error(workers):
    with worker_pool(workers) as run:
        assert run(verdict, [(3, 3), (0, 3), (1, 3)]) == ["holds", "does not hold", "mixed"]
        with pytest.raises(ValueError):
            run(spread, [([0.5],), (["not a number"],)])


def test_cache_entries_are_per_seed_and_per_cpu(monkeypatch, tmp_path):
    config = DemoConfig(quick=True)
    corpus = generate_corpus(config.corpus_config())
    seed0, seed1 = (model_entries(config, corpus, seed, tmp_path) for seed in (0, 1))
    assert seed0["target"] != seed1["target"] and seed0["retain"] != seed1["retain"]
    assert seed0["target"] != seed0["retain"]
    assert model_entries(config, corpus, 0, tmp_path) == seed0  # a pure function of its inputs
    # another CPU's kernels train another model: its cached models are not reused here
    monkeypatch.setattr(negpref.studies.demo.models, "cpu_model", lambda: "another CPU")
    elsewhere = model_entries(config, corpus, 0, tmp_path)
    assert elsewhere["target"] != seed0["target"] and elsewhere["retain"] != seed0["retain"]


def test_command_line_reproduces_the_config():
    config = DemoConfig(
        quick=True, seeds=[3, 4], methods=["NPO", "GA"], beta=0.1, out="elsewhere", jobs=1
    )
    line = command_line(config)
    # where it runs and on how many processes is not part of the numbers
    assert line == "negpref demo --quick --seeds 3 4 --methods NPO GA --beta 0.1"
    args = build_parser().parse_args(line.split()[1:])
    again = build_config(DemoConfig, args)
    assert (again.quick, again.seeds, again.methods, again.beta) == (
        True,
        [3, 4],
        ["NPO", "GA"],
        0.1,
    )
    assert command_line(DemoConfig()) == "negpref demo"


def test_doc_tables_are_rewritten_from_the_summary(tmp_path, capsys):
    study = synthetic_study()
    text = (
        "# Demo\nintro\n<!-- demo:table -->\nstale numbers\n<!-- /demo:table -->\nmiddle\n"
        "<!-- demo:findings -->\n<!-- /demo:findings -->\n<!-- demo:environment -->\nold\n"
        "<!-- /demo:environment -->\nend\n"
    )
    rewritten = rewrite_regions(text, study, "README.md")
    assert "stale numbers" not in rewritten and "\nold\n" not in rewritten
    assert rewritten.startswith("# Demo\nintro\n<!-- demo:table -->\n| model |")
    assert "\n| NPO | 0.583 ± 0.38 | 0.55 ± 0 | 1 ± 0 / 0.55 ± 0 | 1.5 ± 0 |\n" in rewritten
    assert "<!-- /demo:table -->\nmiddle\n" in rewritten and rewritten.endswith("\nend\n")
    assert f"| {PEAK_CLAIM} | **holds** (3 of 3) | holds | holds | holds |" in rewritten
    assert "`negpref demo --seeds 0 1 2` (seeds 0 1 2;" in rewritten
    assert "torch 2.13.0, tokenizers 0.23.3; 1 torch thread per process" in rewritten
    assert rewrite_regions(rewritten, study, "README.md") == rewritten  # idempotent

    summary_path, doc = tmp_path / "summary.json", tmp_path / "doc.md"
    summary_path.write_text(json.dumps(study))
    doc.write_text("<!-- demo:tabel -->\n<!-- /demo:tabel -->\n")
    assert demo_tables_main([str(summary_path), str(doc)]) == 2
    assert "doc.md: unknown demo region(s) tabel" in capsys.readouterr().err
    assert doc.read_text() == "<!-- demo:tabel -->\n<!-- /demo:tabel -->\n"  # left as it was
    doc.write_text("no regions")
    assert demo_tables_main([str(summary_path), str(doc)]) == 2
    assert "no <!-- demo:NAME -->" in capsys.readouterr().err
    doc.write_text(text)
    assert demo_tables_main([str(summary_path), str(doc)]) == 0
    assert doc.read_text() == rewritten


def test_report_renders_in_a_browser(tmp_path):
    study = synthetic_study()
    report = build_demo_report(study, SAMPLES, tmp_path / "report.html")
    page = report.read_text(encoding="utf-8")
    assert "I am &lt; &amp; &gt;" in page  # generations are escaped, not markup
    assert "0.583 ± 0.38" in page  # NPO's forget quality over the three seeds
    assert "negpref demo --seeds 0 1 2" in page and "torch threads per process" in page
    assert_looks_like_a_report(report, tmp_path, n_methods=3)


def test_quick_runs_are_labelled_in_the_report(tmp_path):
    summary = synthetic_study()
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
        (["--unlearn-epochs", "0"], "unlearn_epochs: must be >= 1"),
        (["--unlearn-lr", "-1"], "unlearn_lr: must be > 0"),
        (["--seeds", "1", "2", "1"], "seeds: repeats a seed"),
        (["--jobs", "-1"], "jobs: must be >= 0"),
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

# Figures that depend on the machine's speed or the run's place, not on the numerics.
_NOT_FIGURES = {"timing", "seconds", "train_s", "config", "cached", "environment"}


def figures(value, path: str = "") -> dict[str, float]:
    """Every number of a summary by where it is (``per_seed[seed 1].methods.NPO...``)."""
    found: dict[str, float] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in _NOT_FIGURES:
                found.update(figures(item, f"{path}.{key}" if path else key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            label = f"seed {item['seed']}" if isinstance(item, dict) and "seed" in item else i
            found.update(figures(item, f"{path}[{label}]"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        found[path] = value
    return found


def environment_differences(committed: dict, here: dict) -> list[str]:
    """What the numbers depend on that differs: package versions, threads, the CPU."""
    differences = [
        f"{name} {version} (committed) vs {here['packages'].get(name)} (here)"
        for name, version in committed["packages"].items()
        if here["packages"].get(name) != version
    ]
    differences += [
        f"{key} {committed[key]} (committed) vs {here[key]} (here)"
        for key in ("torch_threads", "cpu_capability", "cpu")
        if committed[key] != here[key]
    ]
    return differences


def test_figures_name_where_a_number_is():
    study = synthetic_study(seeds=(5, 6))
    found = figures(study)
    assert found["methods.NPO.forget_quality.mean"] == pytest.approx(0.75)
    assert found["per_seed[seed 6].methods.NPO.forget_quality"] == 0.5
    assert found["per_seed[seed 5].methods.GA.epochs[2].model_utility"] == pytest.approx(0.36)
    assert not any("timing" in key or "seconds" in key for key in found)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "-m", "negpref.cli", "demo", "--quick", "--json",
               "--out", str(root / "run"), "--cache-dir", str(root / "cache")]  # fmt: skip
    # 266 s on an AVX-512 EPYC, about 3x that on the AVX2 one: a hang, not a slow CPU, times out
    done = subprocess.run(command, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, json.loads(done.stdout)


@pytest.mark.slow
def test_quick_demo_end_to_end(quick_run):
    root, summary = quick_run
    run = root / "run"
    assert json.loads((run / "summary.json").read_text()) == summary
    assert list(summary["methods"]) == list(DEFAULT_METHODS)
    assert summary["seeds"] == list(DEFAULT_SEEDS)
    assert summary["command"] == "negpref demo --quick"
    assert summary["environment"]["torch_threads"] == 1
    epochs = summary["profile"]["unlearn_epochs"]
    for seed_run in summary["per_seed"]:
        # the retain model is the forget-quality reference: identical to itself; the target,
        # which learned the forget authors, is far from it
        assert seed_run["retain"]["forget_quality"] == 1.0
        assert seed_run["target"]["forget_quality"] < 0.05
        for name, m in seed_run["methods"].items():
            for key in ("forget_quality", "model_utility", "forget_truth_ratio"):
                assert 0.0 <= m[key] <= 1.0, (seed_run["seed"], name, key)
            assert [round(e["epoch"]) for e in m["epochs"]] == list(range(epochs + 1))
            start = m["epochs"][0]  # step 0: the target itself
            assert float(start["forget_quality"]) == pytest.approx(
                seed_run["target"]["forget_quality"]
            )  # the same logs aggregated twice: equal up to float rounding
            assert float(start["forget_kl"]) == pytest.approx(0.0, abs=1e-6)  # fp32 noise
            assert (run / m["epochs"][-1]["logs_path"]).is_file()
    # the seeds are replicates with their own models: their targets differ
    assert len({s["target"]["model_utility"] for s in summary["per_seed"]}) == len(DEFAULT_SEEDS)
    for name in ("corpus/full.json", "corpus/forget10_perturbed.json"):
        assert (run / name).is_file()
    assert (run / "seeds" / "seed-0" / "target_logs.json").is_file()
    verdicts = {f["claim"]: f for f in summary["findings"]}
    assert {PEAK_CLAIM, KEPT_CLAIM} <= set(verdicts)
    for f in verdicts.values():
        assert f["verdict"] == verdict(sum(o["holds"] for o in f["per_seed"]), len(DEFAULT_SEEDS))
    assert summary["timing"]["cached"] is False


@pytest.mark.slow
def test_quick_demo_gives_the_committed_numbers(quick_run):
    """Same package versions, threads and CPU: the committed numbers, exactly."""
    _, summary = quick_run
    reference = quick_reference(summary["environment"])
    if not reference.is_file():
        pytest.fail(f"no committed numbers for this CPU ({reference.name}): {refresh(reference)}")
    committed = json.loads(reference.read_text(encoding="utf-8"))
    differences = environment_differences(committed["environment"], summary["environment"])
    if differences:
        pytest.fail(
            f"{reference.name} was made in another environment ({'; '.join(differences)}): "
            f"its numbers are not expected here. Refresh it in the locked environment: "
            f"{refresh(reference)}"
        )
    assert summary["command"] == committed["command"]
    expected, got = figures(committed), figures(summary)
    moved = [
        f"{key}: {expected.get(key)} (committed) -> {got.get(key)}"
        for key in sorted(set(expected) | set(got))
        if expected.get(key) != got.get(key)
    ]
    python = (committed["environment"]["python"], summary["environment"]["python"])
    assert not moved, (
        f"{len(moved)} figures moved from {reference.name} (python {python[0]} there, "
        f"{python[1]} here), first: "
        + "; ".join(moved[:5])
        + f". If intended: {refresh(reference)}"
    )


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
    # one seed, one method, in this process: the same numbers as in the first run's workers
    seed = DEFAULT_SEEDS[1]
    code = main(["demo", "--quick", "--methods", "npo", "--seeds", str(seed), "--jobs", "1",
                 "--out", str(run), "--overwrite", "--cache-dir", str(cache), "--json"])  # fmt: skip
    again = json.loads(capsys.readouterr().out)
    assert code == 0 and again["timing"]["cached"] is True and list(again["methods"]) == ["NPO"]
    earlier = next(s for s in first["per_seed"] if s["seed"] == seed)
    (now,) = again["per_seed"]
    assert now["target"] == earlier["target"]
    assert now["methods"]["NPO"]["epochs"] == earlier["methods"]["NPO"]["epochs"]
