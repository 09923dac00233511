"""Demo at a MACs budget: accuracy of Isomorphic, SAViT and the random / magnitude baselines before and after one
fixed short recovery (studio.train.fit), same calibration batches and same recipe for every method.

Usage: python bench/importance_recovery.py [--target 0.5] [--epochs 5] [--calib-batches 8] [--random-seeds 3]
Prints a markdown table for docs/results/importance.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from studio.analysis.criteria import calibration_batches
from studio.data import DataSpec, prepare
from studio.evaluate import evaluate
from studio.load import load_model
from studio.models import ModelSpec
from studio.prune import PruneRequest, make_plan
from studio.surgery import apply_plan
from studio.train import TrainSpec, fit

UNITS = {"isomorphic": "heads, head dims, MLP, embed (global)", "savit": "heads, MLP, embed (global)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.5, help="fraction of the MACs to keep")
    ap.add_argument("--epochs", type=int, default=5, help="recovery epochs (same recipe for every method)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--random-seeds", type=int, default=3, help="seeds of the random baseline")
    args = ap.parse_args()
    loaded = load_model(ModelSpec("demo", device="cpu"))
    data = DataSpec("demo")
    splits = {
        s: prepare(data, s, loaded.data_config, loaded.base.num_classes, class_names=loaded.known_class_names)
        for s in ("train", "val", "test")
    }
    batches = calibration_batches(loaded, data, "train", args.calib_batches, 64, seed=0)
    recipe = TrainSpec(
        epochs=args.epochs,
        batch_size=64,
        lr=args.lr,
        weight_decay=0.05,
        warmup_epochs=1,
        label_smoothing=0.1,
        seed=0,
    )
    dense = evaluate(loaded.model, splits["test"]).top1
    runs = [("isomorphic", {}, 0), ("savit", {}, 0), ("magnitude", {}, 0)]
    runs += [("random", {}, s) for s in range(args.random_seeds)]
    rows = []
    for method, extra, seed in runs:
        t0 = time.time()
        plan = make_plan(method, PruneRequest(loaded, {"target_macs": args.target, **extra}, batches, seed))
        t_plan = time.time() - t0
        model = apply_plan(copy.deepcopy(loaded.model), plan).eval()
        pruned = evaluate(model, splits["test"]).top1
        t0 = time.time()
        fit(model, splits["train"], splits["val"], recipe)
        rows.append(
            {
                "method": method,
                "seed": seed,
                "macs": plan.summary["macs_fraction"],
                "params": plan.summary["params_fraction"],
                "pruned": pruned,
                "recovered": evaluate(model, splits["test"]).top1,
                "plan_s": t_plan,
                "fit_s": time.time() - t0,
                "scope": UNITS.get(method) or f"{plan.params.get('scope')} ({plan.params.get('mode')})",
            }
        )
        print(f"# {rows[-1]}", flush=True)
    print(
        f"\nDense demo: test top-1 {dense:.4f}; target {args.target} of the MACs; recovery {args.epochs} epochs "
        f"AdamW lr {args.lr}, wd 0.05, warm-up 1, label smoothing 0.1, best val epoch; torch threads "
        f"{torch.get_num_threads()}\n"
    )
    print("| method | units pruned | MACs kept | params kept | test top-1 pruned | after recovery | plan s |")
    print("|---|---|---|---|---|---|---|")
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    for method, rs in by.items():

        def cell(k: str, rs=rs) -> str:
            v = [r[k] for r in rs]
            return f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")

        label = method + (f" ({len(rs)} seeds)" if len(rs) > 1 else "")
        print(
            f"| {label} | {rs[0]['scope']} | {cell('macs')} | {cell('params')} | {cell('pruned')} | "
            f"{cell('recovered')} | {statistics.mean(r['plan_s'] for r in rs):.0f} |"
        )


if __name__ == "__main__":
    main()
