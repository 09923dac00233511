"""Isomorphic pruning (Fang et al., "Isomorphic Pruning for Vision Models", ECCV 2024) with torch-pruning.

The method ranks importance *only among topologically identical structures*: torch-pruning's DepGraph splits a
ViT into dependency groups (one residual/embedding group, one ``fc1``/``fc2`` group per block, one ``qkv``/``proj``
group per block), groups with the same layer-type/pruning-direction signature form one ranking scope, and each
scope is pruned globally at its own ratio. Importance is torch-pruning's ``GroupTaylorImportance`` (per channel,
``|w·∂L/∂w|`` summed over each member layer's slice, averaged over the layers of the group, divided by the group
mean), with gradients **summed** over the calibration batches (the reference never zeroes them). Heads are ranked
globally across blocks (``head_pruning_ratio``) and head dims in one scope of all ``qkv`` layers
(``pruning_ratio_dict``), exactly as the authors' ``prune.py`` calls ``MetaPruner``:
``global_pruning=True, isomorphic=True, prune_num_heads=True, prune_head_dims=True``. The paper's targets are
hand-tuned ratio triples (ρ, ρ_head, ρ_headdim), e.g. DeiT-B → 4.2 G with (0.5, 0.5, 0.25); for a MACs target the
Studio bisects one scale ``s`` applied to the triple.

What differs from the reference, and why:
- the classifier (``head`` and ``head_dist``) is ignored **by identity**, not by ``out_features == 1000``
  (fine-tuned heads have any number of classes);
- torch-pruning 1.6.1 has no guard against global head ranking removing every head of a block (it then skips
  that block's group but still decrements its head count, leaving a broken model). The Studio keeps the block's
  best-scored head, with the head dims the ``qkv`` scope chose for that block (read from a second pass without
  head pruning), and records the block in ``params.guarded_blocks``;
- the result is not a pickled module but a :class:`~studio.plan.PrunePlan`: the pruner's groups are read in
  interactive mode, their root indices (all in base-model coordinates, because the three group kinds prune
  disjoint axes) become kept heads / head dims / neurons / embedding channels, and the shared surgery rebuilds
  the model. A test checks that the surgery's model gives the same logits as torch-pruning's pruned module;
- attention temperature after head-dim pruning: ``scale_policy="reset"`` uses ``1/sqrt(d_kept)`` as the
  reference (``prune.py`` resets ``scale``; timm's fused kernel does so anyway); the default ``keep`` folds the
  base temperature into ``q`` so the pruned model computes the same function on the kept dims, which is what a
  short recovery needs;
- EVA-02's rotary pairs (the paper has no rule for them): torch-pruning ranks head dims one at a time on a copy
  without the rotation; each block then keeps as many whole pairs as it kept dims (rounded up), the pairs of
  highest summed importance, so the plan's dims are what the rotation reads.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..analysis.criteria import (
    Grads,
    UnitScores,
    classifiers,
    example_inputs,
    top_k,
    with_grads,
)
from ..analysis.groups import torch_pruning_scores, unit_scores
from ..analysis.importance import grouped_criteria, torch_pruning_importance, torch_pruning_name
from ..costs import arch_facts
from ..errors import StudioError
from ..eva import has_rope, head_dim_pairs
from ..events import Callback, CancelToken, check, emit, progress
from ..families import split_packed_glu
from ..plan import BaseArch, BlockPlan, PrunePlan
from ..surgery import check_fits
from . import LATENCY, MACS, METHODS, RATIO, Method, Option, PruneRequest
from .select import SCOPES, removed_score
from .target import TOLERANCE, solve_ratio, target_record

DEFAULT_RATIOS = (0.5, 0.5, 0.25)  # the paper's DeiT-4.2G triple (ρ, ρ_head, ρ_headdim)


@dataclass(frozen=True)
class IsoRatios:
    """Isomorphic's three ratios: ρ (embedding channels and MLP neurons), ρ_head (heads), ρ_headdim (head dims)."""

    embed_mlp: float
    heads: float
    head_dims: float

    def scaled(self, s: float) -> IsoRatios:
        return IsoRatios(self.embed_mlp * s, self.heads * s, self.head_dims * s)

    def to_dict(self) -> dict[str, float]:
        return {"ratio": self.embed_mlp, "head_ratio": self.heads, "head_dim_ratio": self.head_dims}

    def check(self) -> IsoRatios:
        for name, v in self.to_dict().items():
            if not 0.0 <= v < 1.0:
                raise StudioError(f"Isomorphic --{name.replace('_', '-')} must be in [0, 1), got {v}.")
        return self


