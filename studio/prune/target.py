"""Solve for a pruning ratio that lands on a MACs budget (``--target-macs``).

MACs come from :func:`studio.costs.plan_cost`, which equals the dispatcher count of the pruned model exactly, so
the search needs no model: bisection on the ratio (MACs are non-increasing in it), keeping the plan closest to
the target. Removing whole heads (or rounding widths to multiples of 8) changes MACs in steps that can jump over
the target; :func:`solve_staged` then freezes the coarse scopes just above the target and bisects the finer ones
alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..costs import ArchFacts, arch_facts, plan_cost
from ..errors import StudioError
from ..plan import PrunePlan

TOLERANCE = 0.02  # relative: 0.5 asked -> 0.49..0.51 of the base MACs


@dataclass(frozen=True)
class Solution:
    """The plan found, its ratio, the MACs fraction it keeps, and the bracket ``lo`` (≥ target) / ``hi``."""

    plan: PrunePlan
    ratio: float
    fraction: float
    lo: float
    hi: float

    def within(self, target: float, tol: float = TOLERANCE) -> bool:
        return abs(self.fraction / target - 1.0) <= tol

    def record(self, target: float, tol: float = TOLERANCE) -> dict[str, Any]:
        """What a plan's ``params.solved`` records of this solution (see :func:`target_record`)."""
        return target_record(target, self.fraction, missed=not self.within(target, tol), tol=tol)


def target_record(target: float, fraction: float, *, missed: bool, tol: float = TOLERANCE) -> dict[str, Any]:
    """The MACs target a plan was solved for, what it keeps and ``target_missed``: recorded by every method that
    solves a target, so a miss is in ``plan.json``/``results.json`` and the CLI and pages can say so (not only
    a log line)."""
    return {
        "target_macs": round(float(target), 6),
        "macs_fraction": round(float(fraction), 6),
        "tolerance": tol,
        "target_missed": bool(missed),
    }


def missed_message(solved: dict[str, Any] | None) -> str | None:
    """One sentence when a plan's recorded target was missed (None when met or when no target was solved)."""
    if not solved or not solved.get("target_missed"):
        return None
    return (
        f"target missed: the closest plan keeps {solved['macs_fraction']:.1%} of the MACs, not "
        f"{solved['target_macs']:.1%} (±{solved.get('tolerance', TOLERANCE):.0%})"
    )


def macs_fraction(plan: PrunePlan, facts: ArchFacts, base_macs: int | None = None) -> float:
    base_macs = base_macs or plan_cost(PrunePlan.dense(plan.base), facts)["macs"]
    return plan_cost(plan, facts)["macs"] / base_macs


def solve_ratio(
    build: Callable[[float], PrunePlan],
    target: float,
    *,
    facts: ArchFacts | None = None,
    lo: float = 0.0,
    hi: float = 1.0,
    tol: float = TOLERANCE,
    iters: int = 40,
    cost: Callable[[PrunePlan], float] | None = None,
) -> Solution:
    """Bisect ``r`` in [lo, hi] so that ``build(r)`` keeps ``target`` of the base MACs (closest plan wins).

    ``cost``: another measure of a plan as a fraction of the base's (a latency model's prediction, see
    :func:`studio.prune.latency_cost`), non-increasing in ``r`` like the MACs. Raises :class:`StudioError` if
    even ``build(hi)`` keeps more than ``target·(1+tol)``.
    """
    if not 0.0 < target <= 1.0:
        raise StudioError(f"--target-macs must be a fraction in (0, 1], got {target}.")
    first = build(lo)
    facts = facts or arch_facts(first.base)
    base_macs = plan_cost(PrunePlan.dense(first.base), facts)["macs"]

    def frac(p: PrunePlan) -> float:
        return cost(p) if cost is not None else plan_cost(p, facts)["macs"] / base_macs

    f_lo = frac(first)
    if f_lo <= target:
        return Solution(first, lo, f_lo, lo, lo)
    last = build(hi)
    f_hi = frac(last)
    if f_hi > target * (1 + tol):
        if cost is not None:
            raise StudioError(
                f"The smallest model these scopes allow is predicted at {f_hi:.1%} of the dense latency, above "
                f"the target {target:.1%}: on this device and batch the latency hardly depends on these widths "
                "(per-layer overheads dominate). Ask for a larger --target-latency, a larger --latency-batch, "
                "or remove blocks (--method sls)."
            )
        raise StudioError(
            f"The smallest model these scopes allow keeps {f_hi:.1%} of the MACs, above the target "
            f"{target:.1%}. Prune more scopes (e.g. --scope heads,mlp,embed) or ask for a larger "
            "--target-macs."
        )
    best = min(((first, lo, f_lo), (last, hi, f_hi)), key=lambda t: abs(t[2] / target - 1))
    a, b = lo, hi
    for _ in range(iters):
        mid = (a + b) / 2
        p = build(mid)
        f = frac(p)
        if abs(f / target - 1) < abs(best[2] / target - 1):
            best = (p, mid, f)
        if f >= target:
            a = mid
        else:
            b = mid
        if abs(best[2] / target - 1) <= tol / 4 or b - a < 1e-6:
            break
    return Solution(best[0], best[1], best[2], a, b)


def solve_staged(
    build: Callable[[Sequence[float]], PrunePlan],
    stages: int,
    target: float,
    *,
    facts: ArchFacts | None = None,
    tol: float = TOLERANCE,
    cost: Callable[[PrunePlan], float] | None = None,
) -> tuple[Solution, list[float]]:
    """Solve ``build([r_0, ..., r_{stages-1}])`` (one ratio per group of scopes, coarsest first) for ``target``.

    Stage 0 shares one ratio across all groups. While the closest plan misses by more than ``tol/4``, the next
    stage freezes the coarsest free group at the bracket's low side (MACs still ≥ target) and bisects the rest
    above it, so whole-head or rounded-width steps cannot jump over the target. The closest plan wins.
    Returns it and the ratio of each group.
    """
    fixed: list[float] = []
    best: tuple[Solution, list[float]] | None = None
    for k in range(stages):
        lo = fixed[-1] if fixed else 0.0
        frozen = list(fixed)
        try:
            sol = solve_ratio(
                lambda r, f=frozen, k=k: build(f + [r] * (stages - k)),
                target,
                facts=facts,
                lo=lo,
                tol=tol,
                cost=cost,
            )
        except StudioError:
            if best is None:
                raise
            break
        ratios = frozen + [sol.ratio] * (stages - k)
        if best is None or abs(sol.fraction / target - 1) < abs(best[0].fraction / target - 1):
            best = (sol, ratios)
        if best[0].within(target, tol / 4):
            break
        fixed.append(sol.lo)
    assert best is not None
    return best
