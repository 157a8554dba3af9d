"""The three studies of ``negpref synthetic``: what each runs and writes, and its summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from negpref.io import staged_out_dir
from negpref.studies.synthetic import outputs
from negpref.studies.synthetic.divergence import DivergenceConfig, run_divergence
from negpref.studies.synthetic.study import (
    BetaSweepConfig,
    Figure4Config,
    run_beta_sweep,
    run_figure4,
)


@dataclass(frozen=True)
class Study:
    config: type
    run: Callable[..., dict]
    write: Callable[[dict, Path], list[Path]]
    help: str


STUDIES = {
    "figure4": Study(
        Figure4Config,
        run_figure4,
        outputs.write_figure4,
        "Figures 4 and 10: GA, GA+RT, NPO, NPO+RT, DPO+RT, IDK+RT on the synthetic task",
    ),
    "beta-sweep": Study(
        BetaSweepConfig,
        run_beta_sweep,
        outputs.write_beta_sweep,
        "Figure 3: NPO trajectories for several betas approach GA's as beta -> 0",
    ),
    "divergence": Study(
        DivergenceConfig,
        run_divergence,
        outputs.write_divergence,
        "Theorem 2: ||theta_t - theta_init||_{X^T X} grows linearly for GA, log for NPO",
    ),
}


def run_study(name: str, config, out: Path, overwrite: bool = False) -> tuple[dict, list[Path]]:
    """Study ``name`` with ``config``, its files written into ``out`` all at once: the results
    and the paths written (as they are named in ``out``)."""
    study = STUDIES[name]
    with staged_out_dir(out, overwrite=overwrite) as stage:
        results = study.run(config)
        written = study.write(results, stage)
    return results, [Path(out) / path.name for path in written]


def headline(name: str, results: dict) -> dict:
    """The figures ``--json`` prints (the curves stay in ``results.json``)."""
    if name == "divergence":
        return {"fits": results["fits"], "theory": results["theory"]}
    return {
        "alpha": results["alpha"],
        "initial": results["initial"],
        "summary": results["summary"],
        "timing_s": results["timing_s"],
    }


def summary_text(name: str, results: dict) -> str:
    """The one-screen table of a study (and the time it took)."""
    if name == "divergence":
        return outputs.format_table(outputs.DIVERGENCE_COLUMNS, outputs.divergence_rows(results))
    timing = results["timing_s"]
    return "\n".join(
        [
            outputs.format_table(outputs.SUMMARY_COLUMNS, outputs.summary_rows(results)),
            f"time: {timing['total']:.1f} s wall, {timing['cpu']:.1f} s CPU",
        ]
    )
