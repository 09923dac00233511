"""Which pre-recovery signal predicts the recovered accuracy, on the demo: methods x budgets, one short recovery.

    OMP_NUM_THREADS=1 python bench/calibration.py [--root runs-calibration] [--epochs 2]

Prunes the demo model with each method at each MACs budget (prune runs record accuracy right after pruning, the
kNN accuracy of the cut features and MACs), recovers every plan with the same short recipe (``quick`` preset,
``--epochs`` epochs, distilled from the dense model), then prints the Spearman table of
:func:`studio.compare.calibration` and each plan's numbers as Markdown.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from studio.compare import SIGNALS, calibration, calibration_points
from studio.data import DataSpec
from studio.flows import create_run, run_folder
from studio.flows.prune import PruneSpec
from studio.flows.retrain import RecoverySpec
from studio.models import ModelSpec

METHODS = ("magnitude", "random", "taylor", "isomorphic")
BUDGETS = (0.4, 0.6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="runs-calibration")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.root)
    demo, data = ModelSpec("demo", device="cpu"), DataSpec("demo")
    t0 = time.time()
    for method in METHODS:
        for target in BUDGETS:
            name = f"{method}-{int(target * 100)}"
            if not (root / name / "results.json").exists():
                run_folder(
                    create_run(
                        PruneSpec(demo, method, {"target_macs": target}, data, bench=False), root / name
                    )
                )
            src = root / name
            if not (root / f"{name}-r" / "results.json").exists():
                spec = RecoverySpec(
                    ModelSpec(str(src / "export"), device="cpu"),
                    data,
                    demo,
                    overrides={"epochs": args.epochs},
                    bench=False,
                )
                run_folder(create_run(spec, root / f"{name}-r"))
            print(f"{name}: done at {time.time() - t0:.0f}s", flush=True)
    cal = calibration(calibration_points(root, model="demo"))
    print(f"\ndata: {cal['data']}; {len(cal['points'])} recovered plans; recommended: {cal['recommended']}")
    print(cal["reason"])
    print("\n| signal | Spearman ρ | runs |\n|---|---|---|")
    for t in cal["table"]:
        rho = "–" if t["spearman"] is None else f"{t['spearman']:.2f}"
        print(f"| {t['label']} | {rho} | {t['n']} |")
    print("\n| plan | " + " | ".join(SIGNALS[s] for s in SIGNALS) + " | accuracy after recovery |")
    print("|---" * (len(SIGNALS) + 2) + "|")
    for p in sorted(cal["points"], key=lambda p: p["prune_run"]):
        cells = ["–" if p[s] is None else (f"{p[s]:,.0f}" if s == "macs" else f"{p[s]:.3f}") for s in SIGNALS]
        print(f"| {p['prune_run']} | " + " | ".join(cells) + f" | {p['actual']:.3f} |")
    print(f"\n{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
