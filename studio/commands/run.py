"""CLI: ``run`` -- run the spec of a run folder (what every background job is, also under ``torchrun``).

``python -m studio run runs/NAME`` runs ``runs/NAME/spec.json`` with its flow (:mod:`studio.flows`);
``--resume`` continues a cancelled or failed run from its checkpoints; ``--spec FILE --out runs/NEW`` copies a
``spec.json`` (e.g. from a model card) into a new run folder and runs it, which reproduces that run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..argtypes import nonnegative_int
from ..errors import StudioError
from ..flows import (
    FLOWS,
    create_run,
    load_flows,
    read_spec,
    spec_from_dict,
)
from ..runs import RunDir, read_json
from ..threads import budget, check_threads
from . import Output, add_common, execute


def register(sub: argparse._SubParsersAction) -> None:
    load_flows()
    p = sub.add_parser(
        "run",
        help="run the spec.json of a run folder (background jobs and torchrun use this)",
        description="Kinds: " + "; ".join(f"{k}: {FLOWS.get(k).summary}" for k in FLOWS),
    )
    p.add_argument("run", nargs="?", help="run folder holding spec.json, e.g. runs/NAME")
    p.add_argument("--spec", help="a spec.json to copy into the new run folder --out, then run")
    p.add_argument("--out", help="the new run folder for --spec")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoints")
    p.add_argument(
        "--threads",
        type=nonnegative_int,
        default=0,
        help="torch CPU threads of this process (0: the cores OMP_NUM_THREADS / the affinity allow)",
    )
    add_common(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> Output:
    torch.set_num_threads(check_threads(args.threads) or budget())
    if args.spec:
        if args.run or not args.out:
            raise StudioError("With --spec give the new run folder as --out runs/NAME (and no RUN).")
        spec = spec_from_dict(read_json(Path(args.spec)))
        run = create_run(spec, args.out)
    elif args.run:
        if args.out:
            raise StudioError("--out goes with --spec; to run an existing run folder give only RUN.")
        run = RunDir(Path(args.run))
        spec = read_spec(run)
    else:
        raise StudioError(
            "Give a run folder (python -m studio run runs/NAME) or --spec FILE --out runs/NAME."
        )
    result = execute(run, spec, resume=args.resume, device=args.device)
    if result is None:  # a rank other than 0 of a torchrun group: rank 0 reports
        return Output({"run": str(run.path)}, "")
    d = {"run": str(run.path), **result.to_dict()}
    return Output(d, result_text(d))


def result_text(d: dict[str, Any]) -> str:
    """A few lines any kind's result reads as (the common shape of ``results.json``)."""
    b, a = d["before"], d["after"]
    lines = [f"{d['kind']} run ({d['method']}) on {d['device']} in {d['seconds']:.1f} s: {d['run']}"]
    if b.get("params") and a.get("params"):
        lines.append(f"params  {b['params']:,} -> {a['params']:,} ({a['params'] / b['params']:.1%})")
        lines.append(f"MACs    {b['macs']:,} -> {a['macs']:,} (ideal speed-up x{d['ideal_speedup']:.2f})")
    if a.get("top1") is not None:
        before = f"{b['top1']:.4f} -> " if b.get("top1") is not None else ""
        lines.append(f"top-1   {before}{a['top1']:.4f}")
    for bs, s in d["speedup"].items():
        lines.append(f"batch {bs}: measured speed-up x{s:.2f}")
    if d.get("export"):
        lines.append(f"exported to {d['export']}" + (" (+ model.onnx)" if d.get("onnx") else ""))
    return "\n".join(lines)
