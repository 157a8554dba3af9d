"""Record the golden figures tests/test_golden.py compares against.

    PYTHONPATH=src python tests/golden_record.py            # rewrite tests/data/golden/*.json
    PYTHONPATH=src python tests/golden_record.py --measure  # deviation under harmless changes
    PYTHONPATH=src python tests/golden_record.py --add unlearn PDU  # record one new case

``--add`` records new cases into an existing file (each with the commit it was recorded on),
leaving the recorded ones untouched: a new method's golden figures come from the engine that
added it.

Recording runs every case twice, one torch thread, and writes nothing unless both runs agree
bitwise. ``--measure`` reruns the training families (a) with 2 torch threads and (b) with
the other AdamW kernel (fused instead of the single-tensor loop in unlearn, foreach instead of
fused in align), and prints the largest norm-wise relative deviations from the 1-thread
figures: the scale test_golden's TRAIN_REL must cover.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import test_golden as g
from negpref.threads import single_threaded


def _commit() -> str:
    here = Path(__file__).resolve().parent
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
    ).stdout.strip()


def compute_family(family: str, tmp: Path, cases=None) -> dict:
    """The ``cases`` of ``family`` (default: every one) computed once: {case: result}."""
    cases = g.FAMILIES[family] if cases is None else cases
    if family == "unlearn":
        (tmp / "unlearn_inputs").mkdir(parents=True)
        inputs = g.unlearn_inputs(tmp / "unlearn_inputs")
        return {c: g.compute_unlearn(tmp, inputs, c) for c in cases}
    if family == "align":
        (tmp / "align_inputs").mkdir(parents=True)
        inputs = g.align_inputs(tmp / "align_inputs")
        return {c: g.compute_align(tmp, inputs, c) for c in cases}
    if family == "u2a":
        return {c: g.compute_u2a(c) for c in cases}
    return {c: g.compute_tofu_logs(c) for c in cases}


def record(families) -> None:
    g.GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    commit = _commit()
    for family in families:
        with (
            single_threaded(),
            tempfile.TemporaryDirectory() as a,
            tempfile.TemporaryDirectory() as b,
        ):
            first = compute_family(family, Path(a))
            second = compute_family(family, Path(b))
        for case in first:
            # json round trip: NaN == NaN is False in Python, so compare the serialised forms
            if json.dumps(first[case]) != json.dumps(second[case]):
                sys.exit(f"{family} {case}: two runs of the same code differ; not recording")
        golden = {
            "recorded_from_commit": commit,
            "torch": torch.__version__,
            "cases": {c: {"settings": g.FAMILIES[family][c], "result": first[c]} for c in first},
        }
        path = g.GOLDEN_DIR / f"{family}.json"
        path.write_text(json.dumps(golden, indent=1) + "\n")
        print(f"wrote {path} ({len(first)} cases)")


def add(family: str, cases: list[str]) -> None:
    path = g.GOLDEN_DIR / f"{family}.json"
    golden = json.loads(path.read_text())
    known = [c for c in cases if c in golden["cases"]]
    if known:
        sys.exit(f"{family}: {', '.join(known)} already recorded; record the family anew instead")
    with single_threaded(), tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        first = compute_family(family, Path(a), cases)
        second = compute_family(family, Path(b), cases)
    commit = _commit()
    for case in cases:
        if json.dumps(first[case]) != json.dumps(second[case]):
            sys.exit(f"{family} {case}: two runs of the same code differ; not recording")
        settings = g.FAMILIES[family][case]
        entry = {"settings": settings, "result": first[case], "recorded_from_commit": commit}
        golden["cases"][case] = entry
    path.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"added {', '.join(cases)} to {path}")


class OtherKernelAdamW(torch.optim.AdamW):
    """The same AdamW update on the other kernel: foreach where the code asks for fused
    (align), fused where it leaves the choice to torch (unlearn: the single-tensor loop)."""

    def __init__(self, params, **kwargs):
        other = {"foreach": True} if kwargs.pop("fused", False) else {"fused": True}
        super().__init__(params, **{**kwargs, **other})


def deviations(got: dict, want: dict) -> list[tuple[float, str]]:
    """|new - old| / max_s |old_s| for every float of every curve, largest first, with where."""
    found = []
    for case, rows in want.items():
        for step, (gr, wr) in enumerate(zip(got[case], rows), start=1):
            for key, old in wr.items():
                if not isinstance(old, float) or not math.isfinite(old):
                    continue
                scale = g._curve_scale(rows, key)
                dev = abs(gr[key] - old) / scale if scale else abs(gr[key] - old)
                found.append((dev, f"{case} step {step} {key}"))
    return sorted(found, reverse=True)


def measure() -> None:
    for family in ("unlearn", "align"):
        with tempfile.TemporaryDirectory() as tmp:
            with single_threaded():
                base = compute_family(family, Path(tmp) / "base")
            torch.set_num_threads(2)
            threads = compute_family(family, Path(tmp) / "threads")
            with single_threaded():
                original, torch.optim.AdamW = torch.optim.AdamW, OtherKernelAdamW
                try:
                    other_kernel = compute_family(family, Path(tmp) / "other_kernel")
                finally:
                    torch.optim.AdamW = original
        for name, got in (("2 threads", threads), ("other AdamW kernel", other_kernel)):
            worst = ", ".join(f"{d:.3g} at {w}" for d, w in deviations(got, base)[:5])
            print(f"{family}: {name}: largest norm-wise relative deviations: {worst}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="measure, write nothing")
    families = ", ".join(g.FAMILIES)
    parser.add_argument("--add", action="store_true", help="record new cases: FAMILY CASE...")
    parser.add_argument("families", nargs="*", help=f"some of {families} (default: all)")
    args = parser.parse_args()
    if args.add:
        family, *cases = args.families
        unknown = [c for c in cases if c not in g.FAMILIES.get(family, {})]
        if not cases or unknown:
            parser.error(f"--add FAMILY CASE...: unknown or no cases {unknown} in {family!r}")
        return add(family, cases)
    unknown = [f for f in args.families if f not in g.FAMILIES]
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}; known: {families}")
    if args.measure:
        measure()
    else:
        record(args.families or list(g.FAMILIES))


if __name__ == "__main__":
    main()
