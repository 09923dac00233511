"""CLI: ``import FILE --out DIR``: a whole pickled pruned timm ViT (Torch-Pruning, Isomorphic) as a studio export."""

from __future__ import annotations

import argparse

from ..argtypes import json_object
from ..importer import import_pruned
from . import Output, add_common, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="convert a pickled pruned timm ViT (torch.save(model)) into an export, through an allow-list",
    )
    p.add_argument(
        "file", metavar="FILE", help="the torch.save(model) file (Torch-Pruning / Isomorphic output)"
    )
    p.add_argument(
        "--out", required=True, help="the export folder to write (manifest.json + model.safetensors)"
    )
    p.add_argument(
        "--arch",
        help="timm architecture it was pruned from (default: recorded in the file, else detected by its sizes)",
    )
    p.add_argument(
        "--timm-kwargs",
        type=json_object,
        default="{}",
        help="constructor args of that base as JSON (default: those recorded in the file)",
    )
    p.add_argument("--class-names", nargs="+", help="class names in label order, when known")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_common(p)
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> Output:
    res = import_pruned(
        args.file,
        args.out,
        arch=args.arch,
        kwargs=args.timm_kwargs,
        class_names=args.class_names,
        overwrite=args.overwrite,
    )
    d = res.to_dict()
    s = res.plan.summary
    rows = [{"block": i, **b} for i, b in enumerate(d["widths"]["blocks"])]
    text = (
        f"imported {args.file} as a pruned {d['arch']} (base {d['base_from']}) into {d['out']}\n"
        f"embedding {d['widths']['embed']}/{res.plan.base.embed_dim}, params {s['params_after']:,} of "
        f"{s['params_before']:,}, MACs {s['macs_fraction']:.1%} of the base; logits match the pickled module "
        f"to {d['parity_max_abs_diff']:.2g}\n" + table(rows)
    )
    return Output(d, text)
