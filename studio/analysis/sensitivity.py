"""Per-layer sensitivity: top-1 accuracy against the fraction of one block's units removed, block by block.

This is the sensitivity analysis of Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017), as
Distiller popularised it (``sensitivity_analysis``) and NNI ships it: for every block ``b`` and every fraction
``f``, prune *only* block ``b`` -- its lowest-scored fraction ``f`` of heads (or of MLP neurons) by a criterion
(default ``l1`` weight magnitude, which needs no data) -- evaluate that model, and compare with the dense
accuracy. One line per block; a flat line is a block that tolerates pruning, a steep one a block to spare.

The scores are those of :data:`studio.analysis.importance.CRITERIA` (the numbers the Importance page shows), the
kept units are the top-scored ones (ties: lower index, as :mod:`studio.prune.select` keeps them), and every
pruned model is :func:`studio.surgery.apply_plan` of a deep copy: the loaded model is never changed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import StudioError
from ..evaluate import EvalResult, evaluate
from ..events import Callback, CancelToken, check, emit, progress
from ..models import LoadedModel
from ..plan import BaseArch, BlockPlan, PrunePlan
from ..surgery import apply_plan, check_fits
from .criteria import Batch, UnitScores, keep_count, top_k
from .importance import CRITERIA

SCOPES = ("heads", "mlp")
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)
EVAL_BATCH = 128  # images per evaluation pass (what the shared tail evaluates with at least)


@dataclass(frozen=True)
class Point:
    """The accuracy of one model: top-1 (a fraction in [0, 1]), mean cross-entropy, images evaluated."""

    top1: float
    loss: float
    n: int

    @classmethod
    def of(cls, ev: EvalResult) -> Point:
        return cls(float(ev.top1), float(ev.loss), int(ev.n))

    def to_dict(self) -> dict[str, Any]:
        return {"top1": self.top1, "loss": self.loss, "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Point:
        return cls(float(d["top1"]), float(d["loss"]), int(d["n"]))


@dataclass(frozen=True)
class Row:
    """Block ``block`` with the lowest-scored ``fraction`` of its ``units`` removed: ``kept`` remain.

    ``kept`` is what :func:`keep_count` leaves (at least one unit; the removed count rounds down, so 25 % of 3
    heads removes none), and ``removed_fraction`` the share actually removed -- the chart's x axis.
    """

    block: int
    fraction: float
    units: int
    kept: int
    point: Point

    @property
    def removed(self) -> int:
        return self.units - self.kept

    @property
    def removed_fraction(self) -> float:
        return self.removed / self.units

    def to_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "fraction": self.fraction,
            "units": self.units,
            "kept": self.kept,
            "removed": self.removed,
            "removed_fraction": self.removed_fraction,
            **self.point.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Row:
        return cls(int(d["block"]), float(d["fraction"]), int(d["units"]), int(d["kept"]), Point.from_dict(d))


@dataclass(frozen=True)
class SensitivityResult:
    """The sweep: the dense reference and one row per (block, fraction), blocks outer, fractions ascending."""

    scope: str
    criterion: str
    fractions: tuple[float, ...]
    dense: Point
    rows: tuple[Row, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "criterion": self.criterion,
            "fractions": list(self.fractions),
            "dense": self.dense.to_dict(),
            "rows": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensitivityResult:
        return cls(
            scope=str(d["scope"]),
            criterion=str(d["criterion"]),
            fractions=tuple(float(f) for f in d["fractions"]),
            dense=Point.from_dict(d["dense"]),
            rows=tuple(Row.from_dict(r) for r in d["rows"]),
        )


def check_fractions(fractions: Sequence[float], *, low_inclusive: bool = False) -> tuple[float, ...]:
    """The fractions sorted and deduplicated; refused (one sentence) unless each lies in (0, 1) -- or [0, 1)
    with ``low_inclusive`` (the engine accepts 0, the dense model pruned by nothing, as a check)."""
    if not fractions:
        raise StudioError("Give at least one fraction to remove, e.g. 0.25, 0.5, 0.75.")
    for f in fractions:
        ok = isinstance(f, int | float) and not isinstance(f, bool) and math.isfinite(f)
        if not ok or f >= 1 or f < 0 or (f == 0 and not low_inclusive):
            raise StudioError(
                f"Fractions removed must lie strictly between 0 and 1 (e.g. 0.5 removes half), got {f!r}."
            )
    return tuple(sorted({float(f) for f in fractions}))


def units_of(base: BaseArch, scope: str, block: int) -> int:
    """How many units of ``scope`` block ``block`` has."""
    return base.num_heads[block] if scope == "heads" else base.mlp_hidden[block]


def sweep_plan(base: BaseArch, scores: UnitScores, scope: str, block: int, fraction: float) -> PrunePlan:
    """The plan that removes the lowest-scored ``fraction`` of block ``block``'s ``scope`` units, nothing else."""
    rows = getattr(scores, scope)
    if rows is None:
        raise StudioError(f"Criterion '{scores.criterion}' does not score {scope}: pick another criterion.")
    keep = top_k(
        torch.tensor(rows[block], dtype=torch.float64), keep_count(units_of(base, scope, block), fraction)
    )
    blocks = tuple(
        BlockPlan(i, **({scope: keep} if i == block else {})) for i in range(base.depth)
    )  # every other block stays dense
    params = {"scope": scope, "criterion": scores.criterion, "block": block, "fraction": fraction}
    return PrunePlan.dense(base).with_(blocks=blocks, method="sensitivity", params=params).validate()


