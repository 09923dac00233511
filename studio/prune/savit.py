"""SAViT: structure-aware ViT pruning via collaborative optimisation (Zheng et al., NeurIPS 2022).

The method, as re-implemented here from the paper's description and its public code (research note
``methods_savit_iso_spa.md`` Part 1):

1. **Gates.** A multiplicative gate, all ones, on three kinds of structure of a frozen copy of the model:
   attention heads (on each head's ``attn @ v`` output, i.e. the input of ``proj``), MLP hidden neurons (``fc1``
   output, *before* GELU) and the embedding / residual channels — ONE gate vector shared by the whole residual
   stream, applied after the position embedding and after every residual sum (``1 + 2L`` places).
2. **First-order scores ("taylor2", Molchanov et al. 2019).** For each calibration batch the gradient of the
   batch loss w.r.t. each gate, squared: ``s_u = (g_u · ∂L/∂g_u)² = (∂L/∂g_u)²``; averaged over batches.
3. **Second-order interaction.** A 3×3 matrix ``Ĥ`` of averaged Hessian couplings between the component types,
   from Hessian-vector products on the gates: per batch a random block ``ℓ₁`` and, per type pair ``(i, j)``, a
   random ``ℓ₂ ≤ ℓ₁``; ``Ĥ[i,j] += Σ ∂/∂g_j(∂L/∂g_i(ℓ₁)·1) / Z[i,j]`` with ``Z = s sᵀ``, ``s = (a, b, c)``,
   ``a`` = attention width of a block (the paper's ``D``: "each head contains D features"), ``b`` = MLP width,
   ``c = D·L·hessian_embed``. HVPs need double backward, so attention runs on timm's explicit math path
   (:func:`studio.bench.unfused_attention`) and in float32 (the reference disables AMP: it gives NaN scores).
4. **Allocation under a FLOPs budget.** Choose how many heads / neurons / channels to remove by minimising the
   quadratic loss model ``pᵀ Ĥ p`` (upper triangle, as the reference) of the pruned fractions ``p`` subject to
   the cost target. The paper searches the two free counts (heads, residual channels) with a small evolution
   strategy and finds the MLP count by binary search. **Here the ES is replaced by an exact, deterministic grid
   search over every (#heads, #channels) pair** with the same vectorised binary search on the MLP count and the
   same objective: with two integer variables the grid is small (≤ 10⁵ points for DeiT-B) and returns the true
   optimum of the objective instead of a stochastic approximation. Candidates whose cost misses the target by
   more than ``flops_tol`` are dropped (the reference keeps candidates that overshoot when heads and channels
   alone exceed the target).
5. **Cost model.** The paper's ``F(r_a, r_b, r_g) = 2·N·D·L·(N·r_a + 2·r_a·r_g·D + 4·r_b·r_g·D)`` written with
   the model's actual N, D, L, head dim and MLP width, plus the patch-embedding and classifier MACs (both
   linear in ``r_g``), so the target means what ``--target-macs`` means for every method: the fraction of the
   total MACs kept. It equals :func:`studio.costs.plan_cost` exactly (tested).
6. **Which units.** Inside each type, units of all blocks are pooled and the lowest scores removed. Protection
   keeps the top 5 % (at least one) of every layer's units by setting their scores to +inf — **the intent of the
   reference's ``protect`` step, whose implementation scrambles indices** (it stores the kept scores in
   ``argpartition`` order and then applies positional indices to the gate vector, so which units are pruned
   inside a layer is mostly wrong). At least one unit per layer is always protected, so no block is emptied.

The result is a :class:`~studio.plan.PrunePlan` (kept heads, MLP neurons, embedding channels); the shared surgery
builds the smaller model. Masked (gates at 0) and physically pruned logits agree for heads and neurons; for the
embedding they differ by design (gated LayerNorms still normalise over all channels), which recovery absorbs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..analysis.criteria import UnitScores
from ..analysis.gate_scores import SavitScores, savit_scores
from ..costs import ArchFacts, arch_facts, plan_cost
from ..errors import StudioError
from ..events import Callback, CancelToken, emit
from ..plan import BaseArch, BlockPlan, PrunePlan
from . import DEFAULT_CALIB_BATCHES, LATENCY, MACS, METHODS, Method, Option, PruneRequest
from .select import removed_score
from .target import target_record


def protect(scores: Sequence[float], fraction: float) -> np.ndarray:
    """Scores of one layer with its top ``max(int(fraction·n), 1)`` set to +inf (the reference's intent).

    The reference removes the top 5 % from each layer's score array with ``argpartition`` but keeps the result in
    partition order, then indexes gates positionally: right counts, scrambled units. Here the protected units
    are exactly the highest-scored ones; at least one unit per layer is protected so no layer is emptied.
    """
    s = np.asarray(scores, dtype=np.float64).copy()
    k = min(len(s), max(int(fraction * len(s)), 1))
    top = np.argsort(-s, kind="stable")[:k]
    s[top] = np.inf
    return s


# -------------------------------------------------------------------------------------------- allocation
@dataclass(frozen=True)
class CostModel:
    """Exact MACs of a SAViT structure as an affine function of the pooled kept counts.

    ``macs = N·E·(4·d·H + 2·M) + 2·N²·d·H + E·(patches·patch_pixels + heads_out·C) + fixed`` (``3·M`` for a GLU,
    whose neurons own two input rows) with ``E`` kept
    embedding channels, ``H`` kept heads and ``M`` kept MLP neurons summed over blocks, ``N`` tokens, ``d`` head
    dim — the paper's ``F`` generalised (its ``F`` is the first two terms), equal to
    :func:`studio.costs.plan_cost`. An attention-pool head adds its cost per embedding channel to the stem's and
    its latent query's to ``fixed``; a relative position bias MLP (studio.relpos) adds ``head_extra`` per kept
    head and its first layer to ``fixed``.
    """

    tokens: int
    head_dim: int
    stem_per_channel: int
    heads_total: int
    mlp_total: int
    embed: int
    fixed: int = 0
    mlp_rows: int = 2  # linear rows + columns per MLP neuron: fc1 row and fc2 column, 3 for a GLU
    # MACs per kept head that do not depend on E (a relative position bias MLP's output row)
    head_extra: int = 0

    @classmethod
    def of(cls, base: BaseArch, facts: ArchFacts) -> CostModel:
        return cls(
            tokens=facts.tokens,
            head_dim=base.head_dim,
            stem_per_channel=facts.patches * facts.patch_pixels
            + facts.heads_out * base.num_classes
            + facts.pool_linear_pc,
            heads_total=sum(base.num_heads),
            mlp_total=sum(base.mlp_hidden),
            embed=base.embed_dim,
            fixed=facts.pool_linear_fixed + facts.pool_attention + base.depth * facts.bias_macs_fixed,
            mlp_rows=facts.mlp_in_copies + 1,
            head_extra=facts.bias_macs_ph,
        )

    def blocks(self, heads: Any, mlp: Any, embed: Any) -> Any:
        """The paper's ``F``: MACs of the transformer blocks only (numpy broadcasting)."""
        N, d = self.tokens, self.head_dim
        return N * embed * (4 * d * heads + self.mlp_rows * mlp) + 2 * N * N * d * heads

    def total(self, heads: Any, mlp: Any, embed: Any) -> Any:
        return (
            self.blocks(heads, mlp, embed)
            + embed * self.stem_per_channel
            + self.head_extra * heads
            + self.fixed
        )

    @property
    def base_total(self) -> int:
        return int(self.total(self.heads_total, self.mlp_total, self.embed))


@dataclass(frozen=True)
class Allocation:
    """How many units of each type to remove, the objective it reaches and the cost it lands on."""

    heads: int
    mlp: int
    embed: int
    fractions: tuple[float, float, float]
    objective: float
    macs: int
    macs_fraction: float
    block_flops_reduction: float  # 1 - F/F0 in the paper's block-only model
    candidates: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "heads_pruned": self.heads,
            "mlp_pruned": self.mlp,
            "embed_pruned": self.embed,
            "fractions": list(self.fractions),
            "objective": self.objective,
            "macs": self.macs,
            "macs_fraction": self.macs_fraction,
            "block_flops_reduction": self.block_flops_reduction,
            "candidates": self.candidates,
        }


