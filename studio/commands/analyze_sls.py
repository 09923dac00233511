"""CLI: ``analyze sls`` — per-layer CLS separability and the SLS depth cut (Han & Tang, ECCV 2024).

``python -m studio analyze sls --model demo --data demo --alpha 0.3 --embed tsne --samples 1000 --json`` prints
per-layer scores (kNN accuracy, high-dimensional silhouette, 2-D embedding silhouette) and the cut. With
``--apply`` it also runs the paper's pipeline on the cut (retrain, measure, export) in a run folder — the
command the studio's Layer separability page starts as a background job.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..analysis.separability import SeparabilitySpec, analyze
from ..argtypes import fraction, nonnegative_int, positive_float, positive_int
from ..flows.sls import SLSRunSpec
from ..prune.sls import TRAINABLE
from . import (
    Output,
    add_common,
    add_data_args,
    add_model_args,
    data_spec,
    model_spec,
    run_in_folder,
    stderr_progress,
    table,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sls",
        help="per-layer CLS separability (t-SNE silhouette) and the SLS depth cut",
        description="SLS (Han & Tang, ECCV 2024): score every layer's CLS tokens, cut where the score falls "
        "below alpha x the last layer's.",
    )
    add_model_args(p)
    add_data_args(p)
    add_common(p)
    g = p.add_argument_group("analysis")
    g.add_argument("--analysis-split", default="train", help="split analysed (SLS: the training split)")
    g.add_argument(
        "--samples", type=nonnegative_int, default=1000, help="seeded subset size (0: the whole split)"
    )
    g.add_argument("--alpha", type=fraction, default=0.3, help="threshold factor (paper: 0.3)")
    g.add_argument(
        "--embed",
        choices=["tsne", "umap", "pca", "none"],
        default="tsne",
        help="2-D embedding scored by the silhouette (none: fast scores only)",
    )
    g.add_argument("--perplexity", type=positive_float, default=30.0, help="t-SNE perplexity (paper: 30)")
    g.add_argument("--seed", type=nonnegative_int, default=0)
    g.add_argument(
        "--lazy",
        action="store_true",
        help="embed only the layers the top-down scan reads (as the paper's code)",
    )
    g.add_argument("--points", action="store_true", help="include the 2-D points in the JSON output")
    g = p.add_argument_group("apply (cut, retrain, measure, export)")
    g.add_argument("--apply", action="store_true", help="also cut the model, retrain and measure")
    g.add_argument(
        "--keep", type=positive_int, help="blocks to keep instead of the alpha rule (skips the analysis)"
    )
    g.add_argument(
        "--retrain",
        choices=["auto", "paper", "cpu", "none"],
        default="auto",
        help="SLS recipe: paper = 100 epochs, cpu = 20; auto = paper on a GPU, else cpu",
    )
    g.add_argument(
        "--trainable",
        default="auto",
        choices=list(TRAINABLE),
        help="what retrains (auto: adapters + head if the model has them, else head + final norm)",
    )
    g.add_argument("--epochs", type=positive_int, help="override the preset's epochs")
    g.add_argument("--no-bench", action="store_true", help="skip throughput")
    g.add_argument("--out", help="run folder for --apply (default runs/<time>-sls)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted --apply run's retraining")
    p.set_defaults(func=cmd_analyze_sls)


def _fmt(v: Any) -> Any:
    return "" if v is None else round(float(v), 4)


def cmd_analyze_sls(args: argparse.Namespace) -> Output:
    if args.apply or args.keep is not None:
        return _apply(args)

    spec = SeparabilitySpec(
        model=model_spec(args),
        data=data_spec(args),
        split=args.analysis_split,
        samples=args.samples or None,
        embed=args.embed,
        alpha=args.alpha,
        perplexity=args.perplexity,
        seed=args.seed,
        lazy=args.lazy,
    )
    res = analyze(spec, callbacks=[stderr_progress()])
    d = res.to_dict(points=args.points)
    cut = res.suggested
    rows = [
        {
            "layer": r["layer"],
            "kNN acc": _fmt(r["knn"]),
            "silhouette (high-dim)": _fmt(r["silhouette_hd"]),
            f"silhouette ({args.embed})": _fmt(r["silhouette"]),
            "kept": "yes" if r["kept"] else "",
        }
        for r in d["layers"]
    ]
    text = "\n".join(
        [
            f"{res.samples} {res.split} images, {res.depth} layers, embedding {args.embed}, alpha {args.alpha}",
            table(rows),
            "",
            ("cut: " if res.cut is not None else "cut (fast preview, no 2-D embedding): ") + cut.reason,
            f"keep {cut.keep} of {res.depth} blocks; "
            + ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items()),
        ]
    )
    return Output(d, text)


def sls_spec(args: argparse.Namespace) -> SLSRunSpec:
    """The :class:`~studio.flows.sls.SLSRunSpec` of ``analyze sls --apply`` arguments."""
    return SLSRunSpec(
        model=model_spec(args),
        data=data_spec(args),
        keep=args.keep,
        alpha=args.alpha,
        embed=args.embed,
        samples=args.samples or None,
        analysis_split=args.analysis_split,
        perplexity=args.perplexity,
        retrain=args.retrain,
        trainable=args.trainable,
        epochs=args.epochs,
        eval_split=args.split,
        seed=args.seed,
        bench=not args.no_bench,
    )


def _apply(args: argparse.Namespace) -> Output:
    run, res = run_in_folder(sls_spec(args), args.out, resume=args.resume, device=args.device, label="sls")
    d = {"run": str(run.path), **res.to_dict()}
    sec = res.section
    lines = []
    if sec.get("cut"):
        lines += [sec["cut"]["reason"], ""]
    lines.append(table(sec["table"]))
    if res.speedup:
        lines.append(
            "speed-up of the cut: "
            + ", ".join(f"x{v:.2f} at batch {k}" for k, v in res.speedup.items())
            + f" (ideal from MACs x{res.ideal_speedup:.2f})"
        )
    lines += [*sec["notes"], f"run folder {run.path}"]
    return Output(d, "\n".join(lines))
