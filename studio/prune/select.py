"""From unit importance scores and a pruning ratio to a :class:`PrunePlan` (shared by every score-based method).

Units are heads, head dims (shared by q, k, v of all heads of a block), MLP neurons and embedding channels.
``uniform`` removes the same fraction in every block; ``global`` ranks the units of a scope across all blocks
(torch-pruning's ``global_pruning``) while keeping at least one unit per block. Kept widths of head dims, MLP
and embedding can be rounded *up* to a multiple of ``round_to`` (hardware-friendly GEMMs); heads are not
rounded. The kept set is always the top-scored units (ties: lower index), listed in increasing order, so
plans are nested as the ratio grows and MACs fall monotonically.

Head dims a model ties together (EVA-02's rotary pairs, :func:`studio.eva.head_dim_pairs`) are ranked and kept
as one unit each (``tied_dims``): a pair's score is the sum of its dims' scores, the ratio removes that
fraction of the pairs, and ``round_to`` rounds the kept dims up to a multiple of both it and the pair size.
The papers score dims one at a time; summing a pair's scores is the studio's rule, the group sum every
grouped criterion already uses for a unit of several channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..analysis.criteria import UnitScores, keep_count, top_k
from ..errors import StudioError
from ..plan import BaseArch, BlockPlan, PrunePlan

SCOPES = ("heads", "head_dims", "mlp", "embed")
MODES = ("uniform", "global")
PerBlock = tuple[torch.Tensor, ...]


def parse_scopes(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"heads,mlp"`` -> ``("heads", "mlp")``, refusing unknown names."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    bad = [s for s in items if s not in SCOPES]
    if bad or not items:
        raise StudioError(
            f"Unknown pruning scope '{bad[0] if bad else text}'. Valid scopes: {', '.join(SCOPES)} "
            "(comma-separated, e.g. heads,mlp)."
        )
    return tuple(dict.fromkeys(items))


def global_counts(scores: Sequence[torch.Tensor], ratio: float, round_to: int = 1) -> list[int]:
    """Kept units per group when the lowest-scored ``ratio`` of all units is removed across groups (≥ 1 each)."""
    sizes = [len(s) for s in scores]
    n_remove = math.floor(ratio * sum(sizes) + 1e-9)
    order = sorted((float(v), g, i) for g, s in enumerate(scores) for i, v in enumerate(s.tolist()))
    kept, removed = list(sizes), 0
    for _, g, _ in order:
        if removed >= n_remove:
            break
        if kept[g] > 1:
            kept[g] -= 1
            removed += 1
    if round_to > 1:
        kept = [min(n, math.ceil(k / round_to) * round_to) for k, n in zip(kept, sizes)]
    return kept


def removed_score(scores: UnitScores, plan: PrunePlan) -> float | None:
    """The share of the criterion's score mass on the units ``plan`` removes, in [0, 1] (less is better).

    Each unit kind the criterion scored counts equally (its removed score over its total, over all blocks; a
    removed block removes all its units), so the figure does not depend on the criterion's scale or on how
    many units a kind has. It is the "criterion score removed" signal the Compare page ranks plans by; None
    when nothing was scored. Negative scores count as 0 (a score is "higher = keep").
    """
    shares = []
    for scope in ("heads", "head_dims", "mlp", "embed"):
        ts = scores.tensors(scope)
        if ts is None:
            continue
        if isinstance(ts, torch.Tensor):
            pairs = [(ts, plan.embed)]
        else:
            pairs = []
            for i, t in enumerate(ts):
                b = plan.block(i)
                pairs.append((t, () if b is None else getattr(b, scope)))
        total = removed = 0.0
        for t, kept in pairs:
            t = t.clamp(min=0)
            total += float(t.sum())
            if kept is not None:
                removed += float(t.sum()) - float(t[list(kept)].sum()) if kept else float(t.sum())
        if total > 0:
            shares.append(removed / total)
    return None if not shares else round(sum(shares) / len(shares), 6)


def _counts(scores: Sequence[torch.Tensor], ratio: float, mode: str, round_to: int) -> list[int]:
    if mode == "global":
        return global_counts(scores, ratio, round_to)
    return [keep_count(len(s), ratio, round_to) for s in scores]


def _tied_top(
    per: PerBlock, ratio: float, mode: str, round_to: int, tied: Sequence[Sequence[int]]
) -> list[tuple[int, ...] | None]:
    """Per block, the kept head dims when whole ``tied`` groups are ranked by their summed scores."""
    size = len(tied[0])
    if any(len(g) != size for g in tied) or sorted(j for g in tied for j in g) != list(range(len(per[0]))):
        raise StudioError(  # a family's own tie groups; never from user input
            f"internal: tied head-dim groups {list(tied)[:4]}... do not partition the {len(per[0])} head dims."
        )
    index = torch.tensor([list(g) for g in tied])
    grouped = tuple(s[index].sum(-1) for s in per)
    counts = _counts(grouped, ratio, mode, math.lcm(size, round_to) // size)
    out: list[tuple[int, ...] | None] = []
    for s, k in zip(grouped, counts):
        keep = top_k(s, k)
        out.append(None if keep is None else tuple(sorted(j for g in keep for j in tied[g])))
    return out


def plan_from_scores(
    base: BaseArch,
    scores: UnitScores,
    ratios: Mapping[str, float],
    *,
    mode: str = "uniform",
    round_to: int = 1,
    method: str = "manual",
    params: Mapping[str, Any] | None = None,
    tied_dims: Sequence[Sequence[int]] | None = None,
) -> PrunePlan:
    """The plan keeping the top-scored units when removing ``ratios[scope]`` of each scope.

    Args:
        ratios: fraction in [0, 1] to remove per scope (``heads``, ``head_dims``, ``mlp``, ``embed``); a scope not
            given (or 0) is kept whole. 1 keeps one unit per block (the surgery never empties a block).
        mode: ``uniform`` (same ratio in every block) or ``global`` (ranked across blocks).
        round_to: round kept head-dim / MLP / embedding widths up to a multiple of this.
        tied_dims: groups of head dims kept or dropped together (equal sizes, covering every dim), or None.
    """
    if mode not in MODES:
        raise StudioError(f"Pruning mode '{mode}' is unknown; use {' or '.join(MODES)}.")
    for scope, r in ratios.items():
        if scope not in SCOPES:
            parse_scopes([scope])
        if not 0.0 <= r <= 1.0:
            raise StudioError(f"Pruning ratio for '{scope}' must be in [0, 1], got {r}.")
        if r > 0 and getattr(scores, scope) is None:
            raise StudioError(f"Scope '{scope}' was not scored by this method; drop it from --scope.")
    depth = base.depth
    kept: dict[str, list[tuple[int, ...] | None]] = {}
    for scope in ("heads", "head_dims", "mlp"):
        r = ratios.get(scope, 0.0)
        per: PerBlock | None = scores.tensors(scope)  # type: ignore[assignment]
        if r <= 0 or per is None:
            kept[scope] = [None] * depth
            continue
        if scope == "head_dims" and tied_dims:
            kept[scope] = _tied_top(per, r, mode, round_to, tied_dims)
            continue
        counts = _counts(per, r, mode, 1 if scope == "heads" else round_to)
        kept[scope] = [top_k(s, k) for s, k in zip(per, counts)]
    embed = None
    embed_scores = scores.tensors("embed")
    if ratios.get("embed", 0.0) > 0 and isinstance(embed_scores, torch.Tensor):
        embed = top_k(embed_scores, keep_count(len(embed_scores), ratios["embed"], round_to))
    blocks = tuple(
        BlockPlan(i, heads=kept["heads"][i], head_dims=kept["head_dims"][i], mlp=kept["mlp"][i])
        for i in range(depth)
    )
    plan = PrunePlan(base=base, blocks=blocks, embed=embed, method=method, params=dict(params or {}))
    return plan.with_(summary={**plan.summary, "removed_score": removed_score(scores, plan)}).validate()
