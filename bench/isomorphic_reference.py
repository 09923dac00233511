"""Isomorphic pruning's published structures, reproduced without data (random weights and gradients).

The paper's DeiT targets are fixed ratio triples (ρ, ρ_head, ρ_headdim) on distilled DeiTs (Isomorphic-Pruning's
``scripts/pruning/deit_*.sh``, ``round_to=2``). MACs and params depend on which channels the Taylor scores pick
only through the per-layer split, so random weights give the published sizes within ~2 %.

Usage: python bench/isomorphic_reference.py [--targets 4.2G 2.6G 1.2G 0.6G] [--batches 1]
Prints one markdown row per target: published vs. reproduced MACs (torch-pruning's counter, as the paper, and the
studio's exact dispatcher count of the plan) and params. Slow on 2 CPU cores (DeiT-B: a minute or two per target).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from studio.costs import plan_cost
from studio.evaluate import logits_of
from studio.models import create_vit, describe_base
from studio.prune.isomorphic import IsoRatios, isomorphic_structure

# target -> (timm arch, ratios, published MACs G, published params M)  [paper Table 2 / README prune log]
TARGETS: dict[str, tuple[str, tuple[float, float, float], float, float]] = {
    "4.2G": ("deit_base_distilled_patch16_224", (0.5, 0.5, 0.25), 4.17, 20.72),
    "2.6G": ("deit_base_distilled_patch16_224", (0.6, 0.6, 0.3), 2.61, 13.07),
    "1.2G": ("deit_small_distilled_patch16_224", (0.5, 0.5, 0.1), 1.21, 5.74),
    "0.6G": ("deit_tiny_distilled_patch16_224", (0.25, 0.3, 0.3), 0.62, 3.08),
}


def reproduce(target: str, *, batches: int = 1, seed: int = 0) -> dict[str, float]:
    """Prune a randomly initialised model at the target's ratios; return the published and reproduced sizes."""
    import torch_pruning as tp

    arch, ratios, pub_macs, pub_params = TARGETS[target]
    torch.manual_seed(seed)
    model = create_vit(arch).eval()
    base = describe_base(model, arch, {})
    x = torch.randn(2, 3, 224, 224)
    y = torch.randint(0, model.num_classes, (2,))
    grads: dict[str, torch.Tensor] = {}
    for _ in range(batches):  # summed, never zeroed (the reference)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits_of(model, x), y).backward()  # eval mode, as the reference
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] = grads.get(n, torch.zeros_like(p)) + p.grad
    t0 = time.time()
    st = isomorphic_structure(
        model, base, grads, IsoRatios(*ratios), round_to=2, scale_policy="reset", keep_pruned=True
    )
    seconds = time.time() - t0
    ours = plan_cost(st.plan)
    ex = torch.zeros(1, 3, 224, 224)
    tp_macs_base, params_base = tp.utils.count_ops_and_params(model, ex)
    tp_macs, tp_params = (
        tp.utils.count_ops_and_params(st.pruned, ex) if st.pruned is not None else (float("nan"),) * 2
    )
    return {
        "published_macs_g": pub_macs,
        "tp_macs_g": tp_macs / 1e9,
        "tp_macs_base_g": tp_macs_base / 1e9,
        "plan_macs_g": ours["macs"] / 1e9,
        "published_params_m": pub_params,
        "params_m": ours["params"] / 1e6,
        "tp_params_m": tp_params / 1e6,
        "params_base_m": params_base / 1e6,
        "embed": len(st.plan.embed) if st.plan.embed is not None else base.embed_dim,
        "heads": sum(st.plan.kept(i)["heads"] for i in range(base.depth)),
        "guarded": len(st.guarded_blocks),
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--batches", type=int, default=1, help="random gradient batches (summed)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        "| target | model | ratios | MACs published | MACs (tp counter) | Δ | MACs (plan, exact) | params published "
        "| params | Δ | embed | heads | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in args.targets:
        r = reproduce(t, batches=args.batches)
        arch, ratios, _, _ = TARGETS[t]
        dm = r["tp_macs_g"] / r["published_macs_g"] - 1
        dp = r["params_m"] / r["published_params_m"] - 1
        print(
            f"| DeiT-{t} | {arch} | {ratios} | {r['published_macs_g']:.2f} G | {r['tp_macs_g']:.2f} G | {dm:+.1%} | "
            f"{r['plan_macs_g']:.2f} G | {r['published_params_m']:.2f} M | {r['params_m']:.2f} M | {dp:+.1%} | "
            f"{r['embed']} | {r['heads']} | {r['seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
