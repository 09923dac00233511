"""One pruning run end to end: plan with a registered method, apply the surgery, measure, export.

``run_prune(spec)`` is the engine entry point behind ``python -m studio prune`` and the studio's Prune page:
load the model, draw calibration batches if the method needs them, make the plan (summary filled from the
analytic costs), apply it to a copy, count params/MACs on the pruned model (they must equal the plan's), evaluate
before/after, measure throughput before/after at batch 1 and a large batch, and export (safetensors + manifest,
optionally ONNX). With a :class:`~studio.runs.RunDir` every artefact lands in it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..bench import measure_throughput, profile
from ..data import DataSpec, make_loader, prepare
from ..device import describe_device
from ..events import Callback, CancelToken, check, emit
from ..models import LoadedModel, ModelSpec, load_model
from ..plan import PrunePlan
from ..runs import RunDir
from ..surgery import apply_plan
from . import Batch, PruneRequest, get_method, make_plan


@dataclass(frozen=True)
class PruneSpec:
    """What to prune and how to measure it (``spec.json`` of a prune run)."""

    model: ModelSpec
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    data: DataSpec | None = None
    eval_split: str = "test"
    calib_split: str = "train"
    calib_batches: int = 8
    batch_size: int = 64
    seed: int = 0
    evaluate: bool = True
    bench: bool = True
    bench_batch_sizes: tuple[int, ...] = (1, 64)
    bench_warmup: int = 3
    bench_repeats: int = 10
    export: bool = True
    onnx: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["data"] = None if self.data is None else self.data.to_dict()
        d["params"] = dict(self.params)
        d["bench_batch_sizes"] = list(self.bench_batch_sizes)
        return {"kind": "prune", **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruneSpec:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["model"] = ModelSpec.from_dict(d["model"])
        kw["data"] = None if d.get("data") is None else DataSpec.from_dict(d["data"])
        kw["bench_batch_sizes"] = tuple(d.get("bench_batch_sizes", (1, 64)))
        return cls(**kw)


@dataclass(frozen=True)
class PruneResult:
    """Before/after numbers of one pruning run (``results.json``)."""

    method: str
    plan: PrunePlan
    before: dict[str, Any]
    after: dict[str, Any]
    speedup: dict[str, float]
    ideal_speedup: float
    export: str | None
    onnx: dict[str, Any] | None
    device: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "summary": dict(self.plan.summary),
            "params": dict(self.plan.params),
            "before": self.before,
            "after": self.after,
            "speedup": self.speedup,
            "ideal_speedup": self.ideal_speedup,
            "export": self.export,
            "onnx": self.onnx,
            "device": self.device,
            "seconds": self.seconds,
        }


def calibration_batches(
    loaded: LoadedModel, data: DataSpec, split: str, n: int, batch_size: int, seed: int = 0
) -> list[Batch]:
    """``n`` shuffled (seeded) batches of a split, on the model's device."""
    ds = prepare(data, split, loaded.data_config, loaded.base.num_classes)
    out: list[Batch] = []
    for x, y in make_loader(ds, batch_size=batch_size, shuffle=True, seed=seed):
        out.append((x.to(loaded.device), torch.as_tensor(y).to(loaded.device)))
        if len(out) >= n:
            break
    return out


