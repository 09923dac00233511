"""What the Benchmark page measures, from a shell: dense vs pruned demo ViT, batch sizes × dtypes, ideal vs measured.

Prunes the embedded demo with ``magnitude`` at the given MACs targets (widths rounded to 8), then runs
:func:`studio.benchmark.benchmark` (the page's engine) over the dense and pruned models on the current device and
prints a markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/benchmark_page.py --targets 0.5 --batch-sizes 1 64 256
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.benchmark import Target, benchmark, dtypes_for
from studio.device import describe_device
from studio.load import load_model
from studio.models import ModelSpec
from studio.prune import PruneRequest, make_plan
from studio.surgery import apply_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--dtypes", nargs="+", default=None, help="default: every dtype measured on the device")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    dense = load_model(ModelSpec("demo", device=args.device))
    targets = [Target("dense", dense)]
    for t in args.targets:
        plan = make_plan("magnitude", PruneRequest(dense, {"target_macs": t, "round_to": 8}))
        pruned = copy.copy(dense)
        pruned.model = apply_plan(copy.deepcopy(dense.model), plan).eval()
        targets.append(Target(f"magnitude {plan.summary['macs_fraction']:.0%} MACs", pruned))
    dtypes = args.dtypes or dtypes_for(dense.device)
    rows = benchmark(targets, args.batch_sizes, dtypes, warmup=args.warmup, repeats=args.repeats)
    print(f"device: {describe_device(dense.device)}\n")
    print("| model | dtype | batch | images/s | latency ms (median) | ideal × | measured × |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {r['images_per_s']:.0f} | {r['latency_ms']:.2f} | "
            f"{r['ideal_speedup']:.2f} | {r['measured_speedup']:.2f} |"
        )


if __name__ == "__main__":
    main()
