"""Comparing runs: one row per model (dense, pruned, recovered), Pareto fronts, per-class change, plan diffs.

Every number comes from a run folder (``results.json`` written by the engine that measured it) or from a
measurement made here on demand; nothing is estimated except where a column says so: a prune run's accuracy
is the *estimate before recovery* (the pruned model with no retraining), a retrain run's is the *measured after*.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import StudioError
from .export import read_manifest
from .plan import PrunePlan, diff
from .runs import RunDir, list_runs

STAGES = ("dense", "pruned (before recovery)", "recovered")


def plan_table(plan: PrunePlan) -> list[dict[str, Any]]:
    """Per base block: kept heads, head dim, attention width and MLP neurons next to the base's."""
    base = plan.base
    rows = []
    for i in range(base.depth):
        k = plan.kept(i)
        rows.append(
            {
                "block": i,
                "kept": plan.block(i) is not None,
                "heads": k["heads"],
                "heads_base": base.num_heads[i],
                "head_dim": k["head_dim"],
                "attn_width": k["heads"] * k["head_dim"],
                "attn_width_base": base.num_heads[i] * base.head_dim,
                "mlp": k["mlp"],
                "mlp_base": base.mlp_hidden[i],
            }
        )
    return rows


def plan_of(run: RunDir) -> PrunePlan | None:
    """A run's plan: ``plan.json``, else the plan in its export manifest, else its spec's (None if dense)."""
    if run.plan_file.exists():
        return PrunePlan.load(run.plan_file)
    manifest = run.export_dir / "manifest.json"
    if manifest.exists():
        m = read_manifest(run.export_dir)
        return None if m.get("plan") is None else PrunePlan.from_dict(m["plan"])
    spec = run.spec()
    plan = spec.get("plan") if isinstance(spec, dict) else None
    return PrunePlan.from_dict(plan) if isinstance(plan, dict) else None


def _top1(d: Mapping[str, Any] | None) -> float | None:
    if not isinstance(d, Mapping):
        return None
    for key in ("top1", "test_top1", "val_top1"):
        if isinstance(d.get(key), int | float):
            return float(d[key])
    return None


def _throughput(d: Mapping[str, Any] | None) -> dict[int, float]:
    tp = (d or {}).get("throughput") or {}
    return {int(bs): float(r["images_per_s"]) for bs, r in tp.items() if isinstance(r, Mapping)}


def _source(spec: Mapping[str, Any]) -> str:
    model = spec.get("model")
    return str(model.get("source", "")) if isinstance(model, Mapping) else str(model or "")


def origin(spec: Mapping[str, Any], *, depth: int = 4) -> tuple[str, str | None, dict[str, Any]]:
    """Follow a run's model back through ``runs/NAME/export`` folders to the unpruned model.

    Returns ``(base model source, run whose export this run started from or None, that prune run's params)``.
    """
    source, parent, params = _source(spec), None, dict(spec.get("params") or {})
    for _ in range(depth):
        folder = Path(source)
        if folder.name != "export" or not (folder.parent / "spec.json").is_file():
            break
        try:
            up = RunDir(folder.parent).spec()
        except StudioError:
            break
        parent = parent or folder.parent.name
        params = params or dict(up.get("params") or {})
        source = _source(up)
    return source, parent, params


def run_row(run: RunDir) -> dict[str, Any] | None:
    """One comparable row of a run (None for a run without results yet)."""
    try:
        spec, results, status = run.spec(), run.results(), run.status()
    except StudioError:
        return None
    if not results or not isinstance(spec, Mapping):
        return None
    kind = str(spec.get("kind") or results.get("kind") or "run")
    after = results.get("after") if isinstance(results.get("after"), Mapping) else results
    before = results.get("before") if isinstance(results.get("before"), Mapping) else {}
    recovered = kind == "retrain" or results.get("kind") == "retrain"
    model, from_run, params = origin(spec)
    return {
        "run": run.path.name,
        "path": str(run.path),
        "kind": kind,
        "method": str(results.get("method") or spec.get("method") or kind),
        "stage": STAGES[2] if recovered else STAGES[1],
        "status": status.get("state", "created"),
        "model": model,
        "from_run": from_run,
        "target_macs": params.get("target_macs"),
        "ratio": params.get("ratio"),
        "top1": _top1(after),
        # a retrain run's "before" is the pruned model it started from; a prune run's is the dense model
        "top1_before_recovery": _top1(before) if recovered else _top1(after),
        "top1_dense": None if recovered else _top1(before),
        "params": (after or {}).get("params"),
        "macs": (after or {}).get("macs"),
        "params_dense": None if recovered else before.get("params"),
        "macs_dense": None if recovered else before.get("macs"),
        "throughput": _throughput(after),
        "dense_throughput": {} if recovered else _throughput(before),
        "has_export": (run.export_dir / "manifest.json").exists(),
    }