def measure(
    model: torch.nn.Module,
    loaded: LoadedModel,
    spec: PruneSpec,
    eval_data: Any,
    *,
    tag: str,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Counted params/MACs, accuracy (if data) and throughput (if asked) of one model."""
    from ..evaluate import evaluate

    input_size = loaded.data_config["input_size"]
    out: dict[str, Any] = profile(model, input_size)
    if eval_data is not None:
        emit(callbacks, "log", message=f"evaluating the {tag} model")
        ev = evaluate(
            model,
            eval_data,
            batch_size=max(spec.batch_size, 128),
            num_classes=loaded.base.num_classes,
            callbacks=callbacks,
            cancel=cancel,
        )
        out.update(top1=ev.top1, loss=ev.loss, n=ev.n)
    if spec.bench:
        out["throughput"] = {}
        for bs in spec.bench_batch_sizes:
            check(cancel)
            r = measure_throughput(
                model,
                input_size,
                batch_size=bs,
                warmup=spec.bench_warmup,
                repeats=spec.bench_repeats,
                callbacks=callbacks,
                cancel=cancel,
            )
            out["throughput"][str(bs)] = r.to_dict()
    return out


def compare(before: dict[str, Any], after: dict[str, Any], plan: PrunePlan) -> dict[str, float]:
    """Mark whether the measured params/MACs equal the plan's (``after["matches_plan"]``); return the measured
    speed-up per batch size."""
    after["matches_plan"] = (
        after["params"] == plan.summary["params_after"] and after["macs"] == plan.summary["macs_after"]
    )
    return {
        bs: after["throughput"][bs]["images_per_s"] / before["throughput"][bs]["images_per_s"]
        for bs in after.get("throughput", {})
    }


def run_prune(
    spec: PruneSpec,
    *,
    run: RunDir | None = None,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    resume: bool = False,
) -> PruneResult:
    """Plan, prune, measure and export as ``spec`` says (see the module docstring).

    Methods that train while pruning (a registered ``runner``) run their own job instead, with the same
    arguments; ``resume`` continues such a job from its checkpoint.

    Args:
        run: run folder receiving ``plan.json``, ``results.json`` and ``export/``.
        loaded: an already loaded model (e.g. the studio's cached one); never mutated.
    """
    t0 = time.time()
    method = get_method(spec.method)
    if method.runner is not None:
        return method.runner(spec, run=run, loaded=loaded, callbacks=callbacks, cancel=cancel, resume=resume)
    callbacks = [*callbacks, run.log_event] if run is not None else list(callbacks)
    loaded = loaded or load_model(spec.model)
    batches: list[Batch] = []
    if method.needs_data:
        if spec.data is None:
            from ..errors import StudioError

            raise StudioError(f"Method '{spec.method}' needs calibration data: give --data.")
        emit(
            callbacks,
            "log",
            message=f"drawing {spec.calib_batches} calibration batches of {spec.calib_split}",
        )
        batches = calibration_batches(
            loaded, spec.data, spec.calib_split, spec.calib_batches, spec.batch_size, spec.seed
        )
    emit(callbacks, "status", state="planning", method=spec.method)
    plan = make_plan(
        spec.method, PruneRequest(loaded, spec.params, batches, spec.seed), callbacks=callbacks, cancel=cancel
    )
    if run is not None:
        plan.save(run.plan_file)
    s = plan.summary
    emit(
        callbacks,
        "log",
        message=f"plan keeps {s['macs_fraction']:.1%} of the MACs, {s['params_fraction']:.1%} of the params",
    )
    pruned = apply_plan(copy.deepcopy(loaded.model), plan).eval()
    eval_data = None
    if spec.evaluate and spec.data is not None:
        eval_data = prepare(spec.data, spec.eval_split, loaded.data_config, loaded.base.num_classes)
    emit(callbacks, "status", state="measuring")
    before = measure(loaded.model, loaded, spec, eval_data, tag="base", callbacks=callbacks, cancel=cancel)
    after = measure(pruned, loaded, spec, eval_data, tag="pruned", callbacks=callbacks, cancel=cancel)
    speedup = compare(before, after, plan)
    export_dir, onnx = None, None
    if spec.export and run is not None:
        from ..export import export_loaded, export_onnx

        metrics = {k: after[k] for k in ("top1", "loss", "params", "macs") if k in after}
        export_loaded(pruned, loaded, run.export_dir, plan=plan, metrics=metrics)
        export_dir = str(run.export_dir)
        if spec.onnx:
            onnx = export_onnx(pruned, run.export_dir / "model.onnx", loaded.data_config["input_size"])
    result = PruneResult(
        method=spec.method,
        plan=plan,
        before=before,
        after=after,
        speedup=speedup,
        ideal_speedup=before["macs"] / after["macs"],
        export=export_dir,
        onnx=onnx,
        device=describe_device(loaded.device),
        seconds=time.time() - t0,
    )
    if run is not None:
        run.write_results(result.to_dict())
    emit(callbacks, "status", state="done")
    return result
