"""CLI: ``analyze benefit`` — a P3B run's block-benefit curves and the keep ratios for any prune ratio.

``python -m studio analyze benefit --run runs/NAME --prune-ratio 0.5 --json`` reads the benefits the run recorded
(per epoch, CLS and patch, every Attention and MLP block; it works while the run is still going) and recomputes
the per-block keep ratios the P3B budget (Glandorf et al., arXiv 2506.23675) gives for the asked prune ratio,
from one epoch's benefits (``--epoch``, default the last recorded). Start a run with
``python -m studio prune --method p3b ...``.
"""

from __future__ import annotations

import argparse

from ..analysis.block_benefit import keep_ratios_at, load_history
from ..argtypes import fraction, nonnegative_int
from . import Output, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benefit",
        help="block-benefit curves of a P3B run and the per-block keep ratios for a prune ratio",
        description="P3B block benefit: recompute per-block keep ratios from a run's recorded benefits.",
    )
    p.add_argument("--run", required=True, help="run folder of a P3B job (prune --method p3b --out ...)")
    p.add_argument(
        "--prune-ratio",
        type=fraction,
        default=None,
        help="fraction of all parameters to remove (default: the run's own)",
    )
    p.add_argument(
        "--epoch",
        type=nonnegative_int,
        default=None,
        help="epoch whose benefits are used (default: the last)",
    )
    p.add_argument("--curves", action="store_true", help="include every epoch's benefits in the JSON output")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=cmd_benefit)


def cmd_benefit(args: argparse.Namespace) -> Output:

    hist = load_history(args.run)
    ratio = args.prune_ratio if args.prune_ratio is not None else float(hist.settings.get("prune_ratio", 0.5))
    res = keep_ratios_at(hist, ratio, epoch=args.epoch)
    data = {"run": args.run, "epochs_recorded": hist.epochs, **res}
    if args.curves:
        data["curves"] = {
            "epochs": hist.epochs,
            "benefit_cls": hist.benefit_cls.tolist(),
            "benefit_patch": hist.benefit_patch.tolist(),
            "kept_params": hist.kept_params.tolist(),
        }
    rows = [
        {
            "block": n,
            "benefit cls": bc,
            "benefit patch": bp,
            "importance": imp,
            "keep ratio": k,
            "params": w,
            "kept": kp,
        }
        for n, bc, bp, imp, k, w, kp in zip(
            res["names"],
            res["benefit_cls"],
            res["benefit_patch"],
            res["importance"],
            res["keep_ratio"],
            res["block_params"],
            res["kept_params"],
        )
    ]
    text = (
        f"P3B budget at prune ratio {ratio:g} from epoch {res['epoch']}'s benefits "
        f"({len(hist.epochs)} epochs recorded)\n{table(rows)}\n"
        f"params {res['params_total']:,.0f} -> {res['params_after']:,.0f} "
        f"({res['params_after'] / res['params_total']:.1%})"
    )
    return Output(data, text)
