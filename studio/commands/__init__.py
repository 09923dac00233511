"""Shared pieces of the CLI commands: common options, spec building, progress on stderr."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..argtypes import finite_float, in_range, json_object, positive_float, positive_int
from ..data import DataSpec
from ..errors import StudioError
from ..events import Callback, CancelToken, Event
from ..flows import Spec, create_run, load_flows, on_device, read_spec, run_folder, sigterm_cancels
from ..flows.stages import RunResult
from ..jobs import device_lock
from ..models import ModelSpec
from ..runs import RunDir, new_run_id


@dataclass
class Output:
    """A command's result: ``data`` is printed as JSON with ``--json``; ``text`` otherwise (falls back to JSON)."""

    data: dict[str, Any]
    text: str | None = None


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")


def add_model_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None if required else "demo",
        required=required,
        help="demo, demo-backbone, a checkpoint (.safetensors/.pth/.npz) or an exported folder",
    )
    g.add_argument("--arch", help="timm architecture of a checkpoint file, e.g. vit_small_patch16_224")
    g.add_argument(
        "--num-classes", type=positive_int, help="classifier size (inferred from the checkpoint if omitted)"
    )
    g.add_argument("--img-size", type=positive_int, help="input resolution if not the architecture default")
    g.add_argument("--reset-head", action="store_true", help="start a fresh classifier of --num-classes")
    g.add_argument(
        "--convpass-scale",
        type=positive_float,
        help="the scale s of the Convpass adapters a PETL-tuned checkpoint carries (SLS; not stored in the file)",
    )
    g.add_argument(
        "--timm-kwargs",
        type=json_object,
        default="{}",  # a string default goes through ``type``: a fresh dict per parse
        help="extra timm constructor args as JSON, e.g. '{\"patch_size\": 8}'",
    )
    g.add_argument("--mean", type=finite_float, nargs=3, help="override normalisation mean")
    g.add_argument("--std", type=positive_float, nargs=3, help="override normalisation std")
    # every preprocessing field can be set for every source (checkpoint, export, demo): the same weights must
    # be evaluated the same way however they were loaded
    g.add_argument(
        "--interpolation",
        choices=("bicubic", "bilinear", "nearest"),
        help="override the resize interpolation",
    )
    g.add_argument(
        "--crop-pct", type=in_range(float, 0.05, 1.0), help="override the centre-crop fraction (1 = no crop)"
    )
    g.add_argument("--crop-mode", choices=("center", "squash", "border"), help="override the crop mode")


def add_data_args(p: argparse.ArgumentParser, *, default: str | None = "demo") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, help="demo, imagefolder:PATH or vtab:PATH")
    g.add_argument("--split", default="test", help="split to evaluate: train, val or test")
    g.add_argument("--skip-bad-files", action="store_true", help="skip unreadable images instead of failing")
    g.add_argument("--limit", type=positive_int, help="use at most N samples of each split (seeded)")


def model_spec(args: argparse.Namespace) -> ModelSpec:

    kwargs = getattr(args, "timm_kwargs", None) or {}
    try:  # parsed by argparse (json_object) from a command line; a string where a caller built the namespace
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs
    except json.JSONDecodeError as e:
        raise StudioError(f"--timm-kwargs is not valid JSON ({e.msg}).") from None
    if not isinstance(kwargs, dict):
        # a list or number would fail later inside ModelSpec/timm with an unrelated TypeError
        raise StudioError(
            f"--timm-kwargs must be a JSON object of constructor arguments, e.g. '{{\"patch_size\": 8}}', "
            f"not a {type(kwargs).__name__}."
        )
    _check_img_size(getattr(args, "img_size", None), _patch_size(getattr(args, "arch", None), kwargs))
    data = {}
    if getattr(args, "mean", None):
        data["mean"] = list(args.mean)
    if getattr(args, "std", None):
        data["std"] = list(args.std)
    for name in ("interpolation", "crop_pct", "crop_mode"):
        if getattr(args, name, None) is not None:
            data[name] = getattr(args, name)
    return ModelSpec(
        source=args.model,
        arch=args.arch,
        num_classes=args.num_classes,
        img_size=args.img_size,
        reset_head=args.reset_head,
        device=args.device,
        data=data,
        kwargs=kwargs,
        convpass_scale=getattr(args, "convpass_scale", None),
    )


