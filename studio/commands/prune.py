"""CLI: ``prune``, ``export``, ``apply`` and ``plan show|diff``.

``prune --method NAME`` dispatches on the method registry (:data:`studio.prune.METHODS`): every option a method
declares becomes a flag here (``--scope``, ``--norm``, ...) and any option can also be given as
``--param NAME=VALUE``, so a new method plugs in without editing this file.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from .. import memory
from ..argtypes import in_range, nonnegative_int, positive_int
from ..bench import profile
from ..costs import with_summary
from ..errors import StudioError
from ..export import export, export_loaded, export_onnx
from ..flows.prune import PruneSpec, calibration_estimate, calibration_seconds
from ..flows.stages import compare
from ..load import load_model
from ..plan import PrunePlan, diff
from ..prune import COMMON_OPTIONS, METHODS, all_options, get_method, load_methods
from ..prune.presets import active_preset, apply_preset, preset_names
from ..prune.target import missed_message
from ..surgery import apply_plan
from . import Output, add_common, add_data_args, add_model_args, data_spec, model_spec, run_in_folder, table


def register(sub: argparse._SubParsersAction) -> None:

    load_methods()
    p = sub.add_parser(
        "prune",
        help="make a pruning plan with a method, apply it, measure and export",
        description="Methods: " + "; ".join(f"{n}: {METHODS.get(n).summary}" for n in METHODS),
    )
    add_model_args(p)
    add_data_args(p, default=None)  # demo data by default only for the demo model (see cmd_prune)
    add_common(p)
    p.add_argument("--method", required=True, choices=METHODS.names(), help="pruning method")
    g = p.add_argument_group("budget")
    for o in COMMON_OPTIONS:
        _add_option(g, o, None)
    g = p.add_argument_group("method options (see each method)")
    for o in all_options().values():
        if o not in COMMON_OPTIONS:
            users = {
                n: x for n in METHODS for x in METHODS.get(n).options if x.name == o.name
            }  # methods sharing a flag may differ in meaning and default: say each one's
            _add_option(g, o, users)
    g.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any method option, e.g. --param scope=heads,mlp (repeatable)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder (default runs/<time>-prune-<method>)")
    g.add_argument(
        "--preset",
        choices=preset_names(),
        help="cpu: the studio's defaults (the default); paper or paper:<method>: the reference settings, every "
        "value with its source (docs/results/presets.md); flags given here win over the preset",
    )
    g.add_argument("--calib-split", default=None, help="split drawn for calibration batches (default train)")
    g.add_argument(
        "--calib-batches",
        type=positive_int,
        default=None,
        help="calibration batches for data-driven methods (default: the method's need; SLS enough for its "
        "--samples, the others 8)",
    )
    g.add_argument("--batch-size", type=positive_int, default=None, help="default 64 (or the preset's)")
    g.add_argument(
        "--micro-batch",
        type=nonnegative_int,
        default=0,
        help="images per calibration pass (gradients accumulate to the batch's); 0 = largest that fits "
        "the memory budget",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory and time estimate of the calibration and stop",
    )
    g.add_argument("--seed", type=nonnegative_int, default=0)
    g.add_argument("--no-eval", action="store_true", help="skip accuracy before/after")
    g.add_argument("--no-bench", action="store_true", help="skip throughput before/after")
    g.add_argument("--bench-batch-sizes", type=positive_int, nargs="+", default=[1, 64])
    g.add_argument("--bench-repeats", type=positive_int, default=10)
    g.add_argument("--no-export", action="store_true", help="do not write the pruned model")
    g.add_argument("--resume", action="store_true", help="continue a cancelled training method in --out")
    g.add_argument("--onnx", action="store_true", help="also export ONNX (checked for parity)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "export", help="export a model (optionally pruned by a plan) as safetensors + manifest"
    )
    add_model_args(p)
    add_common(p)
    p.add_argument("--plan", help="plan.json to apply before exporting (omit to export the model as is)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx, checked for parity")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("apply", help="replay a plan on a model: counted params/MACs vs the plan's")
    add_model_args(p)
    add_common(p)
    p.add_argument("--plan", required=True, help="plan.json")
    p.add_argument("--out", help="also export the pruned model to this folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("plan", help="read pruning plans")
    psub = p.add_subparsers(dest="plan_command", required=True, metavar="ACTION")
    s = psub.add_parser("show", help="the kept structure of a plan")
    s.add_argument("plan")
    add_common(s)
    s.set_defaults(func=cmd_plan_show)
    s = psub.add_parser("diff", help="differences between two plans")
    s.add_argument("a")
    s.add_argument("b")
    add_common(s)
    s.set_defaults(func=cmd_plan_diff)


def _add_option(g: argparse._ArgumentGroup, o: Any, users: dict[str, Any] | None) -> None:
    if users and len(users) > 1:  # one flag, several methods: each one's meaning and default
        text = "; ".join(f"{n}: {x.help} (default {x.default})" for n, x in users.items())
    else:
        text = o.help + (f" (default {o.default})" if o.default is not None else "")
        text += f" [{', '.join(users)}]" if users else ""
    g.add_argument(
        "--" + o.name.replace("_", "-"),
        dest=o.name,
        default=None,
        type=_flag_type(o),
        **({"nargs": "?", "const": "true"} if o.type is bool else {}),  # bare --flag means true
        help=text.replace("%", "%%"),
    )


def _flag_type(o: Any) -> Any:
    """The argparse type of a method option: numbers refuse NaN/inf and the option's own bounds at parse time."""
    if o.type is bool:
        return str  # "true"/"false", read by the option itself
    if o.type in (int, float):  # choices, if any, are checked by the option itself
        return in_range(o.type, o.low, o.high)
    return o.type


