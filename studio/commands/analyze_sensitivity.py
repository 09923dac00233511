"""CLI: ``analyze sensitivity`` -- top-1 accuracy vs the fraction of one block's heads (or MLP neurons) removed.

``python -m studio analyze sensitivity --model demo --data demo --scope heads --fractions 0.25,0.5,0.75`` runs the
per-layer sensitivity analysis of Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017), as Distiller
popularised it, through the ``sensitivity`` flow: the spec goes into a run folder (``--out RUN``, default
``runs/<time>-sensitivity``) like every other kind of work, so the Sensitivity page shows the same sweep and
``python -m studio run --spec RUN/spec.json --out NEW`` replays it. Prints one row per block, one column per fraction.
"""

from __future__ import annotations

import argparse

from ..analysis.importance import CRITERIA
from ..analysis.sensitivity import DEFAULT_FRACTIONS, SCOPES, SensitivityResult
from ..argtypes import nonnegative_int, positive_int
from ..errors import StudioError
from ..flows.sensitivity import SensitivitySpec
from . import Output, add_common, add_data_args, add_model_args, data_spec, model_spec, run_in_folder, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sensitivity",
        help="per-block sensitivity: accuracy vs fraction of one block's heads or MLP neurons removed",
        description="Each block alone loses its lowest-scored fraction of units; the model is evaluated on --split.",
    )
    add_model_args(p)
    add_data_args(p)
    add_common(p)
    g = p.add_argument_group("sensitivity")
    g.add_argument("--scope", choices=SCOPES, default="heads", help="units removed from one block at a time")
    g.add_argument(
        "--criterion",
        default="l1",
        help=f"which units go first (lowest-scored): {', '.join(CRITERIA.names())} (l1, l2 need no data)",
    )
    g.add_argument(
        "--fractions",
        default=",".join(str(f) for f in DEFAULT_FRACTIONS),
        help="comma-separated fractions of a block's units to remove, each in (0, 1)",
    )
    g.add_argument(
        "--batches", type=nonnegative_int, default=4, help="calibration batches for taylor/taylor2"
    )
    g.add_argument("--batch-size", type=positive_int, default=64)
    g.add_argument("--calib-split", default="train", help="split the calibration batches are drawn from")
    g.add_argument(
        "--micro-batch", type=nonnegative_int, default=0, help="images per calibration pass (0: fits)"
    )
    g.add_argument("--seed", type=nonnegative_int, default=0)
    g.add_argument("--out", help="run folder (default runs/<time>-sensitivity)")
    p.set_defaults(func=cmd_analyze_sensitivity)


def parse_fractions(text: str) -> tuple[float, ...]:
    """``"0.25,0.5"`` -> ``(0.25, 0.5)``; anything that is not a number is refused in one sentence."""
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise StudioError(
            f"--fractions must be comma-separated numbers in (0, 1), e.g. 0.25,0.5, not {text!r}."
        ) from None


def sweep_table(res: SensitivityResult) -> list[dict[str, object]]:
    """One row per block: top-1 at each fraction removed (and the units left), the dense row first."""
    dense = {f"{f:.0%}": res.dense.top1 for f in res.fractions}
    rows: list[dict[str, object]] = [{"block": "dense", **dense, "kept": "all"}]
    for b in sorted({r.block for r in res.rows}):
        mine = [r for r in res.rows if r.block == b]
        rows.append(
            {
                "block": b,
                **{f"{r.fraction:.0%}": r.point.top1 for r in mine},
                "kept": "/".join(str(r.kept) for r in mine),
            }
        )
    return rows


def cmd_analyze_sensitivity(args: argparse.Namespace) -> Output:
    spec = SensitivitySpec(
        model=model_spec(args),
        data=data_spec(args),
        scope=args.scope,
        criterion=args.criterion,
        fractions=parse_fractions(args.fractions),
        eval_split=args.split,
        batches=args.batches,
        batch_size=args.batch_size,
        calib_split=args.calib_split,
        micro_batch=args.micro_batch,
        seed=args.seed,
    )
    run, result = run_in_folder(spec, args.out, resume=False, device=args.device, label="sensitivity")
    res = SensitivityResult.from_dict(result.section)
    unit = "heads" if res.scope == "heads" else "MLP neurons"
    text = (
        f"top-1 on {res.dense.n} {spec.eval_split} images with one block's {unit} removed by {res.criterion} "
        f"(kept units per fraction in the last column)\n\n{table(sweep_table(res))}\n\nrun folder {run.path}"
    )
    return Output({"run": str(run.path), **result.to_dict()}, text)
