"""Comparing runs: one row per model (dense, pruned, recovered), Pareto fronts, per-class change, plan diffs.

Every number comes from a run folder (``results.json`` written by the engine that measured it) or from a
measurement made here on demand; nothing is estimated except where a column says so: a prune run's accuracy
is the *estimate before recovery* (the pruned model with no retraining), a retrain run's is the *measured after*.

Calibration (:func:`calibration_points`, :func:`calibration`, :func:`rank_untried`): across the recovered plans of
one model and data set, how well each pre-recovery signal (accuracy right after pruning, kNN accuracy of the cut
features, the criterion score removed, MACs kept) ranked the accuracy after recovery (Spearman's ρ with the
number of runs), the signal to trust, and the untried candidates sorted by it.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .analysis.separability import knn_accuracy
from .bench import load_avg, measure_throughput
from .errors import StudioError
from .events import Callback, CancelToken, check, progress
from .export import read_manifest
from .features import extract
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


def _throughput_detail(d: Mapping[str, Any] | None) -> dict[int, dict[str, Any]]:
    """Per batch size what was recorded with the figure (the machine load, threads)."""
    tp = (d or {}).get("throughput") or {}
    return {
        int(bs): {"load_avg": r.get("load_avg"), "threads": r.get("threads")}
        for bs, r in tp.items()
        if isinstance(r, Mapping)
    }


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


def _trained(kind: str, spec: Mapping[str, Any], results: Mapping[str, Any]) -> bool:
    """Whether a run's ``after`` figures come after training: retraining, an SLS cut that retrained, and the
    methods that train while they prune (P3B, SPLoRA)."""
    if kind == "retrain" or results.get("kind") == "retrain" or kind in ("p3b", "splora"):
        return True
    if kind == "sls":
        return spec.get("retrain") not in (None, "none") and spec.get("epochs") != 0
    return False


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
    recovered = _trained(kind, spec, results)
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
        "throughput_detail": _throughput_detail(after),
        "dense_throughput": {} if recovered else _throughput(before),
        "dense_throughput_detail": {} if recovered else _throughput_detail(before),
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
                "throughput_detail": base["dense_throughput_detail"],
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
                **{k: v for k, v in r.items() if not k.startswith(("throughput", "dense_throughput"))},
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


def back_to_back(
    models: Mapping[str, torch.nn.Module],
    input_size: Sequence[int],
    batch_size: int,
    *,
    rounds: int = 7,
    warmup: int = 3,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> list[dict[str, Any]]:
    """Throughput of every model measured now, interleaved: each round times every model once, in an order
    rotated round to round, and each figure is the median over the rounds. A drift in machine load then hits
    every model alike, which figures taken whenever each run ran cannot promise. The load before and after is
    recorded with the figures."""
    if not models:
        raise StudioError("Pick at least one model to measure.")
    if rounds < 1:
        raise StudioError(f"Give at least one round, got {rounds}.")
    names = list(models)
    load_before = load_avg()
    for n in names:  # warm every model before the first timed round
        measure_throughput(models[n], input_size, batch_size=batch_size, warmup=warmup, repeats=1)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            check(cancel)
            t = measure_throughput(models[n], input_size, batch_size=batch_size, warmup=0, repeats=1)
            times[n].append(t.latency_ms)
        progress(callbacks, "back-to-back throughput", r + 1, rounds)
    load_after = load_avg()
    out = []
    for n in names:
        med = statistics.median(times[n])
        out.append(
            {
                "model": n,
                "batch_size": batch_size,
                "images_per_s": batch_size / med * 1e3,
                "latency_ms": med,
                "spread_ms": max(times[n]) - min(times[n]),
                "rounds": rounds,
                "load_before": load_before,
                "load_after": load_after,
            }
        )
    return out


def load_range(rows: Sequence[Mapping[str, Any]], batch_size: int) -> tuple[float, float] | None:
    """The machine load under which the stored throughputs at ``batch_size`` were measured (min, max), or None
    when a figure does not record it (measured before the studio recorded load)."""
    loads = []
    for r in rows:
        t = (r.get("throughput_detail") or {}).get(batch_size)
        if (r.get("throughput") or {}).get(batch_size) is None:
            continue
        if not t or t.get("load_avg") is None:
            return None
        loads.append(float(t["load_avg"]))
    return (min(loads), max(loads)) if loads else None


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


# ------------------------------------------------------------------------------------------ calibration
# Pre-recovery signals of a candidate plan, each oriented so that a larger value predicts a better recovered
# accuracy (Spearman's sign then reads the same for all). Read from the prune run's results.json: ``after`` is the
# common shape; ``signals`` is an additive section a flow may record (kNN accuracy of the cut features, the sum of
# the criterion's scores the plan removes); a signal a run does not record is skipped for that run.
SIGNALS: dict[str, str] = {
    "top1_pruned": "accuracy right after pruning",
    "knn_pruned": "kNN accuracy of the cut features",
    "removed_score": "criterion score removed (less is better)",
    "macs": "MACs kept",
}
MIN_RUNS = 3  # fewer ranked pairs say nothing (any two points have Spearman ±1)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v == v else None


def _data_key(spec: Mapping[str, Any]) -> str:
    """The data a run scored on, as one string (``demo``, ``imagefolder:/x (limit 96)``): its DataSpec's kind,
    path and sample limit, which change the evaluation set."""
    d = spec.get("data")
    if not isinstance(d, Mapping):
        return str(d or "")
    key = ":".join(str(d[k]) for k in ("kind", "path") if d.get(k))
    return key + (f" (limit {d['limit']})" if d.get("limit") else "")


KNN_SAMPLES = 2000  # kNN signal on at most this many evaluation images (seeded): CV-kNN grows as n^2


def knn_signal(
    model: torch.nn.Module,
    data: Dataset,
    *,
    k: int = 10,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> float | None:
    """Cross-validated kNN accuracy of the (pruned) model's last-block CLS features on ``data`` (SLS's fast score
    at the cut): a pre-recovery signal that reads the features, not the classifier the pruning disturbed.

    None where it cannot be scored (a class with a single image).
    """
    n = len(data)  # type: ignore[arg-type]
    if n > KNN_SAMPLES:
        g = torch.Generator().manual_seed(seed)
        data = Subset(data, sorted(torch.randperm(n, generator=g)[:KNN_SAMPLES].tolist()))
    bank = extract(model, data, callbacks=callbacks, cancel=cancel)
    try:
        v = knn_accuracy(bank.cls[-1].numpy(), bank.labels.numpy(), k=k, seed=seed)
    except StudioError:  # fewer than two classes in the set
        return None
    return None if v != v else v


def signals_of(run: RunDir) -> dict[str, float | None]:
    """A prune run's pre-recovery signals (None where not recorded), oriented larger = better.

    ``signals`` is read at the top level of results.json or inside the flow's own section (``prune.signals``,
    where the prune flow records ``knn_top1``).
    """
    res = run.results() or {}
    after = res.get("after") if isinstance(res.get("after"), Mapping) else {}
    section = res.get(str(res.get("kind"))) if isinstance(res.get(str(res.get("kind"))), Mapping) else {}
    extra = res.get("signals") if isinstance(res.get("signals"), Mapping) else section.get("signals")
    extra = extra if isinstance(extra, Mapping) else {}
    removed = _number(extra.get("removed_score"))
    return {
        "top1_pruned": _top1(after),
        "knn_pruned": _number(extra.get("knn_top1")),
        "removed_score": None if removed is None else -removed,
        "macs": _number(after.get("macs")),
    }


def calibration_points(root: str | Path, *, model: str | None = None) -> list[dict[str, Any]]:
    """One point per candidate plan that was recovered: its prune run's signals and the recovered accuracy.

    A retrain run's parent is the prune run whose ``export`` folder it started from (``from_run``, read from its
    spec's model source). Several recoveries of one plan: the newest counts. Points carry the data they were
    scored on (``data``), so that only plans measured on the same data are ranked together.
    """
    runs = {r.path.name: r for r in list_runs(root)}
    rows = [r for r in (run_row(run) for run in runs.values()) if r is not None]
    if model is not None:
        rows = [r for r in rows if r["model"] == model]
    points: dict[str, dict[str, Any]] = {}
    for r in rows:  # newest first (list_runs), so setdefault keeps the newest recovery of each plan
        parent = runs.get(str(r["from_run"])) if r["stage"] == STAGES[2] and r["from_run"] else None
        if parent is None or r["top1"] is None or parent.path.name in points:
            continue
        try:
            sig, prow = signals_of(parent), run_row(parent)
            data = _data_key(runs[r["run"]].spec())
        except StudioError:
            continue
        if prow is None or prow["stage"] != STAGES[1]:
            continue
        if sig["top1_pruned"] is None:  # the recovery measured where it started
            sig["top1_pruned"] = r["top1_before_recovery"]
        points[parent.path.name] = {
            "prune_run": parent.path.name,
            "retrain_run": r["run"],
            "method": prow["method"],
            "target_macs": prow["target_macs"],
            "data": data,
            "actual": float(r["top1"]),
            **sig,
        }
    return list(points.values())


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's ρ (average ranks for ties); None when either side is constant or there are < 2 pairs."""
    from scipy.stats import spearmanr

    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    r = float(spearmanr(a, b).statistic)
    return None if r != r else r


