"""The prune flow: plan with a registered method (or apply a given plan), surgery on a copy, the shared tail.

``PruneSpec`` is the one form of a pruning run, whatever starts it (``python -m studio prune``, the Prune and
Importance pages, an export of the active plan). Its ``kind`` is the flow of its method: ``prune`` for the
methods that plan from calibration batches, ``p3b``/``splora`` for those that train while they prune (their
flows take the same spec). With ``plan`` set, the method is not run: the given plan (an edited or uploaded one)
is applied as it is.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import memory
from ..compare import knn_signal
from ..costs import with_summary
from ..data import DataSpec, prepare
from ..errors import StudioError
from ..evaluate import logits_of
from ..events import Callback, CancelToken, emit
from ..latency import measured_fraction, time_ms
from ..load import load_model
from ..models import LoadedModel, ModelSpec
from ..plan import PrunePlan
from ..prune import PruneRequest, get_method, make_plan, require_unpruned
from ..prune.presets import get_preset
from ..runs import RunDir
from ..surgery import apply_plan
from . import FLOWS, Flow
from .stages import Measure, RunResult, calibration_batches, finish

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PruneSpec:
    """What to prune and how to measure it (``spec.json`` of a prune, P3B or SPLoRA run).

    Attributes:
        method: a registered method (:data:`studio.prune.METHODS`).
        params: the method's options (resolved: defaults filled in, so ``spec.json`` replays exactly).
        plan: a plan to apply instead of running the method (its ``method`` then only labels the run).
        calib_batches: calibration batches for data-driven methods (CLI ``--calib-batches``); None: the
            method's own need (SLS: enough batches for its 1,000 ``samples``; others 8), see :attr:`batches`.
        micro_batch: images per calibration pass (CLI ``--micro-batch``; 0: the largest within the
            activation budget of :mod:`studio.memory`). The gradients are the whole batch's either way.
        preset: the preset the settings were started from (``cpu``, ``paper``, ``paper:<method>``), a label:
            its values are already in ``params`` and the calibration fields (:mod:`studio.prune.presets`).
    """

    model: ModelSpec
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    data: DataSpec | None = None
    plan: PrunePlan | None = None
    eval_split: str = "test"
    calib_split: str = "train"
    calib_batches: int | None = None
    batch_size: int = 64
    micro_batch: int = 0
    seed: int = 0
    evaluate: bool = True
    bench: bool = True
    bench_batch_sizes: tuple[int, ...] = (1, 64)
    bench_warmup: int = 3
    bench_repeats: int = 10
    export: bool = True
    onnx: bool = False
    preset: str | None = None

    @property
    def kind(self) -> str:
        return "prune" if self.plan is not None else get_method(self.method).flow

    @property
    def batches(self) -> int:
        """The calibration batches this run draws (``calib_batches``, or the method's default)."""
        if self.plan is not None:
            return 0
        return get_method(self.method).calib_batches(self.params, self.batch_size, self.calib_batches)

    @property
    def measure(self) -> Measure:
        return Measure(
            evaluate=self.evaluate,
            bench=self.bench,
            batch_size=self.batch_size,
            bench_batch_sizes=self.bench_batch_sizes,
            bench_warmup=self.bench_warmup,
            bench_repeats=self.bench_repeats,
            export=self.export,
            onnx=self.onnx,
        )

    def validate(self) -> None:
        """Refuse what cannot run, with one sentence saying what to fix, before any work starts."""
        method = get_method(self.method) if self.plan is None else None
        if method is not None:
            params = method.resolve(self.params)  # unknown options and bad values
            if self.preset is not None:
                get_preset(self.preset, self.method)  # a preset of this method
            if method.data_needed(params) and self.data is None:
                raise StudioError(f"Method '{self.method}' needs data: give --data (e.g. --data demo).")
            if not any(params.get(b.option) is not None for b in method.budgets):
                names = " or ".join("--" + b.option.replace("_", "-") for b in method.budgets)
                raise StudioError(f"Method '{self.method}' needs a budget: give {names}.")
        for name in ("eval_split", "calib_split"):
            if getattr(self, name) not in SPLITS:
                raise StudioError(f"{name} must be one of {', '.join(SPLITS)}, not {getattr(self, name)!r}.")
        for name in ("calib_batches", "batch_size", "bench_repeats"):
            v = getattr(self, name)
            if name == "calib_batches" and v is None:  # the method's default
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise StudioError(
                    f"--{name.replace('_', '-')} must be a whole number of at least 1, got {v!r}."
                )
        if (
            isinstance(self.micro_batch, bool)
            or not isinstance(self.micro_batch, int)
            or self.micro_batch < 0
        ):
            raise StudioError(
                f"--micro-batch must be a whole number ≥ 0 (0 chooses one that fits), got {self.micro_batch!r}."
            )
        if self.bench_warmup < 0 or not self.bench_batch_sizes or min(self.bench_batch_sizes) < 1:
            raise StudioError("Benchmark batch sizes must be at least 1 and warm-up at least 0.")
        for k, v in self.params.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise StudioError(f"Option '{k}' must be a finite number, got {v}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model.to_dict(),
            "method": self.method,
            "params": dict(self.params),
            "data": None if self.data is None else self.data.to_dict(),
            "plan": None if self.plan is None else self.plan.to_dict(),
            "eval_split": self.eval_split,
            "calib_split": self.calib_split,
            "calib_batches": self.calib_batches,
            "batch_size": self.batch_size,
            "micro_batch": self.micro_batch,
            "seed": self.seed,
            "evaluate": self.evaluate,
            "bench": self.bench,
            "bench_batch_sizes": list(self.bench_batch_sizes),
            "bench_warmup": self.bench_warmup,
            "bench_repeats": self.bench_repeats,
            "export": self.export,
            "onnx": self.onnx,
            "preset": self.preset,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruneSpec:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["model"] = ModelSpec.from_dict(d["model"])
        kw["data"] = None if d.get("data") is None else DataSpec.from_dict(d["data"])
        kw["plan"] = None if d.get("plan") is None else PrunePlan.from_dict(d["plan"])
        kw["bench_batch_sizes"] = tuple(d.get("bench_batch_sizes", (1, 64)))
        kw["params"] = dict(d.get("params") or {})
        return cls(**kw)


def model_for(spec: PruneSpec, loaded: LoadedModel | None) -> LoadedModel:
    """The unpruned model a spec starts from (the given one, e.g. the studio's cached model, else loaded)."""
    loaded = require_unpruned(loaded or load_model(spec.model))
    if spec.plan is None:  # a family variant the method cannot prune is refused before any work
        get_method(spec.method).refuse(loaded.model, spec.params)
    return loaded


def calibration_estimate(spec: PruneSpec, loaded: LoadedModel) -> memory.Estimate | None:
    """The memory a spec's calibration pass will take at its peak (None: the method uses no data)."""
    if spec.plan is not None or spec.data is None:
        return None
    method = get_method(spec.method)
    if not method.data_needed(spec.params):
        return None
    return memory.estimate(
        loaded.base, spec.batch_size, method.calibration, loaded.device, micro=spec.micro_batch
    )


def calibration_seconds(spec: PruneSpec, loaded: LoadedModel, est: memory.Estimate) -> float:
    """Rough wall time of the calibration: one timed forward pass of a micro-batch here, times the passes
    the method's mode costs (a backward ~3 forwards, Hessian products ~7) and the number of images."""
    n = max(1, min(est.micro_batch, 8))
    x = torch.zeros(n, *loaded.data_config["input_size"], device=loaded.device)
    with torch.inference_mode():
        logits_of(loaded.model, x[:1])  # warm-up
        t0 = time.perf_counter()
        logits_of(loaded.model, x)
        per_image = (time.perf_counter() - t0) / n
    passes = {"forward": 1.0, "backward": 3.0, "hessian": 7.0}[est.mode]
    return per_image * passes * spec.batches * spec.batch_size


LATENCY_MISS = 0.10  # a measured latency further than this from its target is flagged


def measured_latency(loaded: LoadedModel, pruned: torch.nn.Module, plan: PrunePlan) -> dict[str, Any] | None:
    """For a plan solved for a latency target: target, predicted and measured latency side by side, the dense
    and pruned models timed now in interleaved pairs (so both see the same load; the measured latency is the
    dense median times the pairs' median ratio), a miss beyond 10 % flagged."""
    rec = plan.params.get("latency")
    if not isinstance(rec, dict):
        return None
    size, batch, backend = loaded.data_config["input_size"], int(rec["batch"]), str(rec["backend"])
    dtype = str(rec.get("dtype", "float32"))
    dense = copy.deepcopy(loaded.model).eval()
    dense_ms = time_ms(dense, size, batch, backend=backend, dtype=dtype)
    pruned_ms = dense_ms * measured_fraction(dense, pruned, size, batch, backend=backend, dtype=dtype)
    target_ms = float(rec["target_latency"]) * dense_ms
    return {
        **rec,
        "dense_ms": round(dense_ms, 4),
        "target_ms": round(target_ms, 4),
        "measured_ms": round(pruned_ms, 4),
        "missed": abs(pruned_ms / target_ms - 1) > LATENCY_MISS,
    }


def run_prune(
    spec: PruneSpec,
    *,
    run: RunDir | None,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    resume: bool = False,
) -> RunResult:
    """Plan (or take the given plan), apply it to a copy, measure before/after, export (the shared tail).

    ``resume`` has nothing to continue (a plan takes seconds to minutes): the run simply runs again.
    """
    t0 = time.time()
    estimate: memory.Estimate | None = None
    loaded = model_for(spec, loaded)
    if spec.plan is not None:
        plan = with_summary(spec.plan.validate().made_for(loaded.base))
    else:
        method = get_method(spec.method)
        batches = []
        if method.data_needed(spec.params) and spec.data is not None:
            estimate = calibration_estimate(spec, loaded)
            if estimate is not None:
                memory.require_fits(estimate, loaded.device, f"Calibrating {spec.method}")
                emit(callbacks, "log", message=f"calibration memory estimate: {estimate.describe()}")
            emit(
                callbacks,
                "log",
                message=f"drawing {spec.batches} calibration batches of {spec.calib_split}",
            )
            batches = calibration_batches(
                loaded, spec.data, spec.calib_split, spec.batches, spec.batch_size, spec.seed
            )
        emit(callbacks, "status", state="planning", method=spec.method)
        plan = make_plan(
            spec.method,
            PruneRequest(loaded, spec.params, batches, spec.seed, spec.micro_batch),
            callbacks=callbacks,
            cancel=cancel,
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
    latency = measured_latency(loaded, pruned, plan)
    eval_data = None
    if spec.evaluate and spec.data is not None:
        eval_data = prepare(
            spec.data,
            spec.eval_split,
            loaded.data_config,
            loaded.base.num_classes,
            class_names=loaded.known_class_names,
        )
    return finish(
        kind="prune",
        method=plan.method if spec.plan is not None else spec.method,
        loaded=loaded,
        model=pruned,
        plan=plan,
        how=spec.measure,
        run=run,
        started=t0,
        eval_data=eval_data,
        # the estimate beside the measured peak_memory_mb, so a run checks what the page predicted
        section={
            "given_plan": spec.plan is not None,
            "memory_estimate": None if estimate is None else estimate.to_dict(),
            # pre-recovery signals the Compare page ranks against the recovered accuracy (studio.compare)
            "signals": {
                "knn_top1": None
                if eval_data is None
                else knn_signal(pruned, eval_data, seed=spec.seed, callbacks=callbacks, cancel=cancel),
                # the share of the method's criterion score on the removed units (None for a method without one)
                "removed_score": plan.summary.get("removed_score"),
            },
            "latency": latency,
        },
        callbacks=callbacks,
        cancel=cancel,
    )


FLOWS.add(
    "prune",
    Flow(
        "prune",
        PruneSpec,
        run_prune,
        "plan with a method (or apply a given plan), prune a copy, measure, export",
    ),
)
