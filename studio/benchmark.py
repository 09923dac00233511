"""Benchmark several models side by side: measured throughput and latency next to the ideal (MACs) speed-up.

Each model is measured with the protocol of :func:`studio.bench.measure_throughput` (warm-up, device sync,
``inference_mode``, fixed shapes, median of repeats) at every chosen batch size and dtype, in the same process on
the same device, the models taking turns over several rounds (median over rounds), so the measured speed-ups
compare like with like even when other work shares the machine. The ideal speed-up is
the reference model's MACs divided by the model's (what a perfectly compute-bound device would give); the gap
between the two is the point of the page.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .bench import count_macs, count_params, measure_throughput
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


def benchmark(
    targets: Sequence[Target],
    batch_sizes: Sequence[int] = (1, 64),
    dtypes: Sequence[str] = ("float32",),
    *,
    warmup: int = 5,
    repeats: int = 20,
    reference: str | None = None,
    rounds: int = 3,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> list[dict[str, Any]]:
    """Measure every (model, dtype, batch size); one row each, with speed-ups against ``reference``.

    Args:
        reference: the name of the target the speed-ups are relative to (default: the first).
        rounds: the models take turns this many times per (dtype, batch size), ``repeats // rounds`` timed
            passes each; the median over rounds is reported, so slow drifts in machine load cancel out.
    Returns:
        Rows with ``model``, ``batch_size``, ``dtype``, ``images_per_s``, ``latency_ms``, ``latency_ms_p90``,
        ``params``, ``macs``, ``ideal_speedup`` (MACs ratio) and ``measured_speedup`` (throughput ratio).
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
    facts = {t.name: (count_macs(t.loaded.model, t.loaded.data_config["input_size"])["total"],
                      count_params(t.loaded.model)) for t in targets}  # fmt: skip
    rows: list[dict[str, Any]] = []
    total, done = len(dtypes) * len(batch_sizes) * rounds * len(targets), 0
    per_round = max(1, repeats // rounds)
    for name in dtypes:
        for bs in batch_sizes:
            # models take turns, round after round, so a load change on the machine hits all of them alike
            got: dict[str, list[Any]] = {t.name: [] for t in targets}
            for _ in range(rounds):
                for t in targets:
                    r = measure_throughput(
                        t.loaded.model,
                        t.loaded.data_config["input_size"],
                        batch_size=int(bs),
                        warmup=warmup,
                        repeats=per_round,
                        dtype=_dtype(name, t.loaded.device),
                        cancel=cancel,
                    )
                    got[t.name].append(r)
                    done += 1
                    progress(callbacks, "benchmark", done, total, model=t.name)
            for t in targets:
                rs = got[t.name]
                macs, params = facts[t.name]
                rows.append(
                    {
                        "model": t.name,
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
    ref = {(r["dtype"], r["batch_size"]): r for r in rows if r["model"] == reference}
    for r in rows:
        base = ref[(r["dtype"], r["batch_size"])]
        r["ideal_speedup"] = base["macs"] / r["macs"]
        r["measured_speedup"] = r["images_per_s"] / base["images_per_s"]
    return rows