# ------------------------------------------------------------------------------------------------ one run
@dataclass
class _Removed:
    embed: set[int]
    attn: dict[int, set[int]]  # block -> removed attention channels (proj input columns, h*d + j)
    mlp: dict[int, set[int]]


def _has_qk_norm(model: nn.Module) -> bool:
    return any(not isinstance(getattr(b.attn, "q_norm", nn.Identity()), nn.Identity) for b in model.blocks)


def _pruner_copy(model: nn.Module, grads: Grads | None) -> nn.Module:
    """The copy torch-pruning ranks on: ``model`` with ``grads``, its per-head q/k norms (qk_norm) taken out.

    torch-pruning maps head channels onto ``q_norm``/``k_norm`` (a LayerNorm over one head's dims) as if they
    spanned all heads and fails, so the ranking runs without them. The plan still prunes them exactly: removing
    a head leaves them as they are, and removing head dims slices them to the kept dims in the surgery (the
    norm is shared by the heads, as the plan's head dims are). Their weights are not scored: the paper has no
    rule for them, and the qkv rows and proj columns carry the units' importance.

    EVA-02's rotary table is taken out too: torch-pruning reads its token-axis ``cat`` as a channel concat,
    and the rotation only mixes dims inside a head, which are never pruned there (the gradients of Taylor
    importance come from the real model). So is a relative position bias (BEiT, relpos ViTs, ``rel_pos``): it
    adds to the logits and owns no qkv or proj weight, so the groups are the same without it.
    """
    m = split_packed_glu(with_grads(model, grads))  # a GLU's halves as two linears torch-pruning couples
    for b in m.blocks:
        if getattr(b.attn, "rope", None) is not None:
            b.attn.rope = None
        if getattr(b.attn, "rel_pos", None) is not None:
            b.attn.rel_pos = None
        for name in ("q_norm", "k_norm"):
            if not isinstance(getattr(b.attn, name, nn.Identity()), nn.Identity):
                setattr(b.attn, name, nn.Identity())
    return m


def _make_pruner(
    m: nn.Module, ratios: IsoRatios, *, importance: str, round_to: int, heads: bool
) -> tuple[tp.pruner.MetaPruner, dict[nn.Module, int]]:
    """torch-pruning's MetaPruner on ``m`` exactly as the reference builds it, and its ``num_heads`` dict."""
    qkvs = [blk.attn.qkv for blk in m.blocks]
    num_heads = {blk.attn.qkv: blk.attn.num_heads for blk in m.blocks}  # a fresh dict: the pruner mutates it
    heads = heads and ratios.heads > 0
    dims = ratios.head_dims > 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters")
        pruner = tp.pruner.MetaPruner(
            m,
            example_inputs(m),
            importance=torch_pruning_importance(importance),
            global_pruning=True,
            isomorphic=True,
            pruning_ratio=ratios.embed_mlp,
            pruning_ratio_dict={tuple(qkvs): _qkv_ratio(ratios, heads)},
            ignored_layers=classifiers(m),
            num_heads=num_heads,
            prune_num_heads=heads,
            prune_head_dims=dims,
            head_pruning_ratio=ratios.heads if heads else 0.0,
            round_to=round_to if round_to > 1 else None,
        )
    return pruner, num_heads


def _qkv_ratio(ratios: IsoRatios, heads: bool) -> float:
    # torch-pruning only removes heads inside a scope that prunes something: with no head-dim pruning, give the
    # qkv scope a vanishing ratio and switch head-dim pruning off (env_stack §2.4)
    return ratios.head_dims if ratios.head_dims > 0 else (1e-9 if heads else 0.0)


def _read_groups(
    m: nn.Module, pruner: tp.pruner.MetaPruner, *, prune: bool
) -> tuple[_Removed, dict[nn.Module, int]]:
    """Every group the pruner yields, as the kept-index sets of the plan (applied to ``m`` with ``prune``)."""
    out = _Removed(set(), {}, {})
    where = {}
    for i, blk in enumerate(m.blocks):
        where[(id(blk.attn.proj), False)] = ("attn", i)
        where[(id(blk.mlp.fc2), False)] = ("mlp", i)  # fc2's input: the hidden neurons in every MLP kind
    where[(id(m.patch_embed.proj), True)] = ("embed", -1)
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            key = (id(dep.target.module), pruner.DG.is_out_channel_pruning_fn(dep.handler))
            if key in where:
                kind, i = where[key]
                if kind == "embed":
                    out.embed |= set(map(int, idxs))
                else:
                    getattr(out, kind)[i] = set(map(int, idxs))
        if prune:
            group.prune()
    return out, pruner.num_heads