def method_params(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Options given on the command line (flags and ``--param``), checked against the method's options."""
    return get_method(method).resolve(given_params(args, method))


def given_params(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Only the options given on the command line (flags and ``--param``), refused if not the method's."""

    m = get_method(method)
    own = {o.name for o in (*COMMON_OPTIONS, *m.options)}
    given: dict[str, Any] = {}

    for name in all_options():
        v = getattr(args, name, None)
        if v is None:
            continue
        if name not in own:
            raise StudioError(
                f"--{name.replace('_', '-')} is not an option of method '{method}'. Its options: "
                f"{', '.join('--' + n.replace('_', '-') for n in sorted(own))}."
            )
        given[name] = v
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise StudioError(f"--param expects NAME=VALUE, got {item!r}.")
        given[key.strip().replace("-", "_")] = value
    return given


def spec_of(args: argparse.Namespace) -> PruneSpec:
    """The run spec ``prune`` builds: the preset's values (if any), then the flags given, on top."""
    given, run = apply_preset(
        args.preset,
        args.method,
        given_params(args, args.method),
        {"calib_batches": args.calib_batches, "batch_size": args.batch_size, "calib_split": args.calib_split},
    )
    params = get_method(args.method).resolve(given)
    if args.data is None and args.model in ("demo", "demo-backbone"):
        args.data = "demo"
    return PruneSpec(
        model=model_spec(args),
        method=args.method,
        params=params,
        data=data_spec(args) if args.data else None,
        eval_split=args.split,
        calib_split=run.get("calib_split", "train"),
        calib_batches=run.get("calib_batches"),
        batch_size=run.get("batch_size", 64),
        preset=args.preset,
        micro_batch=args.micro_batch,
        seed=args.seed,
        evaluate=not args.no_eval,
        bench=not args.no_bench,
        bench_batch_sizes=tuple(args.bench_batch_sizes),
        bench_repeats=args.bench_repeats,
        export=not args.no_export,
        onnx=args.onnx,
    )


def cmd_prune(args: argparse.Namespace) -> Output:

    spec = spec_of(args)
    if args.dry_run:
        return _dry_run(spec, args)
    folder, result = run_in_folder(
        spec, args.out, resume=args.resume, device=args.device, label=f"prune-{args.method}"
    )
    # the preset line only where a method has a paper preset to tell apart from the studio's defaults
    active = (
        active_preset(spec.method, spec.params, spec.to_dict())
        if len(preset_names(spec.method)) > 1
        else None
    )
    data = {"run": str(folder.path), "preset": active, **result.to_dict()}
    return Output(data, _prune_text(data, result.plan))


def _dry_run(spec: PruneSpec, args: argparse.Namespace) -> Output:
    """The calibration's memory and time estimate, with nothing written and no calibration run."""
    spec.validate()
    loaded = load_model(spec.model)
    est = calibration_estimate(spec, loaded)
    if est is None:
        text = f"{spec.method} uses no calibration data: it needs little more memory than the model."
        return Output({"method": spec.method, "estimate": None}, text)
    seconds = calibration_seconds(spec, loaded, est)
    data = {
        "method": spec.method,
        "device": str(loaded.device),
        "estimate": est.to_dict(),
        "calibration_seconds": round(seconds, 1),
        "available_bytes": memory.available_bytes(),
    }
    text = (
        f"{spec.method} on {loaded.base.arch}: calibration of {spec.batches} x {spec.batch_size} images "
        f"needs {est.describe()}; about {seconds:.0f} s here ({memory.gib(memory.available_bytes())} free)."
    )
    return Output(data, text)


def _pct(a: float, b: float) -> str:
    return f"{a:,} -> {b:,} ({b / a:.1%})"


def _prune_text(d: dict[str, Any], plan: PrunePlan | None) -> str:

    b, a = d["before"], d["after"]
    lines = [
        plan.describe() if plan is not None else "",
        "",
        f"params  {_pct(b['params'], a['params'])}",
        f"MACs    {_pct(b['macs'], a['macs'])}   (ideal speed-up x{d['ideal_speedup']:.2f})",
    ]
    if d.get("preset"):
        lines.append(f"preset  {d['preset']} (what each value means: docs/results/presets.md)")
    solved = (d.get("params") or {}).get("solved")
    if solved and "target_missed" in solved:  # every method that solves a MACs target records it
        met = f"met: keeps {solved['macs_fraction']:.1%} of the MACs, asked {solved['target_macs']:.1%}"
        missed = missed_message(solved)
        lines.append("target  " + (met if missed is None else missed.removeprefix("target ")))
    lat = (d.get("prune") or {}).get("latency")
    if lat:
        flag = "  MISSED (>10 %)" if lat["missed"] else ""
        lines.append(
            f"latency target {lat['target_ms']:.2f} ms, predicted {lat['predicted_ms']:.2f}, measured "
            f"{lat['measured_ms']:.2f} (batch {lat['batch']}, {lat['backend']}; dense {lat['dense_ms']:.2f}){flag}"
        )
    peak = d.get("peak_memory_mb") or {}
    if peak:
        lines.append("peak    " + ", ".join(f"{k} {v:,.0f} MiB" for k, v in peak.items()))
    if a.get("top1") is not None and b.get("top1") is not None:
        trained = get_method(d["method"]).trains
        note = "after the method's training" if trained else "no recovery training"
        lines.append(f"top-1   {b['top1']:.4f} -> {a['top1']:.4f} ({note})")
    rows = [
        {
            "batch": bs,
            "base img/s": b["throughput"][bs]["images_per_s"],
            "pruned img/s": a["throughput"][bs]["images_per_s"],
            "speed-up": s,
        }
        for bs, s in d["speedup"].items()
    ]
    if rows:
        lines += ["", table(rows)]
    if d.get("export"):
        lines.append(f"\nexported to {d['export']}" + (" (+ model.onnx)" if d.get("onnx") else ""))
    lines.append(f"run folder {d['run']}")
    return "\n".join(lines)


def _load(args: argparse.Namespace):

    loaded = load_model(model_spec(args))
    if loaded.plan is not None and not loaded.plan.is_dense:
        raise StudioError(
            f"{args.model} is already pruned; plans apply to the unpruned base model. Give the base "
            "checkpoint with --model."
        )
    return loaded


def _pruned(loaded, plan: PrunePlan):

    return apply_plan(copy.deepcopy(loaded.model), plan).eval(), with_summary(plan)


def cmd_export(args: argparse.Namespace) -> Output:
    import torch

    loaded = _load(args)
    plan = PrunePlan.load(args.plan) if args.plan else None
    model, plan = _pruned(loaded, plan) if plan is not None else (loaded.model, None)
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    prof = profile(model, loaded.data_config["input_size"])
    folder = export(
        model,
        loaded.base,
        args.out,
        plan=plan,
        data_config=loaded.data_config,
        class_names=loaded.class_names,
        class_names_known=loaded.class_names_known,
        metrics={**loaded.metrics, **prof},
        dtype=dtype,
        overwrite=args.overwrite,
    )
    data: dict[str, Any] = {"export": str(folder), **prof, "onnx": None}
    if args.onnx:
        data["onnx"] = export_onnx(model, Path(folder) / "model.onnx", loaded.data_config["input_size"])
    text = f"exported {loaded.base.arch} ({prof['params']:,} params, {prof['macs']:,} MACs) to {folder}"
    if data["onnx"]:
        o = data["onnx"]
        text += f"\nONNX: {o['path']}" + (f" (max |diff| {o['max_abs_diff']:.2e})" if o["checked"] else "")
    return Output(data, text)


def cmd_apply(args: argparse.Namespace) -> Output:

    loaded = _load(args)
    plan = PrunePlan.load(args.plan)
    model, summarized = _pruned(loaded, plan)
    prof = profile(model, loaded.data_config["input_size"])
    compare({}, prof, summarized)  # the counted cost against the plan's analytic one: prof["matches_plan"]
    s = summarized.summary
    data: dict[str, Any] = {
        **prof,
        "plan_params": s["params_after"],
        "plan_macs": s["macs_after"],
        "stored_summary_matches": all(
            plan.summary.get(k) == s[k] for k in ("params_after", "macs_after") if k in plan.summary
        ),
        "export": None,
    }
    if args.out:
        export_loaded(model, loaded, args.out, plan=summarized, metrics=prof, overwrite=args.overwrite)
        data["export"] = str(args.out)
    text = (
        summarized.describe()
        + f"\ncounted: params {prof['params']:,}, MACs {prof['macs']:,} — "
        + ("matches the plan" if data["matches_plan"] else "DIFFERS from the plan's analytic cost")
    )
    if data["export"]:
        text += f"\nexported to {data['export']}"
    return Output(data, text)


def cmd_plan_show(args: argparse.Namespace) -> Output:

    plan = with_summary(PrunePlan.load(args.plan))
    return Output(plan.to_dict(), plan.describe())


def cmd_plan_diff(args: argparse.Namespace) -> Output:
    a, b = PrunePlan.load(args.a), PrunePlan.load(args.b)
    lines = diff(a, b)
    return Output(
        {"a": args.a, "b": args.b, "same": not lines, "differences": lines},
        "\n".join(lines) if lines else "same structure",
    )
