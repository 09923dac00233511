"""Measured speed-up of pruned ViTs against the ideal MACs ratio, with and without hardware-friendly widths.

For each model, magnitude-pruned plans at 75/50/25% of the MACs (``--target-macs`` solver), kept widths as they
fall (``round_to=1``) or rounded up to multiples of 8; speed-up measured at batch 1 and a large batch as the
median of paired (dense, pruned) timings taken back to back (``studio.bench.measure_throughput``: warm-up,
``inference_mode``), so load from other processes cancels out. Prints a markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/speedup.py --models demo deit_small --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.bench import count_macs, measure_throughput, paired_speedup
from studio.errors import StudioError
from studio.models import (
    DEMO_ARCH,
    DEMO_KWARGS,
    LoadedModel,
    ModelSpec,
    create_vit,
    describe_base,
    load_model,
)
from studio.prune import PruneRequest, make_plan
from studio.surgery import apply_plan, pruned_widths


def load(name: str, device: str) -> LoadedModel:
    """``demo`` (the embedded model, or its architecture with random weights if the assets are missing) or a timm
    architecture with random weights (e.g. ``deit_small`` -> ``deit_small_patch16_224``)."""
    if name == "demo":
        try:
            return load_model(ModelSpec("demo", device=device))
        except StudioError:
            name, kwargs = DEMO_ARCH, dict(DEMO_KWARGS, num_classes=10)
    else:
        name, kwargs = (name if "patch" in name else f"{name}_patch16_224"), {}
    torch.manual_seed(0)
    model = create_vit(name, **kwargs).eval().to(device)
    img = kwargs.get("img_size", 224)
    return LoadedModel(
        model=model,
        base=describe_base(model, name, kwargs),
        data_config={"input_size": [3, img, img]},
        class_names=[],
        device=torch.device(device),
        source=name,
    )


def aligned(model: torch.nn.Module) -> bool:
    """Whether every GEMM dimension of the pruned model is a multiple of 8."""
    dims = [model.embed_dim]
    for w in pruned_widths(model):
        dims += [w["heads"] * w["head_dim"], w["mlp"], w["attn_in"], w["mlp_in"]]
    return all(d % 8 == 0 for d in dims)


def run(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    loaded = load(name, args.device)
    size = loaded.data_config["input_size"]
    large = args.large_batch.get(name, 64)
    batch_sizes = [1, large]
    dense_macs = count_macs(loaded.model, size)["total"]
    dense = {
        bs: measure_throughput(
            loaded.model, size, batch_size=bs, warmup=args.warmup, repeats=args.repeats
        ).images_per_s
        for bs in batch_sizes
    }
    rows = [
        {
            "model": loaded.base.arch,
            "target": 1.0,
            "round_to": "-",
            "macs": 1.0,
            "params": 1.0,
            "ideal": 1.0,
            "aligned": aligned(loaded.model),
            **{f"bs{bs}": 1.0 for bs in batch_sizes},
            "dense_ips": {str(k): round(v, 1) for k, v in dense.items()},
        }
    ]
    for target in args.targets:
        for round_to in (1, 8):
            params = {"target_macs": target, "round_to": round_to, "scope": args.scope}
            plan = make_plan("magnitude", PruneRequest(loaded, params))
            pruned = apply_plan(copy.deepcopy(loaded.model), plan).eval()
            s = plan.summary
            assert count_macs(pruned, size)["total"] == s["macs_after"]
            measured = {
                bs: paired_speedup(loaded.model, pruned, size, bs, args.warmup, args.repeats)
                for bs in batch_sizes
            }
            rows.append(
                {
                    "model": loaded.base.arch,
                    "target": target,
                    "round_to": round_to,
                    "macs": s["macs_after"] / dense_macs,
                    "params": s["params_fraction"],
                    "ideal": dense_macs / s["macs_after"],
                    "aligned": aligned(pruned),
                    **{f"bs{bs}": v for bs, v in measured.items()},
                }
            )
            print(f"  {name} target {target} round_to {round_to}: {measured}", file=sys.stderr)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        bs_cols = [k for k in rs[0] if k.startswith("bs")]
        dense_ips = ", ".join(f"bs{k} {v} img/s" for k, v in rs[0]["dense_ips"].items())
        out += [
            f"**{model}** (dense: {dense_ips})",
            "",
            "| MACs target | round_to | MACs kept | params kept | ideal speed-up | "
            + " | ".join(f"measured {c.replace('bs', 'bs ')}" for c in bs_cols)
            + " | all widths %8 |",
            "|---|---|---|---|---|" + "---|" * len(bs_cols) + "---|",
        ]
        for r in rs[1:]:
            out.append(
                f"| {r['target']:.0%} | {r['round_to']} | {r['macs']:.1%} | {r['params']:.1%} | "
                f"x{r['ideal']:.2f} | "
                + " | ".join(f"x{r[c]:.2f}" for c in bs_cols)
                + f" | {'yes' if r['aligned'] else 'no'} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["demo", "deit_small"])
    p.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    p.add_argument("--scope", default="heads,mlp,embed", help="units pruned (magnitude criterion)")
    p.add_argument(
        "--large-batch",
        type=json.loads,
        default={"demo": 256, "deit_small": 16},
        help="large batch per model, JSON, e.g. '{\"demo\": 256}'",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", help="also write the rows as JSON")
    args = p.parse_args()
    t0 = time.time()
    rows = [r for name in args.models for r in run(name, args)]
    print(
        f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{args.repeats} paired repeats (median ratio), {time.time() - t0:.0f} s\n"
    )
    print(markdown(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
