"""CLI: ``retrain`` (recovery after pruning, optionally distilled, single- or multi-process) and ``jobs``.

``retrain --model runs/P/export --data demo --out runs/R`` fine-tunes a pruned export; ``retrain --run runs/R``
runs the spec already in a run folder (what background jobs and ``torchrun --nproc_per_node N -m studio retrain
--run runs/R`` use); ``--resume`` continues from the run's checkpoint. ``jobs list|status|cancel|resume|logs|start``
manage background jobs (see :mod:`studio.jobs`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import jobs
from ..argtypes import fraction, nonnegative_float, nonnegative_int, positive_float, positive_int
from ..errors import StudioError
from ..flows.retrain import RecoverySpec
from ..models import ModelSpec
from ..recovery import KD_MODES, infer_teacher, preset_names
from ..runs import RunDir
from . import Output, add_common, add_data_args, add_model_args, data_spec, execute, model_spec, table

_RECIPE_FLAGS = {  # flag -> (type, recipe field, help)
    "--epochs": (positive_int, "epochs", "training epochs"),
    "--lr": (positive_float, "lr", "peak learning rate (AdamW)"),
    "--batch-size": (positive_int, "batch_size", "batch size per process"),
    "--weight-decay": (nonnegative_float, "weight_decay", "AdamW weight decay"),
    "--warmup-epochs": (nonnegative_float, "warmup_epochs", "linear warm-up length before the cosine decay"),
    "--min-lr": (nonnegative_float, "min_lr", "final learning rate of the cosine"),
    "--label-smoothing": (fraction, "label_smoothing", "label smoothing of the cross-entropy"),
    "--temperature": (positive_float, "temperature", "soft distillation temperature T"),
    "--alpha": (fraction, "alpha", "distillation weight α (1 − α on the labels)"),
    "--early-stop": (positive_int, "early_stop", "stop after N epochs without validation gain"),
    "--trainable": (str, "trainable", "all, head, or re:<regex> over parameter names"),
    "--auto-augment": (
        str,
        "auto_augment",
        "timm RandAugment/AutoAugment policy of the training images, e.g. rand-m9-mstd0.5-inc1 (DeiT's); "
        "none = no policy (a policy implies --augment)",
    ),
    "--re-prob": (
        fraction,
        "re_prob",
        "random erasing probability, timm's pixel mode (DeiT: 0.25; implies --augment)",
    ),
    "--mixup": (nonnegative_float, "mixup", "Mixup alpha (DeiT: 0.8; 0 = off; needs --kd none)"),
    "--cutmix": (nonnegative_float, "cutmix", "CutMix alpha (DeiT: 1.0; 0 = off; needs --kd none)"),
}


def _runs_root() -> Path:
    return Path(os.environ.get("STUDIO_RUNS", "runs"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="recover a pruned model: fine-tune with optional distillation (also under torchrun)",
        description="Fine-tune a pruned model, optionally distilling from the unpruned one. "
        "Multi-GPU: torchrun --nproc_per_node N -m studio retrain --run runs/NAME",
    )
    add_model_args(p)
    p.set_defaults(model=None)
    add_data_args(p)
    add_common(p)
    g = p.add_argument_group("run")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--out", help="new run folder, e.g. runs/NAME")
    where.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        help="existing run folder whose spec.json to run (under torchrun write --run-dir: torchrun's own "
        "parser takes --run for an abbreviation of its --run-path)",
    )
    g.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    g.add_argument("--dry-run", action="store_true", help="write the run's spec.json and stop")
    g.add_argument("--seed", type=nonnegative_int, default=0)
    g.add_argument("--no-bench", action="store_true", help="skip the throughput measurement")
    g.add_argument("--no-export", action="store_true", help="do not export the recovered model")
    r = p.add_argument_group("recipe")
    r.add_argument("--preset", default="quick", choices=preset_names(), help="recipe preset")
    r.add_argument("--kd", choices=KD_MODES, help="distillation: none, soft (Hinton) or hard (DeiT)")
    r.add_argument(
        "--teacher",
        help="model to distil from: an exported folder, 'demo', a checkpoint file (with --teacher-arch), or "
        "'none' (default: the model the export was pruned from)",
    )
    r.add_argument(
        "--teacher-arch",
        help="timm architecture of a --teacher checkpoint, any family (e.g. regnety_160, DeiT's teacher); its "
        "own input size and mean/std are used, the student's batches converted for it",
    )
    r.add_argument(
        "--teacher-img-size",
        type=positive_int,
        help="input resolution of the --teacher checkpoint when it differs from its architecture's default",
    )
    for flag, (typ, _, text) in _RECIPE_FLAGS.items():
        r.add_argument(flag, type=typ, help=text)
    r.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="timm's training transform (random resized crop + flip) on the training images; --no-augment with "
        "--auto-augment none --re-prob 0 turns a preset's augmentation off",
    )
    r.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute each block's activations in the backward pass instead of keeping them (about a third "
        "more compute, a peak memory that no longer grows with depth x batch; bench/checkpointing.py)",
    )
    p.set_defaults(func=cmd_retrain)

    j = sub.add_parser("jobs", help="background jobs: list, status, cancel, resume, logs, start, dispatch")
    jsub = j.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    a = jsub.add_parser("list", help="every run with its status")
    a.add_argument("--root", default=None, help="runs folder (default $STUDIO_RUNS or runs)")
    add_common(a)
    a.set_defaults(func=cmd_list)
    for name, fn, text in (
        ("status", cmd_status, "state, progress, ETA and memory of a run"),
        ("cancel", cmd_cancel, "ask a job to save a checkpoint and stop"),
        ("resume", cmd_resume, "run a cancelled or failed job again with --resume"),
        ("logs", cmd_logs, "the end of a job's stderr (or stdout) log"),
    ):
        a = jsub.add_parser(name, help=text)
        a.add_argument("run", help="run folder, e.g. runs/NAME")
        add_common(a)
        if name == "cancel":
            a.add_argument("--force", action="store_true", help="also send SIGTERM to the job's processes")
        if name == "logs":
            a.add_argument("--stream", choices=("stderr", "stdout"), default="stderr")
            a.add_argument("--lines", type=positive_int, default=100)
        if name == "resume":
            a.add_argument("--nproc", type=positive_int, help="processes (GPUs) under torchrun")
        a.set_defaults(func=fn)
    a = jsub.add_parser(
        "start",
        help="start a studio command in the background, e.g. jobs start -- retrain --run runs/R",
    )
    add_common(a)
    a.add_argument("--nproc", type=positive_int, default=1, help="processes under torchrun (one per GPU)")
    a.add_argument("--threads", type=positive_int, help="OMP_NUM_THREADS of each process")
    a.add_argument("argv", nargs=argparse.REMAINDER, help="the command (it must have --out or --run)")
    a.set_defaults(func=cmd_start)
    a = jsub.add_parser("dispatch", help="start the queued jobs of a runs folder whose device is free")
    a.add_argument("root", nargs="?", default=None, help="runs folder (default $STUDIO_RUNS or runs)")
    add_common(a)
    a.set_defaults(func=cmd_dispatch)


# --------------------------------------------------------------------------------------------- retrain
def _spec_from_args(args: argparse.Namespace) -> RecoverySpec:
    if args.model is None:
        raise StudioError("Give the pruned model with --model (e.g. runs/NAME/export), or a run with --run.")
    model = model_spec(args)
    teacher: ModelSpec | None
    if (args.teacher_arch or args.teacher_img_size) and not (args.teacher and args.teacher.lower() != "none"):
        raise StudioError(
            "--teacher-arch and --teacher-img-size describe a --teacher checkpoint: also give --teacher FILE."
        )
    if args.teacher and args.teacher.lower() == "none":
        teacher = None
    elif args.teacher:
        teacher = ModelSpec(
            source=args.teacher, arch=args.teacher_arch, img_size=args.teacher_img_size, device=args.device
        )
    else:
        teacher = infer_teacher(args.model)
        if teacher is not None:
            teacher = teacher.with_(device=args.device)
    overrides = {
        field: getattr(args, flag[2:].replace("-", "_")) for flag, (_, field, _) in _RECIPE_FLAGS.items()
    }
    overrides["kd"] = args.kd
    overrides["augment"] = args.augment
    overrides["grad_checkpointing"] = args.grad_checkpointing
    spec = RecoverySpec(
        model=model,
        data=data_spec(args),
        teacher=teacher,
        preset=args.preset,
        overrides={k: v for k, v in overrides.items() if v is not None},
        seed=args.seed,
        eval_split=args.split,
        bench=not args.no_bench,
        export=not args.no_export,
    )
    spec.validate()  # the recipe and its overrides now, not after loading the model
    return spec


def _without_device(d: dict) -> dict:
    out = dict(d)
    for key in ("model", "teacher"):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k != "device"}
    return out


def _open_run(args: argparse.Namespace) -> tuple[RunDir, RecoverySpec]:
    if args.run:
        run = RunDir(args.run)
        if not run.spec_file.exists():
            raise StudioError(
                f"{run.path} has no spec.json: create the run with retrain ... --out {run.path}."
            )
        spec = RecoverySpec.from_dict(run.spec())
        if not args.resume and (run.has_checkpoint or run.results_file.exists()):
            raise StudioError(
                f"Run {run.path} already trained (it has a checkpoint or results): add --resume to continue "
                "it, or start a new run with --out."
            )
    elif args.out:
        spec = _spec_from_args(args)
        run = RunDir(args.out)
        if args.resume and run.spec_file.exists():
            saved = RecoverySpec.from_dict(run.spec())
            if _without_device(saved.to_dict()) != _without_device(spec.to_dict()):
                raise StudioError(
                    f"{run.path} was started with other options than these; resume it with the same command "
                    f"and --resume, or with: retrain --run {run.path} --resume."
                )
            spec = saved
        elif _is_rank0():
            run = RunDir.create(run.path, spec.to_dict())
    else:
        raise StudioError("Give the run folder: --out runs/NAME (a new run) or --run runs/NAME (its spec).")
    return run, spec  # execute() puts it on this attempt's device; spec.json keeps the one it started with


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cmd_retrain(args: argparse.Namespace) -> Output:
    run, spec = _open_run(args)
    if args.dry_run:
        return Output(
            {"run": str(run.path), "spec": spec.to_dict()}, f"run {run.path} prepared: {run.spec_file}"
        )
    result = execute(run, spec, resume=args.resume, device=args.device)
    if result is None:  # a rank other than 0: rank 0 reports
        return Output({"rank": int(os.environ.get("RANK", 0))}, "")
    d = result.to_dict()
    a, b, sec = d["after"], d["before"], d["retrain"]
    tput = a.get("throughput") or {}
    speed = "  ".join(f"bs{k}: {v['images_per_s']:.1f} img/s" for k, v in tput.items())
    text = (
        f"{run.path}: recovered a {d['method']} model with recipe {sec['recipe']['name']} "
        f"(kd {sec['recipe']['kd']}) in {sec['train']['epochs_run']} epochs on {d['device']} x{sec['world']}\n"
        f"top-1 {b.get('top1', float('nan')):.4f} -> {a['top1']:.4f} on {a['n']} {spec.eval_split} images "
        f"(best val {sec.get('best_val_top1') or float('nan'):.4f})\n"
        f"params {a['params']:,}  MACs {a['macs']:,}  {speed}\n"
        f"export: {d['export']}"
    )
    return Output({"run": str(run.path), **d}, text)


# ------------------------------------------------------------------------------------------------ jobs
def _status_text(s: jobs.JobStatus) -> str:
    lines = [f"{s.name}: {s.state}" + (f" (pid {s.pid}, {s.device})" if s.pid else "")]
    if s.progress:
        p = s.progress
        lines.append(
            f"  {p.get('task')} {p.get('done')}/{p.get('total')}"
            + (f"  epoch {p['epoch']}" if "epoch" in p else "")
            + (f"  loss {p['loss']:.4g}" if "loss" in p else "")
            + (f"  ETA {s.eta_s:.0f}s" if s.eta_s is not None else "")
        )
    if s.rss_mb is not None:
        lines.append(f"  memory {s.rss_mb:.0f} MB" + (f", GPU {s.gpu_mem_mb:.0f} MB" if s.gpu_mem_mb else ""))
    if s.error:
        lines.append(f"  error: {s.error}")
    if s.resumable:
        lines.append(f"  resumable: python -m studio jobs resume {s.run}")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> Output:
    rows = jobs.run_table(args.root or _runs_root())
    cols = ["run", "kind", "method", "budget", "top1", "params", "macs", "throughput", "status"]
    return Output({"runs": rows}, table(rows, cols))


def cmd_status(args: argparse.Namespace) -> Output:
    s = jobs.job_status(args.run)
    return Output(s.to_dict(), _status_text(s))


def cmd_cancel(args: argparse.Namespace) -> Output:
    s = jobs.cancel_job(args.run, force=args.force)
    return Output(s.to_dict(), f"cancel requested: {_status_text(s)}")


def cmd_resume(args: argparse.Namespace) -> Output:
    device = None if args.device == "auto" else args.device
    s = jobs.resume_job(args.run, device=device, nproc=args.nproc)
    return Output(s.to_dict(), f"resumed: {_status_text(s)}")


def cmd_logs(args: argparse.Namespace) -> Output:
    text = jobs.read_log(args.run, args.stream, args.lines)
    return Output({"run": args.run, "stream": args.stream, "log": text}, text)


def cmd_dispatch(args: argparse.Namespace) -> Output:
    started = jobs.dispatch(args.root or _runs_root())
    return Output({"started": started}, "started: " + (", ".join(started) or "none"))


def cmd_start(args: argparse.Namespace) -> Output:
    argv = [a for a in args.argv if a != "--"]
    run_dir = None
    for flag in ("--out", "--run"):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            run_dir = argv[argv.index(flag) + 1]
    if not argv or run_dir is None:
        raise StudioError(
            "Give the command to start after --, with its run folder: jobs start -- retrain --run R"
        )
    device = "cuda:0" if args.device == "auto" and jobs.gpu_count() else args.device
    device = "cpu" if device == "auto" else device
    s = jobs.start_job(argv, run_dir, device=device, nproc=args.nproc, threads=args.threads)
    return Output(s.to_dict(), f"started: {_status_text(s)}")
