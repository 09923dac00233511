"""Baseline structured pruning: ``random``, ``magnitude`` (L1/L2 of grouped weights) and ``taylor`` (|w·g|).

Each scores heads / head dims / MLP neurons / embedding channels (:mod:`studio.analysis.groups`), then keeps the
top units at a uniform or global ratio (:mod:`studio.prune.select`), or at the ratio that lands on a MACs
budget (:mod:`studio.prune.target`). Taylor follows Molchanov et al. 2019 / torch-pruning's
``TaylorImportance``: first-order estimate ``Σ_group |w ⊙ ḡ|`` with ``ḡ`` the gradient of the cross-entropy
averaged over the calibration batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..analysis.criteria import UnitScores
from ..analysis.groups import unit_scores
from ..costs import arch_facts
from ..errors import StudioError
from ..eva import head_dim_pairs
from ..events import Callback, CancelToken, emit
from ..plan import PrunePlan
from ..surgery import check_supported
from . import LATENCY, MACS, METHODS, RATIO, Method, Option, PruneRequest
from .select import MODES, parse_scopes, plan_from_scores
from .target import TOLERANCE, solve_staged

SCOPE = Option("scope", str, "heads,mlp", "units to prune, comma-separated: heads, head_dims, mlp, embed")
MODE = Option(
    "mode",
    str,
    "uniform",
    "uniform: same ratio in every block; global: rank units across blocks",
    choices=MODES,
)
NORM = Option("norm", int, 2, "magnitude criterion: L1 or L2 norm of the grouped weights", choices=(1, 2))
# Scope groups from coarsest to finest MAC steps: the target solver freezes them in this order.
_STAGES = (("heads", "head_dims"), ("embed",), ("mlp",))


def random_scores(req: PruneRequest, scopes: Sequence[str]) -> UnitScores:
    """Seeded uniform scores: a random structured baseline."""
    gen = torch.Generator().manual_seed(req.seed)
    zeros = {n: torch.zeros_like(p, device="cpu") for n, p in req.loaded.model.named_parameters()}
    shape = unit_scores(req.loaded.model, zeros, scopes)
    return shape.map(lambda t: torch.rand(t.shape, generator=gen, dtype=torch.float64))


def magnitude_scores(req: PruneRequest, scopes: Sequence[str], p: int) -> UnitScores:
    """L1 (``Σ|w|``) or L2 (``sqrt Σ w²``) norm of each unit's grouped weights."""
    elem = {
        n: w.detach().abs() if p == 1 else w.detach().pow(2) for n, w in req.loaded.model.named_parameters()
    }
    s = unit_scores(req.loaded.model, elem, scopes)
    return s if p == 1 else s.map(torch.sqrt)


def taylor_scores(
    req: PruneRequest,
    scopes: Sequence[str],
    *,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> UnitScores:
    """``Σ_group |w ⊙ g|`` with the gradients summed over the calibration batches (on a copy of the model, by
    the same accumulation Isomorphic and the Importance analysis use; a sum ranks exactly as the mean)."""
    grads = req.gradients(callbacks=callbacks, cancel=cancel)
    model = req.loaded.model
    elem = {
        n: (p.detach() * grads[n].to(p.device)).abs() if n in grads else torch.zeros_like(p)
        for n, p in model.named_parameters()
    }
    return unit_scores(model, elem, scopes)


def plan_baseline(
    req: PruneRequest,
    scores: UnitScores,
    scopes: Sequence[str],
    *,
    method: str,
    callbacks: Sequence[Callback] = (),
) -> PrunePlan:
    """Keep the top units at ``ratio``, or at the ratio that lands on ``target_macs`` (±2%)."""
    params = {**req.params, "seed": req.seed}
    base = req.loaded.base
    mode, round_to = params.get("mode", "uniform"), int(params.get("round_to") or 1)
    if round_to < 1:
        raise StudioError(f"--round-to must be a positive integer, got {round_to}.")

    groups = [g for g in _STAGES if any(s in g for s in scopes)]
    tied = head_dim_pairs(req.loaded.model)  # EVA-02: rotary pairs are kept or dropped together

    def build(ratios: Sequence[float]) -> PrunePlan:
        by_scope = {s: r for g, r in zip(groups, ratios) for s in g if s in scopes}
        return plan_from_scores(
            base, scores, by_scope, mode=mode, round_to=round_to, method=method, params=params, tied_dims=tied
        )

    target = req.target()
    if target is not None:
        sol, ratios = solve_staged(build, len(groups), target, facts=arch_facts(base), cost=req.cost)
        achieved: dict[str, Any] = {
            "ratios": {s: round(r, 6) for g, r in zip(groups, ratios) for s in g if s in scopes},
            **sol.record(float(target)),
        }
        if achieved["target_missed"]:
            emit(
                callbacks,
                "log",
                message=f"warning: closest plan keeps {sol.fraction:.1%} of the MACs, not "
                f"{float(target):.1%} (±{TOLERANCE:.0%}); add scopes or lower --round-to for finer steps.",
            )
        return sol.plan.with_(params={**params, "solved": achieved})
    ratio = params.get("ratio")
    if ratio is None:
        raise StudioError(
            f"Method '{method}' needs a budget: give --target-macs F (fraction of MACs to keep) or "
            "--ratio R (fraction of units to remove)."
        )
    return build([float(ratio)] * len(groups))


def _scopes(req: PruneRequest) -> tuple[str, ...]:
    check_supported(req.loaded.model)
    scopes = parse_scopes(str(req.params.get("scope") or SCOPE.default))
    return scopes


def prune_random(
    req: PruneRequest, *, callbacks: Sequence[Callback] = (), cancel: CancelToken | None = None
) -> PrunePlan:
    scopes = _scopes(req)
    return plan_baseline(req, random_scores(req, scopes), scopes, method="random", callbacks=callbacks)


def prune_magnitude(
    req: PruneRequest, *, callbacks: Sequence[Callback] = (), cancel: CancelToken | None = None
) -> PrunePlan:
    scopes = _scopes(req)
    scores = magnitude_scores(req, scopes, int(req.params.get("norm") or 2))
    return plan_baseline(req, scores, scopes, method="magnitude", callbacks=callbacks)


def prune_taylor(
    req: PruneRequest, *, callbacks: Sequence[Callback] = (), cancel: CancelToken | None = None
) -> PrunePlan:
    scopes = _scopes(req)
    scores = taylor_scores(req, scopes, callbacks=callbacks, cancel=cancel)
    return plan_baseline(req, scores, scopes, method="taylor", callbacks=callbacks)


METHODS.add(
    "random",
    Method(
        "random",
        prune_random,
        "random structured pruning (seeded baseline)",
        options=(SCOPE, MODE),
        budgets=(MACS, RATIO, LATENCY),
    ),
)
METHODS.add(
    "magnitude",
    Method(
        "magnitude",
        prune_magnitude,
        "L1/L2 norm of each unit's grouped weights",
        options=(SCOPE, MODE, NORM),
        budgets=(MACS, RATIO, LATENCY),
    ),
)
METHODS.add(
    "taylor",
    Method(
        "taylor",
        prune_taylor,
        "first-order Taylor |w·g| over calibration batches",
        options=(SCOPE, MODE),
        needs_data=True,
        budgets=(MACS, RATIO, LATENCY),
    ),
)