def collect(root: str | Path, *, model: str | None = None) -> list[dict[str, Any]]:
    """Rows of every finished run under ``root`` (of base model ``model`` only, if given), plus a dense row.

    The dense row is the base model as measured by the newest prune run of that model (same process, same
    device as its pruned model, so its speed-ups are like for like). Ideal speed-ups are MACs ratios to it.
    """
    rows = [r for r in (run_row(run) for run in list_runs(root)) if r is not None]
    if model is not None:
        rows = [r for r in rows if r["model"] == model]
    base = next((r for r in rows if r["macs_dense"] is not None), None)
    if base is not None:
        rows.append(
            {
                **{k: None for k in rows[0]},
                "run": "dense",
                "kind": "dense",
                "method": "dense",
                "stage": STAGES[0],
                "status": "done",
                "model": base["model"],
                "top1": base["top1_dense"],
                "params": base["params_dense"],
                "macs": base["macs_dense"],
                "throughput": base["dense_throughput"],
                "dense_throughput": base["dense_throughput"],
                "has_export": False,
            }
        )
        for r in rows:
            r["ideal_speedup"] = base["macs_dense"] / r["macs"] if r["macs"] else None
    return rows


def speed_columns(rows: Sequence[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """Rows with flat ``images_per_s`` and ``measured_speedup`` at ``batch_size`` (None where not measured).

    The speed-up divides by the dense throughput measured in the same run when there is one (prune runs),
    else by the dense row's.
    """
    dense = next((r for r in rows if r["stage"] == STAGES[0]), None)
    out = []
    for r in rows:
        ips = (r.get("throughput") or {}).get(batch_size)
        ref = (r.get("dense_throughput") or (dense or {}).get("throughput") or {}).get(batch_size)
        out.append(
            {
                **{k: v for k, v in r.items() if k not in ("throughput", "dense_throughput")},
                "images_per_s": ips,
                "measured_speedup": ips / ref if ips and ref else None,
            }
        )
    return out


def label(row: Mapping[str, Any]) -> str:
    """A short name for a row: ``dense``, or the method and the run's start time (``magnitude 05:18:08``)."""
    if row.get("stage") == STAGES[0]:
        return "dense"
    m = re.match(r"^\d{8}-(\d{2})(\d{2})(\d{2})-", str(row.get("run", "")))
    when = ":".join(m.groups()) if m else str(row.get("run"))
    return f"{row.get('method')} {when}" + (" (recovered)" if row.get("stage") == STAGES[2] else "")


def pareto_mask(points: Sequence[Sequence[float | None]], maximize: Sequence[bool]) -> list[bool]:
    """True for points no other point dominates (every objective at least as good, one strictly better).

    ``maximize[j]`` says whether objective ``j`` is to be maximised (else minimised); points with a missing
    value (None or NaN) are never on the front.
    """
    signed = [
        None if any(v is None or v != v for v in p) else [v if up else -v for v, up in zip(p, maximize)]
        for p in points
    ]
    mask = []
    for i, p in enumerate(signed):
        if p is None:
            mask.append(False)
            continue
        dominated = any(
            q is not None
            and j != i
            and all(a >= b for a, b in zip(q, p))
            and any(a > b for a, b in zip(q, p))
            for j, q in enumerate(signed)
        )
        mask.append(not dominated)
    return mask


def per_class_change(before: Mapping[str, float], after: Mapping[str, float]) -> list[dict[str, Any]]:
    """Per-class accuracy before/after and the change (classes of ``before``, in order)."""
    missing = [c for c in before if c not in after]
    if missing:
        raise StudioError(
            f"The two models classify different classes (e.g. '{missing[0]}' only in the first)."
        )
    return [
        {
            "class": c,
            "before": float(before[c]),
            "after": float(after[c]),
            "change": float(after[c] - before[c]),
        }
        for c in before
    ]


def plan_diff(a: PrunePlan | None, b: PrunePlan | None, base: PrunePlan | None = None) -> list[str]:
    """:func:`studio.plan.diff` where None stands for the dense model of the other plan's base."""
    if a is None and b is None:
        return []
    ref = a or b or base
    assert ref is not None
    return diff(a or PrunePlan.dense(ref.base), b or PrunePlan.dense(ref.base))


def speed_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Measured throughput before/after per batch size of one run's ``results.json`` (the common shape)."""
    b, a = results["before"], results["after"]
    return [
        {
            "batch size": int(bs),
            "base images/s": b["throughput"][bs]["images_per_s"],
            "pruned images/s": a["throughput"][bs]["images_per_s"],
            "measured speed-up": v,
            "ideal speed-up": results["ideal_speedup"],
        }
        for bs, v in results["speedup"].items()
    ]
