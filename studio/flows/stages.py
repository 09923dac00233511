"""The shared tail of every flow, written once: calibration, measure before/after, compare, export, results.

Every kind of work (prune, P3B, SPLoRA, SLS, retrain; the analyses importance and benchmark with no plan and
``COST_ONLY``) ends the same way: the pruned (or recovered) model and
its plan go through :func:`finish`, which counts params/MACs (they must equal the plan's analytic ones),
evaluates, times throughput, exports (safetensors + manifest, optionally ONNX) and writes ``results.json``
in one shape (:class:`RunResult`)::

    {"kind", "method", "plan", "summary", "params", "before", "after", "speedup", "ideal_speedup",
     "export", "onnx", "device", "seconds", "peak_memory_mb", "<kind>": {...the flow's own section...}}

``before``/``after`` each hold ``params``, ``macs`` (+ the attention/linear split), and where measured
``top1``/``loss``/``n`` and ``throughput`` per batch size; ``after["matches_plan"]`` says whether the counted
cost equals the plan's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .. import memory
from ..analysis.criteria import Batch, calibration_batches
from ..bench import measure_throughput, profile
from ..device import describe_device
from ..errors import StudioError
from ..evaluate import evaluate
from ..events import Callback, CancelToken, check, emit
from ..export import export_loaded, export_onnx
from ..load import load_model
from ..models import LoadedModel
from ..plan import PrunePlan
from ..runs import RunDir

__all__ = [
    "COST_ONLY",
    "Batch",
    "Measure",
    "RunResult",
    "calibration_batches",
    "compare",
    "finish",
    "measure",
]


@dataclass(frozen=True)
class Measure:
    """How a flow measures its models (the spec's measurement fields)."""

    evaluate: bool = True
    bench: bool = True
    batch_size: int = 64
    bench_batch_sizes: tuple[int, ...] = (1, 64)
    bench_warmup: int = 3
    bench_repeats: int = 10
    export: bool = True
    onnx: bool = False


# What an analysis flow (importance, benchmark) measures of its model: its counted cost only; there is no pruned
# model to evaluate or export
COST_ONLY = Measure(evaluate=False, bench=False, export=False)


@dataclass(frozen=True)
class RunResult:
    """What every flow returns and writes as ``results.json`` (see the module docstring for the shape)."""

    kind: str
    method: str
    plan: PrunePlan | None
    before: dict[str, Any]
    after: dict[str, Any]
    speedup: dict[str, float]
    ideal_speedup: float
    export: str | None
    onnx: dict[str, Any] | None
    device: str
    seconds: float
    section: dict[str, Any] = field(default_factory=dict)
    peak_memory: dict[str, float] = field(default_factory=dict)  # MiB: rss (process), cuda (max allocated)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "method": self.method,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "summary": {} if self.plan is None else dict(self.plan.summary),
            "params": {} if self.plan is None else dict(self.plan.params),
            "before": self.before,
            "after": self.after,
            "speedup": self.speedup,
            "ideal_speedup": self.ideal_speedup,
            "export": self.export,
            "onnx": self.onnx,
            "device": self.device,
            "seconds": self.seconds,
            "peak_memory_mb": self.peak_memory,
            self.kind: self.section,
        }