def objective(hessian: Sequence[Sequence[float]], pa: Any, pb: Any, pc: Any) -> Any:
    """SAViT's second-order loss model of the pruned fractions (upper triangle of Ĥ, as the reference)."""
    H = hessian
    return (
        H[0][0] * pa * pa
        + H[1][1] * pb * pb
        + H[2][2] * pc * pc
        + 2 * H[0][1] * pa * pb
        + 2 * H[0][2] * pa * pc
        + 2 * H[1][2] * pb * pc
    )


def allocate(
    cost: CostModel,
    hessian: Sequence[Sequence[float]],
    target: float,
    *,
    max_pruned: tuple[int, int, int],
    tol: float = 1e-3,
    round_to: int = 1,
) -> Allocation:
    """Exact grid search over (#heads, #embedding channels) removed, MLP count by binary search.

    Args:
        target: fraction of the total MACs to keep.
        max_pruned: most units of each type that may go (after protection).
        tol: the kept fraction must lie within ``target ± tol``.
        round_to: the kept embedding width is a multiple of this (or the full width).
    """
    if not 0.0 < target < 1.0:
        raise StudioError(f"--target-macs for SAViT must be a fraction in (0, 1), got {target}.")
    max_a, max_b, max_c = max_pruned
    Ht, Mt, D = cost.heads_total, cost.mlp_total, cost.embed
    base = cost.base_total
    budget = target * base
    na = np.arange(0, max_a + 1, dtype=np.int64)[:, None]
    nc_all = np.arange(0, max_c + 1, dtype=np.int64)
    if round_to > 1:
        nc_all = nc_all[((D - nc_all) % round_to == 0) | (nc_all == 0)]
    nc = nc_all[None, :]
    shape = (len(na), len(nc_all))

    def total(nb: np.ndarray) -> np.ndarray:
        return cost.total(Ht - na, Mt - nb, D - nc)

    lo = np.zeros(shape, dtype=np.int64)
    hi = np.full(shape, max_b, dtype=np.int64)
    done0 = total(lo) <= budget  # heads + channels alone reach the budget: no MLP neuron needs to go
    reach = total(hi) <= budget
    # smallest nb with cost <= budget, by bisection (cost strictly decreases in nb while E > 0)
    while True:
        open_ = (hi - lo > 1) & reach & ~done0
        if not open_.any():
            break
        mid = (lo + hi) // 2
        ok = total(mid) <= budget
        hi = np.where(open_ & ok, mid, hi)
        lo = np.where(open_ & ~ok, mid, lo)
    nb = np.where(done0, 0, hi)
    frac = total(nb) / base
    feasible = reach & (np.abs(frac - target) <= tol)
    if not feasible.any():
        smallest = float(cost.total(Ht - max_a, Mt - max_b, D - nc_all.max()) / base)
        raise StudioError(
            f"SAViT cannot reach {target:.1%} of the MACs within ±{tol:g}: the smallest structure its protection "
            f"allows keeps {smallest:.1%}. Ask for a larger --target-macs, lower --protect, or raise --flops-tol."
        )
    pa, pb, pc = na / max(Ht, 1), nb / max(Mt, 1), nc / max(D, 1)
    obj = np.where(feasible, objective(hessian, pa, pb, pc), np.inf)
    k = int(np.argmin(obj))  # first minimum in (heads, channels) order: deterministic
    ia, ic = np.unravel_index(k, shape)
    a, b, c = int(na[ia, 0]), int(nb[ia, ic]), int(nc_all[ic])
    macs = int(cost.total(Ht - a, Mt - b, D - c))
    f0 = cost.blocks(Ht, Mt, D)
    return Allocation(
        heads=a,
        mlp=b,
        embed=c,
        fractions=(a / max(Ht, 1), b / max(Mt, 1), c / max(D, 1)),
        objective=float(obj[ia, ic]),
        macs=macs,
        macs_fraction=macs / base,
        block_flops_reduction=float(1 - cost.blocks(Ht - a, Mt - b, D - c) / f0),
        candidates=int(feasible.sum()),
    )


