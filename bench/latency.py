"""Prune to a measured latency: target, predicted and measured latency per model, method, backend and target.

For each model the latency model is fitted on the chosen backend and batch (``studio.latency``: timed pruned
variants, held-out error reported), each method solves for 70 % and 50 % of the dense latency, and the pruned
model is timed back to back with the dense one. Prints a markdown table::

    .venv/bin/python bench/latency.py --models demo deit_small_patch16_224 --backends eager onnxruntime
    .venv/bin/python bench/latency.py --widths --batch 1   # where rounding widths pays off instead
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.backends import BACKENDS
from studio.device import describe_device, resolve_device
from studio.errors import StudioError
from studio.latency import measured_fraction, profile_latency, time_ms, width_payoff
from studio.models import LoadedModel, create_vit, data_config, describe_base
from studio.prune import PruneRequest, make_plan
from studio.surgery import apply_plan


def load(name: str, device: torch.device) -> LoadedModel:
    if name == "demo":
        from studio.load import load_model
        from studio.models import ModelSpec

        return load_model(ModelSpec("demo", device=str(device)))
    torch.manual_seed(0)
    m = create_vit(name, num_classes=10).eval().to(device)
    return LoadedModel(m, describe_base(m, name, {"num_classes": 10}), data_config(m), [], device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["demo", "deit_small_patch16_224"])
    ap.add_argument("--methods", nargs="+", default=["magnitude", "random"])
    ap.add_argument("--backends", nargs="+", default=["eager", "onnxruntime"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variants", type=int, default=24)
    ap.add_argument("--device", default="auto", help="auto (a GPU where present), cpu or cuda")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="autocast dtype of every timing (bfloat16 is the GPU table's; ONNX Runtime runs float32 only)",
    )
    ap.add_argument(
        "--widths",
        action="store_true",
        help="print instead where rounding widths to 8/16/32 pays off (studio.latency.width_payoff)",
    )
    args = ap.parse_args()
    device = resolve_device(args.device)
    print(f"device {describe_device(device)}, dtype {args.dtype}, batch {args.batch}\n")
    if args.widths:
        print("| model | backend | batch | unit | round to | width | MACs | ms | vs uneven | pays |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in args.models:
            loaded = load(name, device)
            for backend in args.backends:
                rows = width_payoff(
                    loaded.model,
                    loaded.base,
                    loaded.data_config["input_size"],
                    batch=args.batch,
                    backend=backend,
                    use_cache=False,
                )
                for r in rows:
                    print(
                        f"| {name} | {backend} | {args.batch} | {r['unit']} | {r['multiple']} | {r['width']} | "
                        f"{r['macs'] / 1e6:.1f} M | {r['ms']:.2f} | {r['ms_vs_uneven']:.3f} | "
                        f"{'yes' if r['pays'] else 'no'} |"
                    )
        return
    print(
        "| model | backend | fit error | method | target | target ms | predicted ms | measured ms | miss "
        "| solver rounds (measured fraction) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        loaded = load(name, device)
        size = loaded.data_config["input_size"]
        for backend in args.backends:
            if not BACKENDS.get(backend).supports(args.dtype):
                print(f"| {name} | {backend} | – | – | – | – | – | – | {backend} has no {args.dtype} | |")
                continue
            lm = profile_latency(
                loaded.model,
                loaded.base,
                size,
                batch=args.batch,
                backend=backend,
                dtype=args.dtype,
                variants=args.variants,
            )
            for method in args.methods:
                for t in args.targets:
                    params = {
                        "target_latency": t,
                        "latency_batch": args.batch,
                        "latency_backend": backend,
                        "latency_dtype": args.dtype,
                    }
                    try:
                        plan = make_plan(method, PruneRequest(loaded, params))
                    except StudioError as e:
                        print(
                            f"| {name} | {backend} | {lm.fit_error:.1%} | {method} | {t:.0%} | – | – | – | {e} | |"
                        )
                        continue
                    pruned = apply_plan(copy.deepcopy(loaded.model), plan).eval()
                    # dense and pruned timed in interleaved pairs: the fraction is the pairs' median ratio
                    dense_ms = time_ms(loaded.model, size, args.batch, backend=backend, dtype=args.dtype)
                    ms = dense_ms * measured_fraction(
                        loaded.model, pruned, size, args.batch, backend=backend, dtype=args.dtype
                    )
                    target_ms = t * dense_ms
                    pred = plan.params["latency"]["predicted_ms"]
                    rounds = ", ".join(
                        f"{r['measured']:.3f}" for r in plan.params["latency"].get("rounds", [])
                    )
                    print(
                        f"| {name} | {backend} | {lm.fit_error:.1%} | {method} | {t:.0%} | {target_ms:.2f} | "
                        f"{pred:.2f} | {ms:.2f} | {ms / target_ms - 1:+.1%} | {rounds} |"
                    )


if __name__ == "__main__":
    main()