def _patch_size(arch: str | None, kwargs: dict[str, Any]) -> int | None:
    """The patch size when the command line states it (``patch_size`` in --timm-kwargs or ``patchN`` in --arch).

    None where it is unknown here or does not matter (``dynamic_img_pad`` pads the input to whole patches).
    """
    if kwargs.get("dynamic_img_pad"):
        return None
    p = kwargs.get("patch_size")
    if isinstance(p, list | tuple) and len(p) == 2 and p[0] == p[1]:
        p = p[0]
    if type(p) is int and p > 0:
        return p
    m = re.search(r"patch(\d+)", arch or "")
    return int(m.group(1)) if m else None


def _check_img_size(img_size: int | None, patch: int | None) -> None:
    """Refuse a resolution the patch grid does not tile: the conv stem would silently drop the remainder."""

    if img_size is None or patch is None or img_size % patch == 0:
        return
    low, high = img_size - img_size % patch, img_size - img_size % patch + patch
    raise StudioError(
        f"--img-size {img_size} is not a multiple of the patch size {patch}, so the last {img_size % patch} "
        f"pixels of every row and column would never be seen; use {high}" + (f" or {low}." if low else ".")
    )


def data_spec(args: argparse.Namespace) -> DataSpec:
    return DataSpec.parse(
        args.data, skip_bad_files=getattr(args, "skip_bad_files", False), limit=getattr(args, "limit", None)
    )


def run_in_folder(
    spec: Spec, out: str | Path | None, *, resume: bool, device: str, label: str
) -> tuple[RunDir, RunResult]:
    """What every command that runs a spec does: validate it, write it into a new run folder ``out`` (default
    ``runs/<time>-<label>``), or with ``resume`` continue the spec already there, then run it with SIGTERM
    meaning the same clean stop as the run's ``CANCEL`` file."""
    folder = Path(out or Path("runs") / new_run_id(label))
    if resume:
        if not (folder / "spec.json").exists():
            raise StudioError(
                f"Nothing to resume: {folder} has no spec.json. Start the run without --resume."
            )
        run = RunDir(folder)
        spec = read_spec(run)  # the run's own spec: the options of this command line do not change it
    else:
        spec.validate()
        run = create_run(spec, folder)
    result = execute(run, spec, resume=resume, device=device)
    assert result is not None  # only retraining runs as several ranks
    return run, result


def execute(run: RunDir, spec: Spec, *, resume: bool, device: str) -> RunResult | None:
    """Run a run folder's spec on this attempt's device, progress on stderr; None on a torchrun rank > 0."""
    token = CancelToken(run.cancel_file)
    sigterm_cancels(token)
    spec = on_device(spec, device)
    lock = contextlib.nullcontext()
    if load_flows().get(spec.kind).trains:  # one training per device on the machine, a job's or this one
        model = getattr(spec, "model", None)
        lock = device_lock(device if device != "auto" else getattr(model, "device", "auto"), run.path)
    with lock:
        return run_folder(run, resume=resume, spec=spec, callbacks=[stderr_progress()], cancel=token)


def stderr_progress() -> Callback:
    """A callback drawing one tqdm bar per task on stderr and printing log events."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def cb(event: Event) -> None:
        d = event.data
        if event.kind == "progress":
            task = str(d.get("task", "work"))
            bar = bars.get(task)
            if bar is None or bar.total != d.get("total"):
                if bar is not None:
                    bar.close()
                bar = bars[task] = tqdm(
                    total=d.get("total"), desc=task, file=sys.stderr, leave=False, dynamic_ncols=True
                )
            bar.n = int(d.get("done", 0))
            extra = {
                k: v
                for k, v in d.items()
                if k not in ("task", "done", "total") and isinstance(v, int | float)
            }
            if extra:
                bar.set_postfix({k: f"{v:.4g}" for k, v in extra.items()}, refresh=False)
            bar.refresh()
            if bar.n >= (bar.total or 0):
                bar.close()
                bars.pop(task, None)
        elif event.kind == "log":
            tqdm.write(str(d.get("message", "")), file=sys.stderr)
        elif event.kind == "metric" and "epoch" in d:
            parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()]
            tqdm.write("  ".join(parts), file=sys.stderr)

    return cb


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain-text table for readable CLI output."""
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return "" if v is None else str(v)