def _lowest(per_layer: Sequence[np.ndarray], n: int) -> list[set[int]]:
    """Remove the ``n`` lowest scores pooled over layers (ties: earlier layer, lower index): removed sets."""
    flat = np.concatenate(per_layer)
    owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(per_layer)])
    pos = np.concatenate([np.arange(len(s)) for s in per_layer])
    order = np.argsort(flat, kind="stable")[:n]
    out: list[set[int]] = [set() for _ in per_layer]
    for k in order:
        out[int(owner[k])].add(int(pos[k]))
    return out


def _kept(n: int, removed: set[int]) -> tuple[int, ...] | None:
    return None if not removed else tuple(i for i in range(n) if i not in removed)


def plan_from_allocation(
    base: BaseArch,
    scores: SavitScores,
    alloc: Allocation,
    *,
    protect_fraction: float,
    params: dict[str, Any] | None = None,
) -> PrunePlan:
    """The kept units: per type, the lowest-scored (unprotected) units of all layers pooled are removed."""
    heads = [protect(s, protect_fraction) for s in scores.heads]
    mlp = [protect(s, protect_fraction) for s in scores.mlp]
    embed = protect(scores.embed, protect_fraction)
    rh, rm = _lowest(heads, alloc.heads), _lowest(mlp, alloc.mlp)
    (re_,) = _lowest([embed], alloc.embed)
    blocks = tuple(
        BlockPlan(i, heads=_kept(base.num_heads[i], rh[i]), mlp=_kept(base.mlp_hidden[i], rm[i]))
        for i in range(base.depth)
    )
    plan = PrunePlan(
        base=base, blocks=blocks, embed=_kept(base.embed_dim, re_), method="savit", params=dict(params or {})
    )
    unit = UnitScores("taylor2", heads=scores.heads, mlp=scores.mlp, embed=scores.embed)
    return plan.with_(summary={**plan.summary, "removed_score": removed_score(unit, plan)}).validate()


