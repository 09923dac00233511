"""P3B's global budget (Glandorf et al., arXiv 2506.23675, §3.2): block benefits -> importance -> keep ratios.

Pure arithmetic on per-block numbers (no model, no training), so it sits below the method
(:mod:`studio.prune.p3b`, which calls it during fine-tuning) and the Block benefit analysis
(:mod:`studio.analysis.block_benefit`, which replays it as a what-if on a run's recorded benefits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import StudioError


@dataclass(frozen=True)
class BudgetSettings:
    """The transform and solve parameters (reference defaults: T=10, γ=0.2, α=0.5)."""

    scale: float = 10.0  # T, pr_block_imp_scale
    gamma: float = 0.2  # EMA weight of the newest window
    alpha: float = 0.5  # CLS vs patch blend
    # off, as the reference: its soft clamp gives D = 0 a value of 0.69 and the division by the kept parameters
    # pulls a nearly-emptied block back (the paper's reactivation); on zeroes every block with D <= 0
    zero_floor: bool = False
    min_keep: float = 0.0
    block_params_only: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BudgetSettings:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def soft_clamp(u: np.ndarray, scale: float = 10.0) -> np.ndarray:
    """``softplus(1.4u) - softplus(1.4u - T)``: ≈0 for u ≪ 0, 0.69 at 0, saturating at T."""
    a = 1.4 * np.asarray(u, dtype=np.float64)
    return np.logaddexp(0.0, a) - np.logaddexp(0.0, a - scale)


def transform_benefits(
    benefit: np.ndarray, kept: np.ndarray, *, scale: float = 10.0, zero_floor: bool = False
) -> np.ndarray:
    """One channel's benefits -> importance per kept parameter, normalised to mean 1 (ŵ of the notes §2.4).

    With ``zero_floor`` (not the reference) a block whose benefit is ≤ 0 gets exactly 0 on this channel.
    """
    d = np.asarray(benefit, dtype=np.float64)
    kept = np.asarray(kept, dtype=np.float64)
    top = d.max()
    if not np.isfinite(top) or top <= 0:  # Q6: nothing helps; prefer no block
        return np.ones_like(d)
    v = soft_clamp(scale * d / top, scale)
    if zero_floor:
        v = np.where(d > 0, v, 0.0)
    w = v / np.maximum(kept, 1.0)
    return w / w.mean()


def importance_from_benefits(
    benefit_cls: np.ndarray, benefit_patch: np.ndarray, kept: np.ndarray, settings: BudgetSettings
) -> np.ndarray:
    """One-shot block importance ``α·ŵ^c + (1-α)·ŵ^p`` (no EMA history)."""
    wc = transform_benefits(benefit_cls, kept, scale=settings.scale, zero_floor=settings.zero_floor)
    wp = transform_benefits(benefit_patch, kept, scale=settings.scale, zero_floor=settings.zero_floor)
    return settings.alpha * wc + (1 - settings.alpha) * wp


class BlockBudget:
    """The EMA of the per-channel importances across mask updates (first update: no EMA)."""

    def __init__(self, settings: BudgetSettings) -> None:
        self.settings = settings
        self.cls: np.ndarray | None = None
        self.patch: np.ndarray | None = None

    def update(self, benefit_cls: np.ndarray, benefit_patch: np.ndarray, kept: np.ndarray) -> np.ndarray:
        s = self.settings
        wc = transform_benefits(benefit_cls, kept, scale=s.scale, zero_floor=s.zero_floor)
        wp = transform_benefits(benefit_patch, kept, scale=s.scale, zero_floor=s.zero_floor)
        self.cls = wc if self.cls is None else s.gamma * wc + (1 - s.gamma) * self.cls
        self.patch = wp if self.patch is None else s.gamma * wp + (1 - s.gamma) * self.patch
        return s.alpha * self.cls + (1 - s.alpha) * self.patch

    def state_dict(self) -> dict[str, Any]:
        return {
            "cls": None if self.cls is None else torch.from_numpy(self.cls.copy()),
            "patch": None if self.patch is None else torch.from_numpy(self.patch.copy()),
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.cls = None if sd["cls"] is None else sd["cls"].numpy().astype(np.float64)
        self.patch = None if sd["patch"] is None else sd["patch"].numpy().astype(np.float64)


def solve_keep_ratios(
    importance: np.ndarray,
    block_params: np.ndarray,
    non_block_params: float,
    prune_ratio: float,
    *,
    min_keep: float = 0.0,
) -> np.ndarray:
    """Per-block keep ratios κ_b with ``Σ κ_b·W_b + W_non = (1 - prune_ratio)·(Σ W_b + W_non)``.

    ``κ_b = clip(s·I_b, min_keep, 1)``: blocks with importance ≤ 0 get ``min_keep``; ``s`` is found exactly
    (``Σ κ_b(s)·W_b`` is piecewise linear and non-decreasing in s). If even every positive-importance block kept
    whole cannot use the budget, the rest is spread uniformly over the zero-importance blocks.
    """
    if not 0.0 <= prune_ratio < 1.0:
        raise StudioError(f"Prune ratio must be in [0, 1), got {prune_ratio}.")
    if not 0.0 <= min_keep < 1.0:
        raise StudioError(f"Minimum keep ratio must be in [0, 1), got {min_keep}.")
    imp = np.clip(np.nan_to_num(np.asarray(importance, dtype=np.float64)), 0.0, None)
    W = np.asarray(block_params, dtype=np.float64)
    total = W.sum() + non_block_params
    target = (1.0 - prune_ratio) * total - non_block_params  # Σ κ_b W_b must equal this
    if target >= W.sum():
        return np.ones_like(W)
    floor = min_keep * W.sum()
    if target < floor - 1e-9 * total:
        raise StudioError(
            f"Prune ratio {prune_ratio} cannot be met: the parameters outside the blocks "
            f"({int(non_block_params):,}) and the minimum keep ratio {min_keep} already use "
            f"{(non_block_params + floor) / total:.1%} of the model. Lower the prune ratio (at most "
            f"{1 - (non_block_params + floor) / total:.3f})."
        )
    pos = imp > 0
    kappa = np.full_like(W, min_keep)
    if not pos.any() or W[pos].sum() + min_keep * W[~pos].sum() <= target:
        kappa[pos] = 1.0
        rest = target - W[pos].sum()
        if (~pos).any():
            kappa[~pos] = np.clip(rest / W[~pos].sum(), min_keep, 1.0)
        return kappa

    def spent(s: float) -> float:
        return float((np.clip(s * imp[pos], min_keep, 1.0) * W[pos]).sum()) + min_keep * W[~pos].sum()

    breaks = np.unique(np.concatenate([min_keep / imp[pos], 1.0 / imp[pos]]))
    lo = 0.0
    for hi in breaks:
        if spent(hi) >= target:
            break
        lo = hi
    else:  # unreachable: at the last breakpoint every positive block is whole, handled above
        hi = breaks[-1]
    mid = 0.5 * (lo + hi)
    sm = mid * imp
    low = pos & (sm <= min_keep)
    high = pos & (sm >= 1.0)
    free = pos & ~low & ~high
    fixed = min_keep * W[~pos].sum() + min_keep * W[low].sum() + W[high].sum()
    denom = (imp[free] * W[free]).sum()
    s = (target - fixed) / denom if denom > 0 else 0.0
    kappa[pos] = np.clip(s * imp[pos], min_keep, 1.0)
    kappa[low], kappa[high] = min_keep, 1.0
    return kappa