def unit_scores(
    loaded: LoadedModel,
    criterion: str,
    batches: Sequence[Batch] = (),
    *,
    seed: int = 0,
    micro_batch: int = 0,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> UnitScores:
    """``criterion``'s scores of every unit (the Importance analysis' numbers; the model is not changed)."""
    crit = CRITERIA.get(criterion)
    if crit.needs_data and not batches:
        raise StudioError(f"Criterion '{criterion}' needs calibration data: give data and batches ≥ 1.")
    emit(callbacks, "log", message=f"sensitivity: scoring units by {criterion}")
    return crit.fn(loaded, batches, seed=seed, micro_batch=micro_batch, callbacks=callbacks, cancel=cancel)


def sensitivity(
    loaded: LoadedModel,
    eval_data: Dataset,
    *,
    scope: str = "heads",
    criterion: str = "l1",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    batches: Sequence[Batch] = (),
    scores: UnitScores | None = None,
    seed: int = 0,
    micro_batch: int = 0,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> SensitivityResult:
    """Accuracy on ``eval_data`` of the dense model and of every (block, fraction) single-block pruning.

    Args:
        scope: ``heads`` or ``mlp``: which units of the block are removed.
        criterion: a registered criterion (``l1`` needs no data; ``taylor`` needs calibration ``batches``).
        fractions: in [0, 1); 0 prunes nothing (the surgery then reproduces the dense logits exactly).
        scores: the units' scores when already computed (then ``criterion`` only labels the result).
    """
    if scope not in SCOPES:
        raise StudioError(f"Unknown scope {scope!r}: the sweep removes {' or '.join(SCOPES)}.")
    fracs = check_fractions(fractions, low_inclusive=True)
    if loaded.plan is not None and not loaded.plan.is_dense:
        raise StudioError(
            "Sensitivity is measured on an unpruned model; load the base checkpoint of this export."
        )
    check_fits(loaded.model, loaded.base)
    base = loaded.base
    total = 1 + base.depth * len(fracs)
    progress(callbacks, "sensitivity", 0, total)
    if scores is None:
        scores = unit_scores(
            loaded, criterion, batches, seed=seed, micro_batch=micro_batch, callbacks=callbacks, cancel=cancel
        )
    if getattr(scores, scope) is None:
        raise StudioError(f"Criterion '{criterion}' does not score {scope}: pick another criterion.")

    def accuracy(model: torch.nn.Module) -> Point:
        ev = evaluate(model, eval_data, batch_size=EVAL_BATCH, num_classes=base.num_classes, cancel=cancel)
        return Point.of(ev)

    emit(callbacks, "log", message="sensitivity: evaluating the dense model")
    dense = accuracy(loaded.model)
    done = 1
    progress(callbacks, "sensitivity", done, total)
    rows = []
    for b in range(base.depth):
        for f in fracs:
            check(cancel)
            plan = sweep_plan(base, scores, scope, b, f)
            kept = plan.kept(b)["heads" if scope == "heads" else "mlp"]
            # nothing removed (25 % of 3 heads): the surgery would give the dense logits bit for bit, so the
            # dense figures stand and the evaluation is saved
            point = dense if plan.is_dense else accuracy(apply_plan(copy.deepcopy(loaded.model), plan).eval())
            rows.append(Row(b, f, units_of(base, scope, b), kept, point))
            done += 1
            progress(callbacks, "sensitivity", done, total, block=b, fraction=f)
    return SensitivityResult(scope, criterion, fracs, dense, tuple(rows))