def max_pruned(base: BaseArch, protect_fraction: float) -> tuple[int, int, int]:
    def free(n: int) -> int:
        return n - min(n, max(int(protect_fraction * n), 1))

    return (
        sum(free(h) for h in base.num_heads),
        sum(free(m) for m in base.mlp_hidden),
        free(base.embed_dim),
    )


def savit_plan(
    base: BaseArch,
    scores: SavitScores,
    target: float,
    *,
    facts: ArchFacts | None = None,
    protect_fraction: float = 0.05,
    tol: float = 1e-3,
    round_to: int = 1,
    params: dict[str, Any] | None = None,
) -> tuple[PrunePlan, Allocation]:
    """Allocation + unit selection: the plan SAViT keeps at ``target`` (fraction of MACs) from ``scores``."""
    if not 0.0 <= protect_fraction < 1.0:
        raise StudioError(f"--protect must be a fraction in [0, 1), got {protect_fraction}.")
    if round_to < 1:
        raise StudioError(f"--round-to must be a positive integer, got {round_to}.")
    if len(set(base.num_heads)) > 1 or len(set(base.mlp_hidden)) > 1:
        raise StudioError("SAViT's cost model assumes every block has the same heads and MLP width.")
    facts = facts or arch_facts(base)
    cost = CostModel.of(base, facts)
    alloc = allocate(
        cost,
        scores.hessian,
        target,
        max_pruned=max_pruned(base, protect_fraction),
        tol=tol,
        round_to=round_to,
    )
    plan = plan_from_allocation(
        base,
        scores,
        alloc,
        protect_fraction=protect_fraction,
        params={**(params or {}), "allocation": alloc.to_dict()},
    )
    return plan, alloc


# -------------------------------------------------------------------------------------------- the method
HESSIAN_EMBED = Option(
    "hessian_embed", float, 6.0, "SAViT: normaliser of the residual gate's curvature (reference 6)"
)
HVP_EVERY = Option("hvp_every", int, 1, "SAViT: Hessian-vector products on every k-th batch (0: none)")
HVP_BATCHES = Option(
    "hvp_batches",
    int,
    8,
    "SAViT: batches with Hessian-vector products, the Hessian's sample count (reference ~4,000; 8 is CPU-sized: "
    "read split_se); the flow draws enough calibration batches",
    low=0,
)
SPREAD_GROUPS = 20  # delete-a-group jackknife of the split: at most this many allocations more
PROTECT = Option("protect", float, 0.05, "SAViT: keep this top fraction (≥1 unit) of every layer's units")
FLOPS_TOL = Option("flops_tol", float, 1e-3, "SAViT: the kept MACs fraction must be within target ± this")


