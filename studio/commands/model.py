"""CLI: ``info``, ``eval``, ``bench``, ``features`` and ``demo build``."""

from __future__ import annotations

import argparse
import time

import torch

from ..argtypes import nonnegative_int, positive_int
from ..backends import BACKENDS
from ..bench import count_macs, count_params, measure_throughput
from ..data import prepare
from ..demo import DemoBuildSpec, build_demo
from ..device import describe_device
from ..errors import StudioError
from ..evaluate import evaluate
from ..features import cached_extract
from ..load import load_model
from ..models import DEMO_DIR
from ..summary import model_summary
from . import Output, add_common, add_data_args, add_model_args, data_spec, model_spec, stderr_progress, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="architecture summary, params and MACs of a model")
    add_model_args(p)
    add_common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="top-1 and per-class accuracy on a split")
    add_model_args(p)
    add_data_args(p)
    add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="measured throughput and latency")
    add_model_args(p)
    add_common(p)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 64])
    p.add_argument("--warmup", type=nonnegative_int, default=10)
    p.add_argument("--repeats", type=positive_int, default=30)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS.names(),
        default=["eager"],
        help="deployment runtimes to time the model on (ONNX Runtime: float32 only)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("features", help="extract (and cache) the per-block feature bank")
    add_model_args(p)
    add_data_args(p)
    add_common(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("demo", help="the embedded demo model")
    dsub = p.add_subparsers(dest="demo_command", required=True)
    b = dsub.add_parser("build", help="pre-train on shapes, fine-tune on digits, write assets/demo")
    b.add_argument("--out", default=None, help="output folder (default: assets/demo)")
    b.add_argument("--pretrain-epochs", type=positive_int, default=8)
    b.add_argument("--finetune-epochs", type=positive_int, default=30)
    b.add_argument("--pretrain-images", type=positive_int, default=6000)
    add_common(b)
    b.set_defaults(func=cmd_demo_build)


def cmd_info(args: argparse.Namespace) -> Output:
    s = model_summary(load_model(model_spec(args)))
    text = (
        f"{s['arch']} from {s['source']} on {s['device']}\n"
        f"depth {s['depth']}, width {s['embed_dim']}, {s['num_classes']} classes, input {s['input_size']}\n"
        f"params {s['params']:,}   MACs {s['macs']:,} (attention {s['macs_attention']:,}, "
        f"linear {s['macs_linear']:,}, conv {s['macs_conv']:,})\n\n" + table(s["blocks"])
    )
    return Output(s, text)


def cmd_eval(args: argparse.Namespace) -> Output:
    loaded = load_model(model_spec(args))
    ds = prepare(
        data_spec(args),
        args.split,
        loaded.data_config,
        loaded.base.num_classes,
        class_names=loaded.known_class_names,
    )
    cbs = [stderr_progress()]
    t0 = time.time()
    ev = evaluate(loaded.model, ds, callbacks=cbs)
    macs = count_macs(loaded.model, loaded.data_config["input_size"])["total"]
    out = {
        "model": loaded.source,
        "data": args.data,
        "split": args.split,
        "top1": ev.top1,
        "loss": ev.loss,
        "n": ev.n,
        "per_class": dict(zip(loaded.class_names or map(str, range(len(ev.per_class))), ev.per_class)),
        "params": count_params(loaded.model),
        "macs": macs,
        "seconds": time.time() - t0,
    }
    text = (
        f"top-1 {ev.top1:.4f} on {ev.n} {args.split} images of {args.data}  (loss {ev.loss:.4f})\n"
        f"params {out['params']:,}  MACs {macs:,}\n"
        + table([{"class": k, "accuracy": v} for k, v in out["per_class"].items()])
    )
    return Output(out, text)


def cmd_bench(args: argparse.Namespace) -> Output:
    bad = [b for b in args.backends if not BACKENDS.get(b).supports(args.dtype)]
    if bad:  # said before the model loads
        raise StudioError(f"{', '.join(bad)} cannot time {args.dtype}: use --dtype float32 or drop {bad[0]}.")
    loaded = load_model(model_spec(args))
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    rows = [
        measure_throughput(
            loaded.model,
            loaded.data_config["input_size"],
            batch_size=bs,
            warmup=args.warmup,
            repeats=args.repeats,
            dtype=dtype,
            backend=backend,
            callbacks=[stderr_progress()],
        ).to_dict()
        for backend in args.backends
        for bs in args.batch_sizes
    ]
    out = {"model": loaded.source, "device": describe_device(loaded.device), "results": rows}
    return Output(
        out,
        f"{loaded.source} on {out['device']}\n"
        + table(rows, ["backend", "batch_size", "images_per_s", "latency_ms", "latency_ms_p90", "dtype"]),
    )


def cmd_features(args: argparse.Namespace) -> Output:
    loaded = load_model(model_spec(args))
    spec = data_spec(args)
    ds = prepare(
        spec, args.split, loaded.data_config, loaded.base.num_classes, class_names=loaded.known_class_names
    )
    t0 = time.time()
    bank = cached_extract(
        loaded.model,
        ds,
        {"data": spec.to_dict(), "split": args.split, "transform": loaded.data_config},
        callbacks=[stderr_progress()],
    )
    out = {
        "depth": bank.depth,
        "samples": int(bank.labels.numel()),
        "dim": int(bank.cls.shape[-1]),
        "seconds": time.time() - t0,
    }
    return Output(
        out, f"{out['samples']} samples x {out['depth']} blocks x {out['dim']} dims in {out['seconds']:.1f}s"
    )


def cmd_demo_build(args: argparse.Namespace) -> Output:

    spec = DemoBuildSpec(
        pretrain_images=args.pretrain_images,
        pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.finetune_epochs,
        out=args.out or str(DEMO_DIR),
    )
    metrics = build_demo(spec, callbacks=[stderr_progress()])
    return Output(
        {"out": spec.out, **metrics},
        f"demo written to {spec.out}: test top-1 {metrics['test_top1']:.4f}, val {metrics['val_top1']:.4f}",
    )