def calibration(points: Sequence[Mapping[str, Any]], *, data: str | None = None) -> dict[str, Any]:
    """How well each signal ranked the recovered plans: Spearman ρ with the number of runs, and the best one.

    Only points scored on one data set are ranked together: ``data``, else the one with the most points.
    Returns ``{"data", "table": [{signal, label, spearman, n}], "recommended", "reason", "points"}``; the
    recommendation is the signal with the highest ρ over at least :data:`MIN_RUNS` runs (None if no signal has
    them, or none ranks positively).
    """
    keys = [str(p["data"]) for p in points]
    if data is None and keys:
        data = max(sorted(set(keys)), key=keys.count)
    pts = [p for p in points if str(p["data"]) == data]
    table = []
    for name, text in SIGNALS.items():
        pairs = [(float(p[name]), float(p["actual"])) for p in pts if _number(p.get(name)) is not None]
        rho = _spearman([a for a, _ in pairs], [b for _, b in pairs])
        table.append({"signal": name, "label": text, "spearman": rho, "n": len(pairs)})
    ranked = [t for t in table if t["n"] >= MIN_RUNS and t["spearman"] is not None and t["spearman"] > 0]
    # highest ρ; among equals, the one measured over more runs, then the cheaper signal (table order)
    best = max(ranked, key=lambda t: (round(t["spearman"], 9), t["n"], -table.index(t)), default=None)
    if best is not None:
        reason = f"{best['label']} ranked {best['n']} recovered plans best (Spearman {best['spearman']:.2f})."
    elif len(pts) < MIN_RUNS:
        reason = f"Recover at least {MIN_RUNS} plans of this model and data to rank the signals ({len(pts)} so far)."
    else:
        reason = "No signal ranked the recovered plans in the right order (no positive Spearman)."
    return {
        "data": data,
        "table": table,
        "recommended": None if best is None else best["signal"],
        "reason": reason,
        "points": list(pts),
    }


def rank_untried(root: str | Path, signal: str, *, model: str | None = None) -> list[dict[str, Any]]:
    """Prune runs not recovered yet, best first by ``signal`` (runs without it last): what to retrain next."""
    if signal not in SIGNALS:
        raise StudioError(f"Unknown signal '{signal}'; valid: {', '.join(SIGNALS)}.")
    runs = list_runs(root)
    rows = [r for r in (run_row(run) for run in runs) if r is not None]
    if model is not None:
        rows = [r for r in rows if r["model"] == model]
    recovered = {r["from_run"] for r in rows if r["stage"] == STAGES[2]}
    out = []
    for run in runs:
        row = next((r for r in rows if r["run"] == run.path.name), None)
        if row is None or row["stage"] != STAGES[1] or row["run"] in recovered:
            continue
        out.append(
            {
                "run": row["run"],
                "method": row["method"],
                "target_macs": row["target_macs"],
                signal: signals_of(run)[signal],
            }
        )
    return sorted(out, key=lambda r: (r[signal] is None, -(r[signal] or 0.0)))