def split_spread(
    base: BaseArch,
    scores: SavitScores,
    target: float,
    *,
    protect_fraction: float = 0.05,
    tol: float = 1e-3,
    round_to: int = 1,
    groups: int = SPREAD_GROUPS,
) -> dict[str, Any] | None:
    """Standard error of the pruned fractions (heads, MLP, embedding) over the HVP batches: a delete-a-group
    jackknife (the HVP batches in ``groups`` contiguous groups, the allocation re-solved without each), so the
    user sees how much of the split is sampling noise. None with fewer than two HVP batches."""
    samples = np.asarray(scores.hessian_samples, dtype=np.float64)
    n = len(samples)
    if n < 2:
        return None
    g = min(n, groups)
    facts = arch_facts(base)
    cost = CostModel.of(base, facts)
    limits = max_pruned(base, protect_fraction)
    parts = np.array_split(np.arange(n), g)
    fr = []
    for part in parts:
        rest = np.delete(samples, part, axis=0).mean(axis=0)
        alloc = allocate(cost, rest.tolist(), target, max_pruned=limits, tol=tol, round_to=round_to)
        fr.append(alloc.fractions)
    f = np.asarray(fr)
    se = np.sqrt((g - 1) / g * ((f - f.mean(axis=0)) ** 2).sum(axis=0))
    return {"fractions_se": [float(v) for v in se], "groups": g, "hvp_batches": n}


@dataclass(frozen=True)
class SavitOutcome:
    """What :func:`run_savit` found: the plan, the allocation and the scores it came from."""

    plan: PrunePlan
    allocation: Allocation
    scores: SavitScores = field(repr=False)


def run_savit(
    req: PruneRequest, *, callbacks: Sequence[Callback] = (), cancel: CancelToken | None = None
) -> SavitOutcome:
    """Score, allocate and select for ``req`` (``target_macs`` required)."""
    p = req.params
    latency_target = p.get("target_latency") if req.cost is not None else None
    target = p.get("target_macs") if latency_target is None else 0.5  # under a latency target: solved below
    if target is None:
        raise StudioError(
            "SAViT allocates under a MACs budget: give --target-macs F (fraction of MACs to keep), or "
            "--target-latency F."
        )
    base = req.loaded.base
    scores = savit_scores(
        req.loaded.model,
        base,
        req.batches,
        hvp_every=int(p.get("hvp_every", 1)),
        hvp_batches=None if p.get("hvp_batches") is None else int(p["hvp_batches"]),
        hessian_embed=float(p.get("hessian_embed", 6.0)),
        seed=req.seed,
        micro_batch=req.micro_batch,
        callbacks=callbacks,
        cancel=cancel,
    )
    protect_fraction = float(p.get("protect", 0.05))
    tol = float(p.get("flops_tol", 1e-3))
    round_to = int(p.get("round_to") or 1)
    asked = p.get("hvp_batches")
    if asked is not None and int(p.get("hvp_every", 1)) > 0 and scores.hvp_batches < int(asked):
        emit(
            callbacks,
            "log",
            message=f"warning: SAViT's Hessian comes from {scores.hvp_batches} HVP batches, not the {asked} asked "
            "(too few calibration batches: raise --calib-batches or leave it to the method)",
        )
    if (
        latency_target is not None
    ):  # the MACs target whose allocation the latency model puts on the latency one
        assert req.cost is not None
        target = _macs_for_latency(
            base,
            scores,
            float(latency_target),
            req.cost,
            protect_fraction=protect_fraction,
            tol=tol,
            round_to=round_to,
        )
    spread = split_spread(
        base, scores, float(target), protect_fraction=protect_fraction, tol=tol, round_to=round_to
    )
    plan, alloc = savit_plan(
        base,
        scores,
        float(target),
        protect_fraction=protect_fraction,
        tol=tol,
        round_to=round_to,
        params={
            **p,
            "seed": req.seed,
            "hessian": [list(r) for r in scores.hessian],
            "hessian_se": [list(r) for r in scores.hessian_se],
            "hvp_batches_used": scores.hvp_batches,
            "split_spread": spread,
        },
    )
    # the grid keeps only candidates within ±flops_tol (absolute), so a SAViT plan never misses: recorded anyway,
    # in the form every target-solving method records
    solved = target_record(
        float(target), alloc.macs_fraction, missed=abs(alloc.macs_fraction - float(target)) > tol, tol=tol
    )
    plan = plan.with_(params={**plan.params, "solved": solved})
    emit(
        callbacks,
        "log",
        message=(
            f"SAViT: remove {alloc.heads} heads, {alloc.mlp} MLP neurons, {alloc.embed} embedding channels "
            f"(fractions {alloc.fractions[0]:.3f}/{alloc.fractions[1]:.3f}/{alloc.fractions[2]:.3f}); "
            f"keeps {alloc.macs_fraction:.4f} of the MACs"
            + (
                ""
                if spread is None
                else "; standard error of the fractions over the HVP batches "
                + "/".join(f"{v:.3f}" for v in spread["fractions_se"])
            )
        ),
    )
    check_cost = plan_cost(plan)["macs"]
    if check_cost != alloc.macs:  # the closed form and the plan's cost must agree exactly
        raise StudioError(f"internal: SAViT cost model {alloc.macs} != plan cost {check_cost}")
    return SavitOutcome(plan, alloc, scores)


