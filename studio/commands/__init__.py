"""Shared pieces of the CLI commands: common options, spec building, progress on stderr."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from ..data import DataSpec
from ..events import Callback, Event
from ..models import ModelSpec


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
        "--num-classes", type=int, help="classifier size (inferred from the checkpoint if omitted)"
    )
    g.add_argument("--img-size", type=int, help="input resolution if not the architecture default")
    g.add_argument("--reset-head", action="store_true", help="start a fresh classifier of --num-classes")
    g.add_argument(
        "--timm-kwargs", default="{}", help="extra timm constructor args as JSON, e.g. '{\"patch_size\": 8}'"
    )
    g.add_argument("--mean", type=float, nargs=3, help="override normalisation mean")
    g.add_argument("--std", type=float, nargs=3, help="override normalisation std")


def add_data_args(p: argparse.ArgumentParser, *, default: str | None = "demo") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, help="demo, imagefolder:PATH or vtab:PATH")
    g.add_argument("--split", default="test", help="split to evaluate: train, val or test")
    g.add_argument("--skip-bad-files", action="store_true", help="skip unreadable images instead of failing")
    g.add_argument("--limit", type=int, help="use at most N samples of each split (seeded)")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    from ..errors import StudioError

    try:
        kwargs = json.loads(getattr(args, "timm_kwargs", "{}") or "{}")
    except json.JSONDecodeError as e:
        raise StudioError(f"--timm-kwargs is not valid JSON ({e.msg}).") from None
    data = {}
    if getattr(args, "mean", None):
        data["mean"] = list(args.mean)
    if getattr(args, "std", None):
        data["std"] = list(args.std)
    return ModelSpec(
        source=args.model,
        arch=args.arch,
        num_classes=args.num_classes,
        img_size=args.img_size,
        reset_head=args.reset_head,
        device=args.device,
        data=data,
        kwargs=kwargs,
    )


def data_spec(args: argparse.Namespace) -> DataSpec:
    return DataSpec.parse(
        args.data, skip_bad_files=getattr(args, "skip_bad_files", False), limit=getattr(args, "limit", None)
    )


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