def measure(
    model: torch.nn.Module,
    loaded: LoadedModel,
    how: Measure,
    eval_data: Any,
    *,
    tag: str,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Counted params/MACs, accuracy (if data) and throughput (if asked) of one model."""
    input_size = loaded.data_config["input_size"]
    out: dict[str, Any] = profile(model, input_size)
    if eval_data is not None and how.evaluate:
        emit(callbacks, "log", message=f"evaluating the {tag} model")
        ev = evaluate(
            model,
            eval_data,
            batch_size=max(how.batch_size, 128),
            num_classes=loaded.base.num_classes,
            callbacks=callbacks,
            cancel=cancel,
        )
        out.update(top1=ev.top1, loss=ev.loss, n=ev.n)
    if how.bench:
        out["throughput"] = {}
        for bs in how.bench_batch_sizes:
            check(cancel)
            r = measure_throughput(
                model,
                input_size,
                batch_size=bs,
                warmup=how.bench_warmup,
                repeats=how.bench_repeats,
                callbacks=callbacks,
                cancel=cancel,
            )
            out["throughput"][str(bs)] = r.to_dict()
    return out


def compare(before: Mapping[str, Any], after: dict[str, Any], plan: PrunePlan | None) -> dict[str, float]:
    """Mark whether the counted params/MACs equal the plan's (``after["matches_plan"]``); return the measured
    speed-up per batch size (batch sizes timed on both)."""
    if plan is not None and "params_after" in plan.summary:
        after["matches_plan"] = (
            after["params"] == plan.summary["params_after"] and after["macs"] == plan.summary["macs_after"]
        )
    b, a = before.get("throughput", {}), after.get("throughput", {})
    return {bs: a[bs]["images_per_s"] / b[bs]["images_per_s"] for bs in a if bs in b}


def _real_class_names(data: Any) -> list[str] | None:
    """A split's class names where they are the data's own (ImageFolder folders, the demo's digits), else None
    (VTAB lists only number their labels)."""
    names = getattr(data, "class_names", None)
    return [str(n) for n in names] if names and getattr(data, "named", False) else None


def finish(
    *,
    kind: str,
    method: str,
    loaded: LoadedModel,
    model: torch.nn.Module,
    plan: PrunePlan | None,
    how: Measure,
    run: RunDir | None,
    started: float,
    eval_data: Any = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    before_model: torch.nn.Module | None = None,
    section: Mapping[str, Any] | Callable[[dict[str, Any], dict[str, Any]], Mapping[str, Any]] | None = None,
    export_extra: Mapping[str, Any] | None = None,
    data_class_names: Sequence[str] | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> RunResult:
    """Measure (unless given), compare, export and write ``results.json``: the tail every flow shares.

    Args:
        model: the final model (pruned, recovered; LoRA already fused); ``plan`` its structure on the base.
        before / after: measurements the flow already made (SLS measures its stages itself); else measured
            here, ``before`` on ``before_model`` (default: the loaded model) and ``after`` on ``model``.
        section: the flow's own part of ``results.json`` (under the key ``kind``), or a function of
            ``(before, after)`` giving it.
        export_extra: extra manifest entries (e.g. the method's options).
        data_class_names: the classes of the data the model was trained and scored on (default: ``eval_data``'s
            where they are real names); recorded in the export when the model's own are only stand-ins
            ("0".."N-1" of a bare checkpoint or a fresh head), so the export says what its outputs mean.
    """
    emit(callbacks, "status", state="measuring")
    ref = loaded.model if before_model is None else before_model
    if before is None:
        before = measure(ref, loaded, how, eval_data, tag="base", callbacks=callbacks, cancel=cancel)
    if after is None:
        after = measure(model, loaded, how, eval_data, tag="pruned", callbacks=callbacks, cancel=cancel)
    speedup = compare(before, after, plan)
    export_dir, onnx = None, None
    if how.export and run is not None:
        emit(callbacks, "status", state="exporting")
        metrics = {k: v for k, v in after.items() if k in ("params", "macs", "loss") or k.endswith("top1")}
        # the run owns its export folder: a resumed attempt replaces what an earlier one wrote
        names = list(data_class_names) if data_class_names else _real_class_names(eval_data)
        source = loaded
        if not loaded.class_names_known and names and len(names) == int(getattr(model, "num_classes", -1)):
            source = replace(loaded, class_names=[str(n) for n in names], class_names_known=True)
        export_loaded(
            model, source, run.export_dir, plan=plan, metrics=metrics, extra=export_extra, overwrite=True
        )
        export_dir = str(run.export_dir)
        if how.onnx:
            onnx = export_onnx(model, run.export_dir / "model.onnx", loaded.data_config["input_size"])
    result = RunResult(
        kind=kind,
        method=method,
        plan=plan,
        before=before,
        after=after,
        speedup=speedup,
        ideal_speedup=before["macs"] / after["macs"],
        export=export_dir,
        onnx=onnx,
        device=describe_device(loaded.device),
        seconds=time.time() - started,
        section=dict((section(before, after) if callable(section) else section) or {}),
        peak_memory={k: round(v / 2**20, 1) for k, v in memory.peak_bytes(loaded.device).items()},
    )
    if run is not None:
        if plan is not None:
            plan.save(run.plan_file)
        run.write_results(result.to_dict())
    emit(callbacks, "status", state="done")
    return result


def analysis_flow(
    kind: str,
    analyse: Callable[[Any, LoadedModel, Sequence[Callback], CancelToken | None], Mapping[str, Any]],
) -> Callable[..., RunResult]:
    """The run function of an analysis flow (importance, separability, sensitivity): load the model (or use the
    studio's cached one), ``analyse(spec, loaded, callbacks, cancel)`` into the flow's section, and end in the
    shared tail with nothing pruned (``plan`` null, ``before``/``after`` the model's counted cost). An analysis
    keeps no checkpoint: ``resume`` runs it again (its disk caches make a rerun cheap)."""

    def run_analysis(
        spec: Any,
        *,
        run: RunDir | None,
        loaded: LoadedModel | None = None,
        callbacks: Sequence[Callback] = (),
        cancel: CancelToken | None = None,
        resume: bool = False,
    ) -> RunResult:
        started = time.time()
        loaded = loaded or load_model(spec.model)
        section = analyse(spec, loaded, callbacks, cancel)
        return finish_analysis(kind, loaded, run, started, section, callbacks=callbacks, cancel=cancel)

    return run_analysis


def finish_analysis(
    kind: str,
    loaded: LoadedModel,
    run: RunDir | None,
    started: float,
    section: Mapping[str, Any],
    *,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> RunResult:
    """The shared tail of an analysis (nothing pruned): ``loaded``'s counted cost as ``before``/``after``, no
    plan, no export, and ``section`` as the flow's own part of ``results.json``."""
    return finish(
        kind=kind,
        method=kind,
        loaded=loaded,
        model=loaded.model,
        plan=None,
        how=COST_ONLY,
        run=run,
        started=started,
        section=section,
        callbacks=callbacks,
        cancel=cancel,
    )


def section_of(run: RunDir, kind: str) -> dict[str, Any]:
    """The flow's own section of a finished run of ``kind`` (refused, saying why, for any other run)."""
    res = run.results() or {}
    if res.get("kind") != kind or not isinstance(res.get(kind), dict):
        raise StudioError(f"{run.path} is not a finished {kind} run: it has nothing of that kind to read.")
    return res[kind]