def _run_pruner(
    m: nn.Module, ratios: IsoRatios, *, importance: str, round_to: int, heads: bool, prune: bool
) -> tuple[_Removed, dict[nn.Module, int]]:
    """Build torch-pruning's MetaPruner on ``m`` exactly as the reference and read every group it yields.

    With ``prune`` the groups are also applied to ``m`` (for the parity test); otherwise ``m`` is untouched.
    """
    pruner, _ = _make_pruner(m, ratios, importance=importance, round_to=round_to, heads=heads)
    return _read_groups(m, pruner, prune=prune)


class ReusablePruner:
    """One MetaPruner reused by every trial of a bisection over the ratio scale (without pruning).

    Building the pruner (the dependency graph and its groups) and scoring the groups take nearly all of a
    trial's time and do not depend on the ratios: the model is never pruned between trials, so the groups and
    their importance are the same. They are computed once; each trial only sets the ratios and re-runs
    torch-pruning's own ranking and selection (``step(interactive=True)``), so its plan equals a fresh
    pruner's (tested).
    """

    def __init__(self, m: nn.Module, ratios: IsoRatios, *, importance: str, round_to: int) -> None:
        self.m = m
        self.heads, self.dims = ratios.heads > 0, ratios.head_dims > 0
        self.pruner, self.num_heads = _make_pruner(
            m, ratios, importance=importance, round_to=round_to, heads=True
        )
        pr = self.pruner
        self._init_heads = dict(self.num_heads)
        self._init_groups = dict(pr.out_channel_groups)
        groups = list(
            pr.DG.get_all_groups(ignored_layers=pr.ignored_layers, root_module_types=pr.root_module_types)
        )
        pr.DG.get_all_groups = lambda *a, **k: iter(groups)  # type: ignore[method-assign]
        rooted: dict[int, Any] = {}
        root = pr._downstream_node_as_root_if_attention

        def downstream(group: Any) -> Any:
            if id(group) not in rooted:
                rooted[id(group)] = root(group)
            return rooted[id(group)]

        pr._downstream_node_as_root_if_attention = downstream  # type: ignore[method-assign]
        scores: dict[int, torch.Tensor] = {}
        score = pr.estimate_importance

        def estimate(group: Any) -> torch.Tensor:
            if id(group) not in scores:
                scores[id(group)] = score(group)
            return scores[id(group)]

        pr.estimate_importance = estimate  # type: ignore[method-assign]
        self._keep = (groups, rooted, scores)  # the cached objects' ids stay valid while they live

    def fits(self, ratios: IsoRatios) -> bool:
        """Whether a trial at ``ratios`` prunes the same kinds of units this pruner was built for."""
        return (ratios.heads > 0, ratios.head_dims > 0) == (self.heads, self.dims)

    def run(self, ratios: IsoRatios) -> tuple[_Removed, dict[nn.Module, int]]:
        pr = self.pruner
        steps = pr.iterative_steps
        sched = pr.iterative_pruning_ratio_scheduler
        pr.pruning_ratio = ratios.embed_mlp
        pr.per_step_pruning_ratio = sched(ratios.embed_mlp, steps)
        qkv = sched(_qkv_ratio(ratios, self.heads), steps)
        for sub in pr.pruning_ratio_dict:
            pr.pruning_ratio_dict[sub] = qkv
        head = ratios.heads if self.heads else 0.0
        pr.head_pruning_ratio = head
        pr.per_step_head_pruning_ratio = sched(head, steps)
        self.num_heads.clear()
        self.num_heads.update(self._init_heads)
        pr.out_channel_groups.clear()
        pr.out_channel_groups.update(self._init_groups)
        pr._scope_initial_channels = {}
        pr.current_step = 0
        return _read_groups(self.m, pr, prune=False)


