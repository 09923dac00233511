"""Latency on the device the model will run on: a per-unit latency model fitted to timed pruned variants, so a
pruning target can be a measured latency instead of a MACs fraction.

Timings run on any deployment backend of :data:`studio.backends.BACKENDS` (PyTorch eager, ``torch.compile``,
ONNX Runtime) through the studio's one measuring protocol (:func:`studio.bench.measure_throughput`: warm-up,
device synchronisation, median of repeats).

The latency model: MACs are a loose proxy (a 17-token model at batch 1 is dominated by per-layer overheads),
so the studio times a small designed set of variants of the loaded model — per block a random number of kept
heads and MLP neurons, some variants with blocks removed — and fits, by least squares,

    latency ≈ c0 + c_block · blocks + c_head · Σ heads + c_mlp · Σ MLP neurons + c_macs · MACs

(non-negative coefficients). Its median absolute error on held-out variants is reported with it; it is
cached per (architecture, input size, device, dtype, batch, backend, threads) under the studio's cache folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import BACKENDS
from .bench import measure_throughput, paired_speedup
from .costs import ArchFacts, arch_facts, plan_cost
from .errors import StudioError
from .events import Callback, CancelToken, check, progress
from .plan import BaseArch, BlockPlan, PrunePlan
from .runs import write_json
from .surgery import apply_plan

Timer = Callable[[torch.nn.Module, Sequence[int], int], float]  # (model, input_size, batch) -> ms


def time_ms(
    model: torch.nn.Module,
    input_size: Sequence[int],
    batch: int,
    *,
    backend: str = "eager",
    dtype: str = "float32",
    warmup: int = 5,
    repeats: int = 20,
) -> float:
    """Median wall time (ms) of one pass of ``batch`` images through ``model`` on ``backend`` in ``dtype``
    (autocast; the studio's one measuring protocol, :func:`studio.bench.measure_throughput`)."""
    return measure_throughput(
        model,
        input_size,
        batch_size=batch,
        warmup=warmup,
        repeats=repeats,
        backend=backend,
        dtype=None if dtype == "float32" else getattr(torch, dtype),
    ).latency_ms


def measured_fraction(
    dense: torch.nn.Module,
    pruned: torch.nn.Module,
    input_size: Sequence[int],
    batch: int,
    *,
    backend: str = "eager",
    dtype: str = "float32",
    warmup: int = 5,
    repeats: int = 30,
) -> float:
    """The pruned model's latency as a fraction of the dense one's, the two timed in interleaved pairs (the
    median of pruned / dense over ``repeats`` pairs), so a change of load on the machine hits both alike."""
    return 1.0 / paired_speedup(
        dense,
        pruned,
        input_size,
        batch,
        warmup,
        repeats,
        dtype=None if dtype == "float32" else getattr(torch, dtype),
        backend=backend,
    )


# ---------------------------------------------------------------------------------------- latency model
FEATURES = ("const", "blocks", "heads", "mlp", "macs")


def features(plan: PrunePlan, facts: ArchFacts | None = None) -> list[float]:
    """The latency model's inputs of one plan (see the module doc); MACs in GMACs."""
    base = plan.base
    heads = sum(base.num_heads[b.index] if b.heads is None else len(b.heads) for b in plan.blocks)
    mlp = sum(base.mlp_hidden[b.index] if b.mlp is None else len(b.mlp) for b in plan.blocks)
    macs = plan_cost(plan, facts or arch_facts(base))["macs"] / 1e9
    return [1.0, float(len(plan.blocks)), float(heads), float(mlp), macs]


@dataclass(frozen=True)
class LatencyModel:
    """A fitted per-unit latency model of one (architecture, device, dtype, batch, backend)."""

    key: str
    coef: tuple[float, ...]
    dense_ms: float  # measured
    fit_error: float  # median absolute relative error on held-out variants
    variants: int
    batch: int
    backend: str
    seconds: float

    def predict(self, plan: PrunePlan, facts: ArchFacts | None = None) -> float:
        return float(np.dot(self.coef, features(plan, facts)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyModel:
        return cls(**{**d, "coef": tuple(d["coef"])})


def fit(rows: Sequence[tuple[Sequence[float], float]]) -> tuple[float, ...]:
    """Non-negative least squares of latency on the features (projected: negative terms dropped, refit)."""
    X = np.array([r[0] for r in rows], dtype=np.float64)
    y = np.array([r[1] for r in rows], dtype=np.float64)
    active = list(range(X.shape[1]))
    for _ in range(X.shape[1]):
        c, *_ = np.linalg.lstsq(X[:, active], y, rcond=None)
        if (c >= 0).all():
            break
        active = [a for a, v in zip(active, c) if v >= 0] or [0]
    coef = np.zeros(X.shape[1])
    coef[active] = np.clip(np.linalg.lstsq(X[:, active], y, rcond=None)[0], 0, None)
    return tuple(float(v) for v in coef)


def design(base: BaseArch, n: int, seed: int = 0) -> list[PrunePlan]:
    """``n`` structurally varied plans: per block a random count of kept heads and MLP neurons (first units
    kept: latency depends on widths, not on which units), a quarter of them with trailing blocks removed."""
    rng = random.Random(seed)
    plans = []
    for k in range(n):
        depth = base.depth if k % 4 else rng.randint(max(1, base.depth // 3), base.depth)
        blocks = []
        for i in range(depth):
            h = rng.randint(1, base.num_heads[i])
            m = rng.randint(max(1, base.mlp_hidden[i] // 8), base.mlp_hidden[i])
            blocks.append(BlockPlan(i, heads=tuple(range(h)), mlp=tuple(range(m))))
        plans.append(PrunePlan(base=base, blocks=tuple(blocks), method="latency-design").validate())
    return plans


def cache_key(
    base: BaseArch, input_size: Sequence[int], device: torch.device, dtype: str, batch: int, backend: str
) -> str:
    ident = json.dumps(
        [base.to_dict(), list(input_size), str(device), dtype, batch, backend, torch.get_num_threads()],
        sort_keys=True,
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _cache_file(key: str) -> Path:
    root = Path(os.environ.get("STUDIO_CACHE", Path.home() / ".cache" / "pruning-studio"))
    return root / "latency" / f"{key}.json"


def estimate_seconds(dense_ms: float, variants: int, *, warmup: int, repeats: int) -> float:
    """How long profiling takes: each variant (about half the dense cost on average) warmed and timed in
    pairs with the dense model."""
    return (variants + 1) * (warmup + repeats) * dense_ms * 1.6 / 1e3


def profile_latency(
    model: torch.nn.Module,
    base: BaseArch,
    input_size: Sequence[int],
    *,
    batch: int = 1,
    backend: str = "eager",
    dtype: str = "float32",
    variants: int = 24,
    held_out: float = 0.25,
    warmup: int = 3,
    repeats: int = 10,
    seed: int = 0,
    timer: Timer | None = None,
    use_cache: bool = True,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> LatencyModel:
    """Time ``variants`` pruned copies of ``model`` on its device and fit the latency model (cached).

    ``timer`` replaces the clock (tests pass a known cost function); the model is never changed.
    """
    if not BACKENDS.get(backend).supports(dtype):
        raise StudioError(f"The {backend} backend cannot time {dtype}: use float32 or the eager backend.")
    if variants < 8:
        raise StudioError(
            f"Give at least 8 latency variants to fit {len(FEATURES)} coefficients, got {variants}."
        )
    device = next(model.parameters()).device
    key = cache_key(base, input_size, device, dtype, batch, backend)
    f = _cache_file(key)
    if use_cache and timer is None and f.exists():
        return LatencyModel.from_dict(json.loads(f.read_text()))

    def clock(m: torch.nn.Module) -> float:
        return time_ms(m, input_size, batch, backend=backend, dtype=dtype, warmup=warmup, repeats=repeats)

    timer_fn: Callable[[torch.nn.Module], float] = (
        (lambda m: timer(m, input_size, batch)) if timer is not None else clock
    )
    t0 = time.time()
    facts = arch_facts(base)
    plans = design(base, variants, seed)
    rows = []
    dense = PrunePlan.dense(base)
    reference = copy.deepcopy(model).eval()
    dense_ms = timer_fn(reference)
    rows.append((features(dense, facts), dense_ms))
    for i, p in enumerate(plans):
        check(cancel)
        variant = apply_plan(copy.deepcopy(model), p).eval()
        if timer is not None:
            ms = timer_fn(variant)
        else:  # each variant against the dense model in interleaved pairs: a load change hits both alike
            ms = dense_ms * measured_fraction(
                reference,
                variant,
                input_size,
                batch,
                backend=backend,
                dtype=dtype,
                warmup=warmup,
                repeats=repeats,
            )
        rows.append((features(p, facts), ms))
        progress(callbacks, "latency variants", i + 1, len(plans))
    n_test = max(2, int(len(rows) * held_out))
    train, test = rows[:-n_test], rows[-n_test:]
    coef = fit(train)
    err = statistics.median(abs(float(np.dot(coef, x)) / y - 1) for x, y in test)
    out = LatencyModel(
        key=key,
        coef=fit(rows),  # the final model uses every variant; its error is the held-out one
        dense_ms=dense_ms,
        fit_error=float(err),
        variants=len(plans),
        batch=batch,
        backend=backend,
        seconds=time.time() - t0,
    )
    if timer is None:
        write_json(f, out.to_dict())
    return out


# --------------------------------------------------------------------------------- hardware-friendly widths
MULTIPLES = (1, 8, 16, 32)


NOISE = (
    0.02  # CPU timings repeat within about 2 %: a rounded width within that of the uneven one costs nothing
)


def _uneven(width: int) -> int:
    """An odd width near ``width`` (no multiple above 1 divides it): one above a multiple of 32 where the width
    allows, so rounding it up to 8, 16 and 32 gives three different widths."""
    return (width // 32) * 32 + 1 if width >= 32 else width | 1


def _widths_file(
    base: BaseArch,
    input_size: Sequence[int],
    device: torch.device,
    batch: int,
    backend: str,
    keep: float,
    multiples: Sequence[int],
) -> Path:
    key = cache_key(base, input_size, device, "float32", batch, backend)
    return _cache_file(f"widths-{key}-{keep}-{'-'.join(str(m) for m in multiples)}")


def cached_width_payoff(
    base: BaseArch,
    input_size: Sequence[int],
    device: torch.device,
    *,
    batch: int = 1,
    backend: str = "eager",
    keep: float = 0.5,
    multiples: Sequence[int] = MULTIPLES,
) -> list[dict[str, Any]] | None:
    """The rows :func:`width_payoff` measured earlier for this setting, or None (a reload shows them again)."""
    f = _widths_file(base, input_size, device, batch, backend, keep, multiples)
    try:
        return json.loads(f.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return None


def width_payoff(
    model: torch.nn.Module,
    base: BaseArch,
    input_size: Sequence[int],
    *,
    batch: int = 1,
    backend: str = "eager",
    keep: float = 0.5,
    multiples: Sequence[int] = MULTIPLES,
    warmup: int = 3,
    repeats: int = 10,
    timer: Timer | None = None,
    use_cache: bool = True,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> list[dict[str, Any]]:
    """Where rounding widths pays off on this device, measured rather than assumed.

    For each unit kind (MLP neurons, head dims) and each multiple ``m``, every block keeps about ``keep`` of
    that unit, starting from an odd width (one above a multiple of 32) rounded *up* to ``m`` (so a rounded
    model does more arithmetic). A row is ``{unit, multiple, width, macs, ms, ms_vs_uneven, pays}``: rounding
    pays where the rounded model is no slower than the uneven one (within :data:`NOISE`) despite its extra MACs.
    Cached like the latency model.
    """
    BACKENDS.get(backend)
    if not 0.0 < keep < 1.0:
        raise StudioError(f"keep must be a fraction in (0, 1), got {keep}.")
    f = _widths_file(base, input_size, next(model.parameters()).device, batch, backend, keep, multiples)
    if use_cache and timer is None and f.exists():
        return json.loads(f.read_text())["rows"]

    def clock(m: torch.nn.Module) -> float:
        if timer is not None:
            return timer(m, input_size, batch)
        return time_ms(m, input_size, batch, backend=backend, warmup=warmup, repeats=repeats)

    facts = arch_facts(base)
    units = {
        "mlp": lambda i, w: BlockPlan(i, mlp=tuple(range(w))),
        "head_dim": lambda i, w: BlockPlan(i, head_dims=tuple(range(w))),
    }
    full = {"mlp": list(base.mlp_hidden), "head_dim": [base.head_dim] * base.depth}
    rows: list[dict[str, Any]] = []
    total, done = len(units) * len(multiples), 0
    ref = min(multiples)
    for unit, block in units.items():
        uneven: torch.nn.Module | None = None
        uneven_ms = 0.0
        for m in sorted(multiples):
            check(cancel)
            widths = [min(n, -(-_uneven(int(n * keep)) // m) * m) for n in full[unit]]
            plan = PrunePlan(
                base, tuple(block(i, w) for i, w in enumerate(widths)), method="widths"
            ).validate()
            variant = apply_plan(copy.deepcopy(model), plan).eval()
            if m == ref:
                uneven, uneven_ms = variant, clock(variant)
                ms = uneven_ms
            elif timer is not None:
                ms = clock(variant)
            else:  # against the uneven width in interleaved pairs: differences of a few % are the point
                assert uneven is not None
                ms = uneven_ms * measured_fraction(
                    uneven, variant, input_size, batch, backend=backend, warmup=warmup, repeats=3 * repeats
                )
            rows.append(
                {
                    "unit": unit,
                    "multiple": int(m),
                    "width": int(widths[0]),
                    "macs": int(plan_cost(plan, facts)["macs"]),
                    "ms": float(ms),
                }
            )
            done += 1
            progress(callbacks, "width timings", done, total)
    for r in rows:
        uneven = next(u for u in rows if u["unit"] == r["unit"] and u["multiple"] == min(multiples))
        r["ms_vs_uneven"] = r["ms"] / uneven["ms"]
        r["pays"] = r["multiple"] > min(multiples) and r["ms"] <= uneven["ms"] * (1 + NOISE)
    if timer is None:
        write_json(f, {"rows": rows, "batch": batch, "backend": backend, "keep": keep})
    return rows