def _macs_for_latency(
    base: BaseArch,
    scores: SavitScores,
    target: float,
    cost: Callable[[PrunePlan], float],
    *,
    protect_fraction: float,
    tol: float,
    round_to: int,
    steps: int = 24,
) -> float:
    """Bisection on SAViT's MACs target until its allocation's predicted latency (``cost``, a fraction of the
    dense model's) is ``target``: the allocation keeps the paper's objective, the budget becomes a latency.
    Each step is one grid search (well under a second on DeiT-S)."""
    facts = arch_facts(base)

    def predicted(t: float) -> float | None:
        try:
            return cost(savit_plan(base, scores, t, facts=facts, protect_fraction=protect_fraction, tol=tol,
                                   round_to=round_to)[0])  # fmt: skip
        except StudioError:  # this MACs target is out of the protection's reach
            return None

    lo, hi = 0.0, 1.0 - tol  # predicted latency grows with the MACs kept
    for _ in range(steps):
        mid = (lo + hi) / 2
        f = predicted(mid)
        if f is None or f < target:
            lo = mid
        else:
            hi = mid
    if predicted(hi) is None:
        raise StudioError(
            f"SAViT cannot reach {target:.1%} of the dense latency: its protection keeps too much. Ask for a larger "
            "--target-latency or lower --protect."
        )
    return hi


def _calib_need(p: Any, _batch_size: int) -> int:
    """Enough calibration batches for ``hvp_batches`` HVP batches at ``hvp_every`` (the scores use them all)."""
    every, n = int(p.get("hvp_every", 1)), int(p.get("hvp_batches") or 0)
    return max(1, (n - 1) * every + 1) if every > 0 and n > 0 else DEFAULT_CALIB_BATCHES


def prune_savit(
    req: PruneRequest, *, callbacks: Sequence[Callback] = (), cancel: CancelToken | None = None
) -> PrunePlan:
    return run_savit(req, callbacks=callbacks, cancel=cancel).plan


METHODS.add(
    "savit",
    Method(
        "savit",
        prune_savit,
        "SAViT: taylor2 gate scores + Hessian interaction, heads/MLP/embedding allocated under a MACs target",
        options=(HESSIAN_EMBED, HVP_EVERY, HVP_BATCHES, PROTECT, FLOPS_TOL),
        needs_data=True,
        calib_need=_calib_need,
        budgets=(MACS, LATENCY),
        calibration="hessian",
        units=("heads", "mlp", "embed"),
    ),
)