def _plan(
    base: BaseArch,
    removed: _Removed,
    dims_only: _Removed | None,
    head_scores: list[torch.Tensor],
    empty: list[int],
) -> tuple[tuple[BlockPlan, ...], tuple[int, ...] | None]:
    d = base.head_dim
    blocks = []
    for i in range(base.depth):
        H = base.num_heads[i]
        if i in empty:
            # guard: the block's best head, with the head dims the qkv scope kept for this block
            assert dims_only is not None
            drop_dims = {c % d for c in dims_only.attn.get(i, set())}
            heads: list[int] = [int(torch.argmax(head_scores[i]))]
            dims = [j for j in range(d) if j not in drop_dims]
        else:
            gone = removed.attn.get(i, set())
            kept = [c for c in range(H * d) if c not in gone]
            heads = sorted({c // d for c in kept})
            per_head = {h: tuple(c % d for c in kept if c // d == h) for h in heads}
            if len(set(per_head.values())) > 1:
                raise StudioError(
                    f"internal: torch-pruning kept different head dims in the heads of block {i}; a plan keeps one "
                    "set of dims per block."
                )
            dims = list(per_head[heads[0]])
        mlp_gone = removed.mlp.get(i, set())
        blocks.append(
            BlockPlan(
                i,
                heads=None if len(heads) == H else tuple(heads),
                head_dims=None if len(dims) == d else tuple(dims),
                mlp=None
                if not mlp_gone
                else tuple(j for j in range(base.mlp_hidden[i]) if j not in mlp_gone),
            )
        )
    embed = None if not removed.embed else tuple(c for c in range(base.embed_dim) if c not in removed.embed)
    return tuple(blocks), embed


def _whole_pairs(b: BlockPlan, pairs: Sequence[tuple[int, int]], scores: torch.Tensor) -> BlockPlan:
    """``b`` with its head dims as whole rotary pairs (EVA-02): as many pairs as torch-pruning kept dims, rounded
    up, the pairs of highest summed score (the grouped importance torch-pruning ranked the dims by).

    The paper has no rule for rotary pairs; torch-pruning ranks the dims one at a time (on a copy without the
    rotation), and keeping half a pair would not be the masked model's function.
    """
    if b.head_dims is None:
        return b
    keep = top_k(scores[torch.tensor(pairs)].sum(-1), math.ceil(len(b.head_dims) / 2))
    dims = None if keep is None else tuple(sorted(j for p in keep for j in pairs[p]))
    return replace(b, head_dims=dims)


@dataclass(frozen=True)
class IsoStructure:
    """One isomorphic pruning run: the plan, the ratios used, guarded blocks, and (optionally) tp's pruned module."""

    plan: PrunePlan
    ratios: IsoRatios
    guarded_blocks: tuple[int, ...]
    pruned: nn.Module | None = None


def isomorphic_structure(
    model: nn.Module,
    base: BaseArch,
    grads: Grads | None,
    ratios: IsoRatios,
    *,
    importance: str = "taylor",
    round_to: int = 1,
    scale_policy: str = "keep",
    keep_pruned: bool = False,
    params: dict[str, Any] | None = None,
    reuse: ReusablePruner | None = None,
) -> IsoStructure:
    """Run the pruner once at ``ratios`` on a copy of ``model`` and write what it keeps as a plan.

    Args:
        grads: summed calibration gradients (:func:`accumulate_gradients`); needed by ``taylor``.
        keep_pruned: also return torch-pruning's pruned module (bookkeeping as the reference: ``num_heads``,
            ``head_dim``, ``attn_dim``, ``scale = head_dim**-0.5``), for parity checks. None if a block was guarded.
        reuse: a pruner built once for a bisection (:class:`ReusablePruner`); used when it fits ``ratios``.
    """
    ratios.check()
    check_fits(model, base)
    if keep_pruned and (_has_qk_norm(model) or has_rope(model)):
        raise StudioError(
            "The torch-pruning parity module is not built for qk_norm or rotary (EVA-02) models."
        )
    if importance == "taylor" and not grads:
        raise StudioError(
            "Isomorphic pruning with Taylor importance needs calibration gradients: give --data."
        )
    meta = {**(params or {}), **ratios.to_dict(), "importance": importance, "round_to": round_to}
    if ratios.embed_mlp <= 0 and ratios.heads <= 0 and ratios.head_dims <= 0:
        return IsoStructure(PrunePlan.dense(base, method="isomorphic").with_(params=meta), ratios, ())
    if reuse is not None and not keep_pruned and reuse.fits(ratios):
        m = reuse.m
        removed, num_heads = reuse.run(ratios)
    else:
        m = _pruner_copy(model, grads)
        removed, num_heads = _run_pruner(
            m, ratios, importance=importance, round_to=round_to, heads=True, prune=keep_pruned
        )
    empty = [i for i, blk in enumerate(m.blocks) if num_heads.get(blk.attn.qkv, 1) <= 0]
    dims_only, head_scores = None, []
    if empty:
        dims_only, _ = _run_pruner(
            _pruner_copy(model, grads),
            ratios,
            importance=importance,
            round_to=round_to,
            heads=False,
            prune=False,
        )
        head_scores = list(torch_pruning_scores(model, torch_pruning_name(importance), grads).heads)
    blocks, embed = _plan(base, removed, dims_only, head_scores, empty)
    pairs = head_dim_pairs(model)
    if pairs is not None and any(b.head_dims is not None for b in blocks):
        dim_scores = torch_pruning_scores(model, torch_pruning_name(importance), grads).head_dims
        blocks = tuple(_whole_pairs(b, pairs, dim_scores[b.index]) for b in blocks)
    plan = PrunePlan(
        base=base,
        blocks=blocks,
        embed=embed,
        method="isomorphic",
        scale_policy=scale_policy,
        params={**meta, "guarded_blocks": empty},
    ).validate()
    pruned = None
    if keep_pruned and not empty:
        for blk, qkv in ((b, b.attn.qkv) for b in m.blocks):
            a = blk.attn
            a.num_heads = num_heads[qkv]
            a.head_dim = qkv.out_features // (3 * a.num_heads)
            a.attn_dim = a.num_heads * a.head_dim
            a.scale = a.head_dim**-0.5
        for p in m.parameters():
            p.grad = None
        pruned = m.eval()
    return IsoStructure(plan, ratios, tuple(empty), pruned)


def solve_scale(
    model: nn.Module,
    base: BaseArch,
    grads: Grads | None,
    ratios: IsoRatios,
    target: float,
    *,
    importance: str = "taylor",
    round_to: int = 1,
    scale_policy: str = "keep",
    params: dict[str, Any] | None = None,
    cost: Callable[[PrunePlan], float] | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> tuple[IsoStructure, float, float]:
    """Bisect a scale ``s`` of the ratio triple so the plan keeps ``target`` of the MACs (±2 %), or of
    ``cost`` (a latency model's prediction as a fraction of the dense model's).

    Returns the structure, ``s`` and the MACs fraction it keeps. One pruner run per trial.
    """
    ratios.check()
    top = max(ratios.embed_mlp, ratios.heads, ratios.head_dims)
    if top <= 0:
        raise StudioError(
            "Isomorphic pruning needs at least one positive ratio to scale toward a MACs target."
        )
    # not closer to 1: a scope asked to remove (nearly) all of a group's channels makes torch-pruning skip that
    # group entirely, so MACs stop falling with s near the top
    s_max = 0.9 / top
    found: dict[float, IsoStructure] = {}
    trials = [0]
    reuse: list[ReusablePruner] = []  # built at the first trial that prunes, reused by the others

    def build(s: float) -> PrunePlan:
        check(cancel)
        scaled = ratios.scaled(s)
        if s > 0 and not reuse:
            reuse.append(
                ReusablePruner(_pruner_copy(model, grads), scaled, importance=importance, round_to=round_to)
            )
        st = isomorphic_structure(
            model,
            base,
            grads,
            scaled,
            importance=importance,
            round_to=round_to,
            scale_policy=scale_policy,
            params=params,
            reuse=reuse[0] if reuse else None,
        )
        found[s] = st
        trials[0] += 1
        progress(callbacks, "isomorphic bisection", trials[0], 26, scale=s)  # at most lo, hi + 24
        return st.plan

    sol = solve_ratio(build, target, facts=arch_facts(base), lo=0.0, hi=s_max, iters=24, cost=cost)
    if not sol.within(target):  # recorded as params.solved.target_missed by prune_isomorphic
        emit(
            callbacks,
            "log",
            message=f"warning: closest isomorphic plan keeps {sol.fraction:.1%} of the MACs, not "
            f"{target:.1%} (±{TOLERANCE:.0%}); head removal moves MACs in steps.",
        )
    return found[sol.ratio], sol.ratio, sol.fraction


# ------------------------------------------------------------------------------------------------ method
HEAD_RATIO = Option(
    "head_ratio", float, DEFAULT_RATIOS[1], "Isomorphic: ρ_head, fraction of heads removed globally"
)
HEAD_DIM_RATIO = Option(
    "head_dim_ratio",
    float,
    DEFAULT_RATIOS[2],
    "Isomorphic: ρ_headdim, fraction of head dims removed (one scope of all qkv)",
)
IMPORTANCE = Option(
    "importance",
    str,
    "taylor",
    "Isomorphic: torch-pruning grouped importance (a criterion of the one registry)",
    choices=grouped_criteria(),
)
SCALE_POLICY = Option(
    "scale_policy",
    str,
    "keep",
    "attention temperature after head-dim pruning: keep the base one, or reset (reference)",
    choices=("keep", "reset"),
)


def ratios_of(p: Mapping[str, Any]) -> IsoRatios:
    """The (ρ, ρ_head, ρ_headdim) triple of the options, checked."""
    return IsoRatios(
        float(p["ratio"]) if p.get("ratio") is not None else DEFAULT_RATIOS[0],
        float(p.get("head_ratio", DEFAULT_RATIOS[1])),
        float(p.get("head_dim_ratio", DEFAULT_RATIOS[2])),
    ).check()


def uses_data(p: Mapping[str, Any]) -> bool:
    """Only Taylor importance reads calibration data; ``l1``/``l2``/``random`` score the weights alone."""
    return str(p.get("importance") or "taylor") == "taylor"


def prune_isomorphic(
    req: PruneRequest, *, callbacks: Sequence[Callback] = (), cancel: CancelToken | None = None
) -> PrunePlan:
    """``--ratio`` (ρ, default 0.5) with ``--head-ratio``/``--head-dim-ratio``, or the scaled triple at ``--target-macs``."""
    p = req.params
    ratios = ratios_of(p)
    importance = str(p.get("importance") or "taylor")
    round_to = int(p.get("round_to") or 1)
    if round_to < 1:
        raise StudioError(f"--round-to must be a positive integer, got {round_to}.")
    grads = None
    if importance == "taylor":
        if not req.batches:
            raise StudioError(
                "Isomorphic pruning with Taylor importance needs calibration data: give --data."
            )
        grads = req.gradients(callbacks=callbacks, cancel=cancel)
    params = {**p, "seed": req.seed, "base_ratios": ratios.to_dict()}
    kw = dict(importance=importance, round_to=round_to, scale_policy=str(p.get("scale_policy") or "keep"))
    target = req.target()
    if target is None:
        st = isomorphic_structure(req.loaded.model, req.loaded.base, grads, ratios, params=params, **kw)
    else:
        st, s, frac = solve_scale(
            req.loaded.model,
            req.loaded.base,
            grads,
            ratios,
            float(target),
            params=params,
            cost=req.cost,
            callbacks=callbacks,
            cancel=cancel,
            **kw,
        )
        st = IsoStructure(
            st.plan.with_(
                params={
                    **st.plan.params,
                    "scale": round(s, 6),
                    "solved": {
                        "scale": round(s, 6),
                        **target_record(
                            float(target), frac, missed=abs(frac / float(target) - 1.0) > TOLERANCE
                        ),
                    },
                }
            ),
            st.ratios,
            st.guarded_blocks,
        )
    if st.guarded_blocks:
        emit(
            callbacks,
            "log",
            message=f"guard: global head ranking emptied blocks {list(st.guarded_blocks)}; "
            "kept their best head",
        )
    score = removed_score(criterion_scores(req.loaded.model, grads), st.plan)
    return st.plan.with_(summary={**st.plan.summary, "removed_score": score})


def criterion_scores(model: nn.Module, grads: Grads | None) -> UnitScores:
    """Isomorphic's criterion per unit, summed over each unit's coupled weights: ``|w ⊙ g|`` (Taylor) or ``w²``
    (torch-pruning's magnitude, p = 2) -- the scores behind the plan's "criterion score removed" signal."""
    elem = {
        n: (p.detach() * grads[n].to(p.device)).abs()
        if grads is not None and n in grads
        else (torch.zeros_like(p) if grads is not None else p.detach().pow(2))
        for n, p in model.named_parameters()
    }
    return unit_scores(model, elem, SCOPES)  # type: ignore[arg-type]


METHODS.add(
    "isomorphic",
    Method(
        "isomorphic",
        prune_isomorphic,
        "Isomorphic pruning (torch-pruning): grouped Taylor ranked within isomorphic groups; heads, head dims, "
        "MLP, embedding",
        options=(HEAD_RATIO, HEAD_DIM_RATIO, IMPORTANCE, SCALE_POLICY),
        needs_data=uses_data,
        check=ratios_of,
        budgets=(MACS, RATIO, LATENCY),
    ),
)
