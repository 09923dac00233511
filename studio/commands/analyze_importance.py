"""CLI: ``analyze importance`` — per-head / head-dim / MLP-neuron / embedding-channel importance by criterion.

``python -m studio analyze importance --model demo --data demo --criterion taylor,ablation --batches 4 --json``
prints every criterion's scores (heads, head dims, MLP neurons, embedding channels; a criterion leaves out the
kinds it does not score) and, with ``ablation`` among them, each criterion's Spearman rank correlation with the
ablation Δloss over all heads.
"""

from __future__ import annotations

import argparse

from ..analysis.importance import CRITERIA, DEFAULT_CRITERIA, ImportanceSpec, run_importance
from ..argtypes import nonnegative_int, positive_int
from ..errors import StudioError
from . import Output, add_common, add_data_args, add_model_args, data_spec, model_spec, stderr_progress, table


def register(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "importance",
        help="importance of heads, head dims, MLP neurons and embedding channels (l1, l2, taylor, taylor2, ablation)",
        description="Criteria: " + "; ".join(f"{n}: {CRITERIA.get(n).summary}" for n in CRITERIA),
    )
    add_model_args(p)
    add_data_args(p)
    add_common(p)
    g = p.add_argument_group("importance")
    g.add_argument(
        "--criterion",
        action="append",
        default=None,
        help=f"criterion, repeatable or comma-separated: {', '.join(CRITERIA.names())} "
        f"(default {','.join(DEFAULT_CRITERIA)})",
    )
    g.add_argument("--batches", type=nonnegative_int, default=4, help="calibration batches (K)")
    g.add_argument("--batch-size", type=positive_int, default=64)
    g.add_argument(
        "--micro-batch",
        type=nonnegative_int,
        default=0,
        help="images per pass (gradients accumulate to the batch's); 0 = largest within the memory budget",
    )
    g.add_argument(
        "--ablation-samples",
        type=nonnegative_int,
        default=0,
        help="ablate heads on the first N calibration images only (0 = all; ablation costs ~half a "
        "forward pass per head)",
    )
    g.add_argument("--calib-split", default="train", help="split the calibration batches are drawn from")
    g.add_argument("--seed", type=nonnegative_int, default=0)
    p.set_defaults(func=cmd_analyze_importance)


def cmd_analyze_importance(args: argparse.Namespace) -> Output:

    names = [c.strip() for item in (args.criterion or [",".join(DEFAULT_CRITERIA)]) for c in item.split(",")]
    names = [c for c in names if c]
    if args.batches < 0:
        raise StudioError(f"--batches must be ≥ 0, got {args.batches}.")
    spec = ImportanceSpec(
        model=model_spec(args),
        data=data_spec(args) if args.data else None,
        criteria=tuple(dict.fromkeys(names)),
        batches=args.batches,
        batch_size=args.batch_size,
        split=args.calib_split,
        seed=args.seed,
        micro_batch=args.micro_batch,
        ablation_samples=args.ablation_samples,
    )
    result = run_importance(spec, callbacks=[stderr_progress()])
    data = {"spec": spec.to_dict(), **result.to_dict()}
    rows = []
    for s in result.scores:
        flat = [v for r in s.heads for v in r]
        rows.append(
            {
                "criterion": s.criterion,
                "kinds": ", ".join(
                    k for k in ("heads", "head_dims", "mlp", "embed") if getattr(s, k) is not None
                ),
                "top head": _argmax(s.heads),
                "weakest head": _argmin(s.heads),
                "head score range": f"{min(flat):.3g}..{max(flat):.3g}",
                "spearman vs ablation": result.correlation.get(s.criterion),
                "seconds": round(s.seconds, 2),
            }
        )
    text = (
        f"importance of {result.base.arch} ({result.base.depth} blocks x {result.base.num_heads[0]} heads) over "
        f"{result.batches} batches ({result.samples} images)\n\n" + table(rows)
    )
    return Output(data, text)


def _argmax(m: tuple[tuple[float, ...], ...]) -> str:
    b, h = max(((i, j) for i, r in enumerate(m) for j in range(len(r))), key=lambda t: m[t[0]][t[1]])
    return f"block {b} head {h}"


def _argmin(m: tuple[tuple[float, ...], ...]) -> str:
    b, h = min(((i, j) for i, r in enumerate(m) for j in range(len(r))), key=lambda t: m[t[0]][t[1]])
    return f"block {b} head {h}"
