"""What ships with an exported model: a markdown model card, the CLI command that reproduces its run, a zip.

The card follows the spirit of Mitchell et al. 2019 ("Model Cards for Model Reporting"), cut down to what a
pruned checkpoint needs: what it is, how it was made (method, budget, recovery), what it measures (params, MACs,
accuracy, throughput, with the device), how to load it (two lines of Python) and how to reproduce it.

Reproducing covers the whole lineage: a retraining run's model is another run's export, so :func:`lineage`
follows ``spec.json``'s model (and teacher) back through the runs folder, and :func:`lineage_specs` rewrites each
step's inputs to the previous step's *replayed* export, with paths relative to the folder that holds the runs
folder (``runs/NAME-replay/export``), so the commands run on another machine from a copy of the zip.
"""

from __future__ import annotations

import copy
import io
import json
import shlex
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .costs import plan_cost
from .errors import StudioError
from .plan import BaseArch, PrunePlan

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


def _run_of_export(source: Any) -> Path | None:
    """The run folder whose export ``source`` is (``<run>/export`` next to a ``spec.json``), else None."""
    if not isinstance(source, str) or source in ("demo", "demo-backbone"):
        return None
    p = Path(source)
    if p.name != "export" or not (p.parent / "spec.json").is_file():
        return None
    return p.parent.resolve()


def _inputs(spec: Mapping[str, Any]) -> list[str]:
    """The model sources a spec reads: its model and, for distillation, its teacher."""
    return [
        d["source"]
        for d in (spec.get("model"), spec.get("teacher"))
        if isinstance(d, Mapping) and isinstance(d.get("source"), str)
    ]


def lineage(run: str | Path) -> list[Path]:
    """``run`` and the runs it was made from, oldest first: each step's model is the export of the one before
    (e.g. prune -> retrain; the analysis and the plan live in the prune run's own spec)."""
    chain, seen = [Path(run).resolve()], set()
    while len(chain) < 32:  # a chain longer than that is a loop of hand-copied folders, not a lineage
        seen.add(chain[0])
        spec = json.loads((chain[0] / "spec.json").read_text(encoding="utf-8"))
        parents = [r for r in map(_run_of_export, _inputs(spec)) if r is not None and r not in seen]
        if not parents:
            break
        chain.insert(0, parents[0])
    return chain


def lineage_specs(runs: Sequence[Path], *, root: str | Path) -> list[tuple[str, dict[str, Any], str]]:
    """``(file name, spec, out)`` per step of a lineage: each spec's inputs that are an earlier step's export are
    rewritten to that step's replay (``<runs folder>/<name>-replay/export``), relative to ``root``'s parent."""
    prefix = Path(root).name or "runs"
    replay = {str(r / "export"): f"{prefix}/{r.name}-replay" for r in runs}
    steps = []
    for i, r in enumerate(runs):
        spec = copy.deepcopy(json.loads((r / "spec.json").read_text(encoding="utf-8")))
        for part in ("model", "teacher"):
            d = spec.get(part)
            if isinstance(d, dict) and isinstance(d.get("source"), str):
                parent = _run_of_export(d["source"])
                if parent is not None and str(parent / "export") in replay:
                    d["source"] = f"{replay[str(parent / 'export')]}/export"
        steps.append((f"lineage/{i + 1}-{r.name}.json", spec, replay[str(r / "export")]))
    return steps


def lineage_command(steps: Sequence[tuple[str, Mapping[str, Any], str]]) -> str:
    """The shell commands replaying a lineage in order (run from the folder holding the runs folder, with the
    zip's ``lineage/`` folder beside it)."""
    lines = [f"# {len(steps)} step(s): " + " -> ".join(str(s.get("kind")) for _, s, _ in steps)]
    lines += [reproduce_command(spec, out=out, spec_file=name) for name, spec, out in steps]
    return "\n".join(lines)


def user_params(plan: PrunePlan, spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """The budget and options as the user gave them: the spec's ``params`` (a method's solver rewrites the plan's
    own, e.g. Isomorphic's bisection scales ``head_ratio`` 0.25 to 0.2496…), else the plan's minus solver state."""
    given = (spec or {}).get("params")
    if isinstance(given, Mapping) and (spec or {}).get("method", plan.method) == plan.method:
        return {k: v for k, v in given.items() if v is not None}
    internal = ("solved", "seed", "base_ratios", "scale", "edits")
    return {k: v for k, v in plan.params.items() if k not in internal and v is not None}


def dense_cost(base: Mapping[str, Any] | BaseArch) -> dict[str, int]:
    """Params and MACs of the unpruned base model (the card's "before" when the run measured no dense model)."""
    arch = base if isinstance(base, BaseArch) else BaseArch.from_dict(base)
    return plan_cost(PrunePlan.dense(arch))


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
        p = user_params(plan, spec)
        lines.append(
            f"- **Method**: `{plan.method}` with {', '.join(f'{k}={v}' for k, v in p.items()) or 'defaults'}"
        )
        solved = plan.params.get("solved") or {}
        if "macs_fraction" in solved:
            lines.append(
                f"- **Budget**: keep {_fmt(p.get('target_macs', solved.get('target')), True)} of the MACs; "
                f"the plan keeps {_fmt(solved['macs_fraction'], True)}"
            )
        edits = plan.params.get("edits") or []
        if edits:
            lines.append(f"- **Hand edits** ({len(edits)}): {'; '.join(map(str, edits[:10]))}")
    recovery = manifest.get("recovery") or (results.get("recipe") and {"recipe": results["recipe"]})
    if recovery:
        r = recovery.get("recipe") or {}
        lines.append(
            f"- **Recovery**: preset `{r.get('name')}`, {r.get('epochs')} epochs, distillation "
            f"`{r.get('kd')}` ({r.get('source', '')})"
        )
        t = recovery.get("teacher") or (results.get("retrain") or {}).get("teacher")
        if isinstance(t, Mapping) and r.get("kd") not in (None, "none"):
            top1 = f", test top-1 {_fmt(t['top1'], True)}" if t.get("top1") is not None else ""
            size = (
                f", fed at {t['input_size'][-1]} px"
                if t.get("converts_input") and t.get("input_size")
                else ""
            )
            lines.append(f"- **Teacher**: `{t.get('arch') or 'ViT'}` from `{t.get('source')}`{top1}{size}")
    elif plan is not None:
        lines.append(
            "- **Recovery**: none; the accuracy below is measured right after pruning (retrain to recover)"
        )
    # "before" is the unpruned base model. Prune-like runs measured it (accuracy, speed too); a retraining run's
    # own "before" is the pruned model it started from, so only the base's counted params/MACs are shown
    dense = dense_cost(plan.base) if plan is not None else {}
    if results.get("kind") in (None, "prune", "sls", "p3b", "splora"):
        before = {**dense, **{k: v for k, v in before.items() if v is not None}}
    else:
        before = dense
    lines += ["", "## Measured", "", "| | before (unpruned) | this model |", "|---|---|---|"]
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
    # the ONNX graph and its parity record travel with the weights when the export has them
    names = ("manifest.json", "model.safetensors", "model.onnx", "onnx.json")
    files = [p for p in names if (folder / p).is_file()]
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
