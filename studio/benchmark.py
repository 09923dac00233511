"""Benchmark several models side by side: measured throughput and latency next to the ideal (MACs) speed-up.

Each model is measured with the studio's one protocol (:func:`studio.bench.time_prepared`: warm-up, device
sync, ``inference_mode``, fixed shapes, median of repeats) on every chosen deployment backend
(:mod:`studio.backends`: eager, ``torch.compile``, ONNX Runtime), batch size and dtype, in the same process on the
same device, the models taking turns over several rounds (median over rounds), so the measured speed-ups compare
like with like even when other work shares the machine. The ideal speed-up is the reference model's MACs divided
by the model's (what a perfectly compute-bound device would give); the efficiency is measured / ideal per
backend, and the gap between the two is the point of the page.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .backends import BACKENDS
from .bench import count_macs, count_params, prepare, time_prepared
from .errors import StudioError
from .events import Callback, CancelToken, progress
from .models import LoadedModel

DTYPES = ("float32", "bfloat16", "float16")


def dtypes_for(device: torch.device) -> list[str]:
    """The dtypes worth measuring on a device (float16 autocast is a GPU feature)."""
    return list(DTYPES) if device.type == "cuda" else ["float32", "bfloat16"]


def _dtype(name: str, device: torch.device) -> torch.dtype | None:
    if name not in DTYPES:
        raise StudioError(f"Unknown dtype '{name}'. Use one of {', '.join(DTYPES)}.")
    if name not in dtypes_for(device):
        raise StudioError(f"{name} is not measured on {device.type}; use {' or '.join(dtypes_for(device))}.")
    return None if name == "float32" else getattr(torch, name)


@dataclass(frozen=True)
class Target:
    """One model to measure, under a display name."""

    name: str
    loaded: LoadedModel


def plan_pairs(
    backends: Sequence[str], dtypes: Sequence[str]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The (backend, dtype) pairs to time and those skipped because the backend cannot run the dtype (ONNX
    Runtime times the float32 export only)."""
    pairs = [(b, d) for b in backends for d in dtypes]
    timed = [(b, d) for b, d in pairs if BACKENDS.get(b).supports(d)]
    return timed, [p for p in pairs if p not in timed]


def benchmark(
    targets: Sequence[Target],
    batch_sizes: Sequence[int] = (1, 64),
    dtypes: Sequence[str] = ("float32",),
    *,
    backends: Sequence[str] = ("eager",),
    warmup: int = 5,
    repeats: int = 20,
    reference: str | None = None,
    rounds: int = 3,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> list[dict[str, Any]]:
    """Measure every (model, backend, dtype, batch size); one row each, with speed-ups against ``reference``
    on the same backend, dtype and batch size.

    Args:
        backends: runtimes from :data:`studio.backends.BACKENDS`; each model is prepared once per backend, dtype
            and batch size (an ONNX export, a compilation), then timed.
        reference: the name of the target the speed-ups are relative to (default: the first).
        rounds: the models take turns this many times per (backend, dtype, batch size), ``repeats // rounds``
            timed passes each; the median over rounds is reported, so slow drifts in machine load cancel out.
    Returns:
        Rows with ``model``, ``backend``, ``batch_size``, ``dtype``, ``images_per_s``, ``latency_ms``,
        ``latency_ms_p90``, ``params``, ``macs``, ``ideal_speedup`` (MACs ratio), ``measured_speedup``
        (throughput ratio) and ``efficiency`` (measured / ideal: 1 is a perfectly compute-bound device).
    """
    if not targets:
        raise StudioError("Pick at least one model to benchmark.")
    if rounds < 1:
        raise StudioError("rounds must be at least 1.")
    if not batch_sizes or min(batch_sizes) < 1:
        raise StudioError("Batch sizes must be positive integers.")
    names = [t.name for t in targets]
    reference = reference or names[0]
    if reference not in names:
        raise StudioError(f"Reference '{reference}' is not among the models measured ({', '.join(names)}).")
    pairs, _ = plan_pairs(backends, dtypes)
    if not pairs:
        raise StudioError(
            f"None of the backends {', '.join(backends)} can time {', '.join(dtypes)}: add float32 or the eager "
            "backend."
        )
    facts = {t.name: (count_macs(t.loaded.model, t.loaded.data_config["input_size"])["total"],
                      count_params(t.loaded.model)) for t in targets}  # fmt: skip
    rows: list[dict[str, Any]] = []
    total, done = len(pairs) * len(batch_sizes) * rounds * len(targets), 0
    per_round = max(1, repeats // rounds)
    for backend, name in pairs:
        for bs in batch_sizes:
            ready = {
                t.name: prepare(
                    t.loaded.model,
                    t.loaded.data_config["input_size"],
                    batch_size=int(bs),
                    dtype=_dtype(name, t.loaded.device),
                    backend=backend,
                )
                for t in targets
            }
            # models take turns, round after round, so a load change on the machine hits all of them alike
            got: dict[str, list[Any]] = {t.name: [] for t in targets}
            for _ in range(rounds):
                for t in targets:
                    got[t.name].append(
                        time_prepared(ready[t.name], warmup=warmup, repeats=per_round, cancel=cancel)
                    )
                    done += 1
                    progress(callbacks, "benchmark", done, total, model=t.name, backend=backend)
            for t in targets:
                rs = got[t.name]
                macs, params = facts[t.name]
                rows.append(
                    {
                        "model": t.name,
                        "backend": backend,
                        "batch_size": int(bs),
                        "dtype": name,
                        "images_per_s": statistics.median(r.images_per_s for r in rs),
                        "latency_ms": statistics.median(r.latency_ms for r in rs),
                        "latency_ms_p90": statistics.median(r.latency_ms_p90 for r in rs),
                        "params": params,
                        "macs": macs,
                        "device": rs[0].device,
                        "threads": rs[0].threads,
                        "repeats": per_round * rounds,
                    }
                )
    ref = {(r["backend"], r["dtype"], r["batch_size"]): r for r in rows if r["model"] == reference}
    for r in rows:
        base = ref[(r["backend"], r["dtype"], r["batch_size"])]
        r["ideal_speedup"] = base["macs"] / r["macs"]
        r["measured_speedup"] = r["images_per_s"] / base["images_per_s"]
        r["efficiency"] = r["measured_speedup"] / r["ideal_speedup"]
    return rows
