"""The benchmark flow: measured throughput and latency of several models side by side, next to the ideal (MACs)
speed-up, as a run (``results.json`` keeps the figures, so a reload or the Runs page shows them again).

The measuring protocol is :func:`studio.benchmark.benchmark` (the models take turns over rounds in one process,
so the speed-ups compare like with like). Nothing is pruned: ``plan`` is null, ``before``/``after`` hold the
reference model's counted cost, and the flow's section (``results["benchmark"]``) holds ``rows`` (one per model,
backend, dtype and batch size), the ``reference``, the ``skipped`` (backend, dtype) pairs and the ``load_avg`` of
the machine before and after measuring.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..backends import BACKENDS
from ..bench import load_avg
from ..benchmark import DTYPES, Target, benchmark, plan_pairs
from ..errors import StudioError
from ..events import Callback, CancelToken, emit
from ..load import load_model
from ..models import LoadedModel, ModelSpec
from ..runs import RunDir
from . import FLOWS, Flow
from .stages import RunResult, finish_analysis


@dataclass(frozen=True)
class BenchmarkSpec:
    """What to time: named models, batch sizes, dtypes and the protocol's passes (``spec.json`` of a run).

    Attributes:
        models: ``(display name, model)`` pairs, measured in this order; the first is the reference unless
            ``reference`` names another.
        backends: deployment runtimes (:data:`studio.backends.BACKENDS`); a (backend, dtype) pair the backend
            cannot run (ONNX Runtime in bfloat16) is skipped and listed in the results.
        rounds: the models take turns this many times per (backend, dtype, batch size); the median is reported.
    """

    models: tuple[tuple[str, ModelSpec], ...]
    batch_sizes: tuple[int, ...] = (1, 64)
    dtypes: tuple[str, ...] = ("float32",)
    backends: tuple[str, ...] = ("eager",)
    warmup: int = 5
    repeats: int = 20
    rounds: int = 3
    reference: str | None = None

    @property
    def kind(self) -> str:
        return "benchmark"

    def validate(self) -> None:
        """Refuse what cannot be measured, with one sentence saying what to fix, before any model is loaded."""
        names = [n for n, _ in self.models]
        if not names:
            raise StudioError("Pick at least one model to benchmark.")
        if len(set(names)) != len(names):
            raise StudioError(f"Two models share a name ({', '.join(names)}): give each its own.")
        if not self.batch_sizes or any(isinstance(b, bool) or int(b) < 1 for b in self.batch_sizes):
            raise StudioError("Batch sizes must be positive integers (pick at least one).")
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise StudioError(f"Unknown dtype '{bad[0] if bad else ''}': use {', '.join(DTYPES)}.")
        if int(self.warmup) < 0 or int(self.rounds) < 1 or int(self.repeats) < 1:
            raise StudioError("Give warm-up ≥ 0, rounds ≥ 1 and at least one timed pass.")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise StudioError(
                f"Unknown backend '{unknown[0] if unknown else ''}': use {', '.join(BACKENDS.names())}."
            )
        if not plan_pairs(self.backends, self.dtypes)[0]:
            raise StudioError(
                f"{' and '.join(self.backends)} cannot time {' or '.join(self.dtypes)}: add float32 or the eager "
                "backend."
            )
        if "float16" in self.dtypes and all(m.device == "cpu" for _, m in self.models):
            raise StudioError("float16 is measured on a GPU only; on the CPU use float32 or bfloat16.")
        if self.reference is not None and self.reference not in names:
            raise StudioError(f"Reference '{self.reference}' is not among the models ({', '.join(names)}).")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "benchmark",
            "models": [{"name": n, "model": m.to_dict()} for n, m in self.models],
            "batch_sizes": list(self.batch_sizes),
            "dtypes": list(self.dtypes),
            "backends": list(self.backends),
            "warmup": self.warmup,
            "repeats": self.repeats,
            "rounds": self.rounds,
            "reference": self.reference,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchmarkSpec:
        try:
            return cls(
                models=tuple((str(m["name"]), ModelSpec.from_dict(m["model"])) for m in d["models"]),
                batch_sizes=tuple(int(b) for b in d.get("batch_sizes", (1, 64))),
                dtypes=tuple(str(t) for t in d.get("dtypes", ("float32",))),
                backends=tuple(str(b) for b in d.get("backends", ("eager",))),
                warmup=int(d.get("warmup", 5)),
                repeats=int(d.get("repeats", 20)),
                rounds=int(d.get("rounds", 3)),
                reference=None if d.get("reference") is None else str(d["reference"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StudioError(f"The benchmark spec is incomplete or malformed ({e}).") from None

    def with_(self, **changes: Any) -> BenchmarkSpec:
        return dataclasses.replace(self, **changes)


def run_benchmark(
    spec: BenchmarkSpec,
    *,
    run: RunDir | None,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    resume: bool = False,
) -> RunResult:
    """Load every model (``loaded`` stands for those with its source: the studio's cached model), time them
    taking turns, and write the rows."""
    t0 = time.time()
    targets = []
    for name, ms in spec.models:
        emit(callbacks, "log", message=f"loading {name}")
        use = loaded if loaded is not None and loaded.source == ms.source else load_model(ms)
        targets.append(Target(name, use))
    load_before = load_avg()
    rows = benchmark(
        targets,
        sorted(int(b) for b in spec.batch_sizes),
        spec.dtypes,
        backends=spec.backends,
        warmup=int(spec.warmup),
        repeats=int(spec.repeats),
        reference=spec.reference,
        rounds=int(spec.rounds),
        callbacks=callbacks,
        cancel=cancel,
    )
    reference = spec.reference or spec.models[0][0]
    ref = next(t.loaded for t in targets if t.name == reference)
    skipped = [{"backend": b, "dtype": d} for b, d in plan_pairs(spec.backends, spec.dtypes)[1]]
    section = {
        "rows": rows,
        "reference": reference,
        "skipped": skipped,
        "load_avg": [load_before, load_avg()],
    }
    return finish_analysis("benchmark", ref, run, t0, section, callbacks=callbacks, cancel=cancel)


FLOWS.add(
    "benchmark",
    Flow(
        "benchmark",
        BenchmarkSpec,
        run_benchmark,
        "time several models side by side (throughput, latency) beside the ideal MACs speed-up",
    ),
)
