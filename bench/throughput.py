"""Dense throughput of the demo ViT and deit_tiny_patch16_224 (random weights) at batch 1 and 64.

Usage: python bench/throughput.py [--repeats 30] [--device auto]
Prints a markdown table (images/s, median latency) with params and MACs, for the README.
"""

from __future__ import annotations

import argparse

import torch

from studio.bench import count_macs, count_params, measure_throughput
from studio.device import describe_device, resolve_device
from studio.load import load_model
from studio.models import ModelSpec, create_vit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    models = {
        "demo (12x96, 32px, patch 8)": (load_model(ModelSpec("demo", device=str(device))).model, (3, 32, 32)),
        "deit_tiny_patch16_224": (create_vit("deit_tiny_patch16_224").eval().to(device), (3, 224, 224)),
    }
    print(
        f"device: {describe_device(device)}, torch {torch.__version__}, float32, "
        f"warm-up {args.warmup}, median of {args.repeats}\n"
    )
    print("| model | params | MACs | batch | images/s | latency ms (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (model, size) in models.items():
        params, macs = count_params(model), count_macs(model, size)["total"]
        for bs in args.batch_sizes:
            r = measure_throughput(model, size, batch_size=bs, warmup=args.warmup, repeats=args.repeats)
            print(
                f"| {name} | {params / 1e6:.2f} M | {macs / 1e6:.1f} M | {bs} | {r.images_per_s:,.1f} | "
                f"{r.latency_ms:.2f} |"
            )


if __name__ == "__main__":
    main()
