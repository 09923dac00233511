"""What ships with an exported model: a markdown model card, the CLI command that reproduces its run, a zip.

The card follows the spirit of Mitchell et al. 2019 ("Model Cards for Model Reporting"), cut down to what a
pruned checkpoint needs: what it is, how it was made (method, budget, recovery), what it measures (params, MACs,
accuracy, throughput, with the device), how to load it (two lines of Python) and how to reproduce it.
"""

from __future__ import annotations

import io
import shlex
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import StudioError
from .plan import PrunePlan

_PY = "python -m studio"


def reproduce_command(
    spec: Mapping[str, Any], *, out: str = "runs/replay", spec_file: str = "spec.json"
) -> str:
    """The shell command that re-runs a run from its ``spec.json`` into a new run folder ``out``.

    Every kind of run has the same command: the spec *is* the work (``python -m studio run --spec``), so no
    command line is ever rebuilt from it and nothing of the spec can get lost on the way.
    """
    if not spec.get("kind"):
        raise StudioError("This run has no kind in its spec.json: it was not written by the studio.")
    return " ".join([_PY, "run", "--spec", shlex.quote(spec_file), "--out", shlex.quote(out)])


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * float(v):.1f}%"
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def model_card(
    manifest: Mapping[str, Any],
    *,
    name: str,
    spec: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    command: str | None = None,
) -> str:
    """A markdown model card for an exported model (``manifest.json`` of its folder, plus its run's files)."""
    base, cfg = manifest.get("base") or {}, manifest.get("data_config") or {}
    plan = PrunePlan.from_dict(manifest["plan"]) if manifest.get("plan") else None
    results = results or {}
    before, after = results.get("before") or {}, results.get("after") or dict(manifest.get("metrics") or {})
    method = plan.method if plan else "dense (not pruned)"
    lines = [f"# {base.get('arch', 'ViT')} · {method} · {name}", ""]
    lines.append(
        f"A {'pruned ' if plan else ''}timm Vision Transformer exported by Pruning Studio: "
        f"{plan.depth if plan else base.get('depth')} blocks, {len(manifest.get('class_names') or [])} classes, "
        f"input {cfg.get('input_size')}. Weights in `model.safetensors`, architecture and plan in `manifest.json`; "
        "loading needs no pickle."
    )
    lines += ["", "## How it was made", ""]
    if plan is not None:
        p = {k: v for k, v in plan.params.items() if k not in ("solved", "seed") and v is not None}
        lines.append(
            f"- **Method**: `{plan.method}` with {', '.join(f'{k}={v}' for k, v in p.items()) or 'defaults'}"
        )
        solved = plan.params.get("solved") or {}
        if "macs_fraction" in solved:
            lines.append(
                f"- **Budget**: keep {_fmt(p.get('target_macs'), True)} of the MACs; "
                f"the plan keeps {_fmt(solved['macs_fraction'], True)}"
            )
    recovery = manifest.get("recovery") or (results.get("recipe") and {"recipe": results["recipe"]})
    if recovery:
        r = recovery.get("recipe") or {}
        lines.append(
            f"- **Recovery**: preset `{r.get('name')}`, {r.get('epochs')} epochs, distillation "
            f"`{r.get('kd')}` ({r.get('source', '')})"
        )
    elif plan is not None:
        lines.append(
            "- **Recovery**: none; the accuracy below is measured right after pruning (retrain to recover)"
        )
    lines += ["", "## Measured", "", "| | before | this model |", "|---|---|---|"]
    for label, key, pct in (
        ("params", "params", False),
        ("MACs / image", "macs", False),
        ("test top-1", "top1", True),
    ):
        lines.append(f"| {label} | {_fmt(before.get(key), pct)} | {_fmt(after.get(key), pct)} |")
    for bs, r in sorted((after.get("throughput") or {}).items(), key=lambda t: int(t[0])):
        b = (before.get("throughput") or {}).get(bs) or {}
        lines.append(
            f"| images/s, batch {bs} ({r.get('device')}) | {_fmt(b.get('images_per_s'))} | "
            f"{_fmt(r.get('images_per_s'))} |"
        )
    if plan is not None:
        lines += ["", "## Structure", "", "```text", plan.describe(), "```"]
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        "from studio.export import load_exported",
        'model = load_exported("path/to/this/folder").model  # a timm ViT in eval mode',
        "```",
        "",
        f"Inputs: {cfg.get('input_size')} images, mean {cfg.get('mean')}, std {cfg.get('std')}, "
        f"`{cfg.get('interpolation')}` resizing. Classes: {', '.join(map(str, manifest.get('class_names') or []))}.",
    ]
    if command:
        lines += ["", "## Reproduce", "", "```bash", command, "```"]
    versions = manifest.get("versions") or {}
    if versions:
        lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines) + "\n"


def export_zip(folder: str | Path, extra: Mapping[str, str | bytes] | None = None) -> bytes:
    """The exported folder's model files (+ ``extra`` files such as the card) as an in-memory zip."""
    folder = Path(folder)
    files = [p for p in ("manifest.json", "model.safetensors", "model.onnx") if (folder / p).is_file()]
    if "model.safetensors" not in files or "manifest.json" not in files:
        raise StudioError(
            f"{folder} is not a complete export (manifest.json + model.safetensors); export again."
        )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in files:
            z.write(folder / name, name)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()
