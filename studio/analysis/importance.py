"""Importance of every head, head dim, MLP neuron and embedding channel of a timm ViT, by several criteria.

Criteria (registered in :data:`CRITERIA`, so a new one never edits this file):

- ``l1`` / ``l2``: torch-pruning's ``GroupMagnitudeImportance(p)``;
- ``taylor``: torch-pruning's ``GroupTaylorImportance`` (Molchanov et al. 2019; the score Isomorphic pruning ranks)
  with calibration gradients summed over the batches, as the Isomorphic reference accumulates them;
- ``taylor2``: SAViT's gate score ``(∂L/∂g)²`` averaged over batches (heads, MLP neurons, embedding channels);
- ``ablation``: the increase of the calibration loss when one head is removed (its ``proj`` input zeroed) — the
  ground truth the other criteria are compared with (Spearman rank correlation over all heads).

The grouped criteria score whole dependency groups, not single layers: a head or head dim is scored on the ``qkv``
rows of q, k and v together with the matching ``proj`` columns, an MLP neuron on ``fc1`` row + ``fc2`` column, an
embedding channel on everything that reads or writes the residual stream (patch embedding, tokens, every norm and
linear layer, the classifier input). Scores come straight from torch-pruning's importance objects on its
dependency groups, computed on the studio's one grouping (:func:`studio.analysis.groups.torch_pruning_scores`,
checked against torch-pruning's DependencyGraph), so the ``taylor`` heat map shows exactly the numbers Isomorphic
pruning ranks. Heads score as the mean of their channels, head dims as the mean over heads (how
torch-pruning ranks heads and head dims). Per-unit scores are normalised by their group's mean (torch-pruning's
default), so blocks are comparable.

The module also holds what the studio's Importance page needs and must not compute itself: rank bins of MLP
neurons, the units a plan removes (the overlay), plan edits (keep / drop a head or a bin of neurons), plans of each
method at a MACs budget with each method's calibration work done once (:class:`MethodPlanner`), and one run that
applies a plan and measures it (:func:`run_plan`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .. import memory
from ..data import DataSpec
from ..errors import StudioError
from ..events import Callback, CancelToken, check, emit, progress
from ..load import load_model
from ..models import LoadedModel, ModelSpec
from ..plan import BaseArch, BlockPlan, PrunePlan
from ..registry import Registry
from ..surgery import check_fits
from .criteria import (
    Matrix,
    UnitScores,
    accumulate_gradients,
    batch_sizes,
    calibration_batches,
    largest_batch,
    make_importance,
    micro_batches,
)
from .gate_scores import savit_scores
from .groups import torch_pruning_scores

Batch = tuple[torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ImportanceResult:
    """Scores of every criterion asked for, and each one's rank correlation with the ablation ground truth.

    ``correlation[c]`` is Spearman's ρ between criterion ``c``'s head scores and the ablation Δloss over all
    heads of all blocks (None without ablation, or when either is constant).
    """

    base: BaseArch
    scores: tuple[UnitScores, ...]
    correlation: dict[str, float | None]
    batches: int
    samples: int

    @property
    def criteria(self) -> list[str]:
        return [s.criterion for s in self.scores]

    def get(self, criterion: str) -> UnitScores:
        for s in self.scores:
            if s.criterion == criterion:
                return s
        raise StudioError(f"Criterion '{criterion}' was not computed; computed: {', '.join(self.criteria)}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.to_dict(),
            "criteria": self.criteria,
            "scores": {s.criterion: s.to_dict() for s in self.scores},
            "correlation": dict(self.correlation),
            "batches": self.batches,
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImportanceResult:
        return cls(
            base=BaseArch.from_dict(d["base"]),
            scores=tuple(UnitScores.from_dict(d["scores"][c]) for c in d["criteria"]),
            correlation=dict(d.get("correlation") or {}),
            batches=int(d["batches"]),
            samples=int(d["samples"]),
        )


# ------------------------------------------------------------------------------------------------ criteria
CriterionFn = Callable[..., UnitScores]


@dataclass(frozen=True)
class Criterion:
    """A registered importance criterion: ``fn(loaded, batches, *, seed, callbacks, cancel) -> UnitScores``.

    The one registry of criteria: the Importance analysis and page, the sensitivity sweep and the methods that
    rank through torch-pruning (Isomorphic's ``--importance``: the criteria with ``torch_pruning`` set, ranked by
    that torch-pruning importance on the same dependency groups) all read it.
    """

    name: str
    fn: CriterionFn
    summary: str
    needs_data: bool = True
    torch_pruning: str | None = None  # the torch-pruning importance giving the same grouped score


CRITERIA: Registry[Criterion] = Registry("importance criterion")


def _grouped(
    loaded: LoadedModel, criterion: str, importance: str, grads: Mapping[str, torch.Tensor] | None
) -> UnitScores:
    """Scores from torch-pruning's ``importance`` on the model's dependency groups."""
    t0 = time.time()
    g = torch_pruning_scores(loaded.model, importance, grads)
    return UnitScores.of_tensors(
        criterion,
        heads=g.heads,
        head_dims=g.head_dims,
        mlp=g.mlp,
        embed=g.embed,
        seconds=time.time() - t0,
    )


def _magnitude(p: int) -> CriterionFn:
    def fn(loaded: LoadedModel, batches: Sequence[Batch], **_: Any) -> UnitScores:
        return _grouped(loaded, f"l{p}", f"l{p}", None)

    return fn


def random_criterion(loaded: LoadedModel, batches: Sequence[Batch], *, seed: int = 0, **_: Any) -> UnitScores:
    """Seeded random scores of every unit (torch-pruning's RandomImportance): the baseline a criterion beats."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _grouped(loaded, "random", "random", None)


def taylor_criterion(
    loaded: LoadedModel,
    batches: Sequence[Batch],
    *,
    micro_batch: int = 0,
    shared: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    **_: Any,
) -> UnitScores:
    """torch-pruning's GroupTaylorImportance with gradients summed over ``batches`` (taken from ``taylor2``'s
    backward passes when it ran first in the same analysis: the same gradients, one pass over the data)."""
    t0 = time.time()
    grads = (shared or {}).get("weight_grads") or accumulate_gradients(
        loaded.model,
        batches,
        micro_batch=micro_batch,
        base=loaded.base,
        callbacks=callbacks,
        cancel=cancel,
    )
    s = _grouped(loaded, "taylor", "taylor", grads)
    return UnitScores("taylor", s.heads, s.head_dims, s.mlp, s.embed, time.time() - t0)


def taylor2_criterion(
    loaded: LoadedModel,
    batches: Sequence[Batch],
    *,
    seed: int = 0,
    micro_batch: int = 0,
    shared: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    **_: Any,
) -> UnitScores:
    """SAViT's squared gate gradients (no Hessian-vector products: they only matter for SAViT's allocation)."""
    t0 = time.time()
    s = savit_scores(
        loaded.model,
        loaded.base,
        batches,
        hvp_every=0,
        seed=seed,
        micro_batch=micro_batch,
        weight_grads=(shared or {}).get("weight_grads"),
        callbacks=callbacks,
        cancel=cancel,
    )
    return UnitScores("taylor2", heads=s.heads, mlp=s.mlp, embed=s.embed, seconds=time.time() - t0)


def _stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tokens entering the first block (timm's ``forward_features`` up to the blocks)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def _head(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Class logits from the last block's tokens (distilled DeiT: the mean of its two heads in eval mode)."""
    out = model.forward_head(model.norm(tokens))
    return (out[0] + out[1]) / 2 if isinstance(out, tuple | list) else out


@torch.inference_mode()
def head_ablation(
    loaded: LoadedModel,
    batches: Sequence[Batch],
    *,
    samples: int = 0,
    micro_batch: int = 0,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> tuple[Matrix, float]:
    """Δ(mean cross-entropy) when each head alone is removed, and the unablated loss, over the first
    ``samples`` images of ``batches`` (0: all).

    A head is removed by zeroing its ``d`` columns of the ``proj`` input — what pruning it does (its q, k, v
    rows no longer matter), on a copy of the model. The tokens entering block ``l`` are computed once and
    shared by all of its heads, and several heads of a block are ablated in one pass by stacking masked
    copies of the images along the batch (up to the forward micro-batch), so the result equals one pass per
    head at about half of its work on a 12-block model.
    """
    model = copy.deepcopy(loaded.model).eval()
    device = next(model.parameters()).device
    blocks = list(model.blocks)
    active: dict[int, torch.Tensor] = {}  # block index -> per-image channel mask of the pass in flight

    def masker(i: int):
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            mask = active.get(i)
            return args if mask is None else (args[0] * mask, *args[1:])

        return hook

    for i, blk in enumerate(blocks):
        blk.attn.proj.register_forward_pre_hook(masker(i))
    # images in one stacked pass (copies x images): bounded by the activation budget, not by the batch
    widest = largest_batch(batches) * max(blk.attn.num_heads for blk in blocks)
    mb = micro_batch or memory.micro_batch(loaded.base, widest, "forward", device)
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    left = samples if samples > 0 else None
    for x, y in batches:
        x, y = x.to(device), torch.as_tensor(y).to(device).long()
        if left is not None:
            x, y, left = x[:left], y[:left], left - len(x[:left])
        for xc, yc, _ in micro_batches(x, y, mb):
            chunks.append((xc, yc))
        if left == 0:
            break
    heads = [blk.attn.num_heads for blk in blocks]
    sums = [torch.zeros(h, dtype=torch.float64) for h in heads]
    base_sum, n = 0.0, 0
    todo, done = len(chunks) * sum(heads), 0
    for xc, yc in chunks:
        B = len(yc)
        tokens = _stem(model, xc)
        for i, blk in enumerate(blocks):
            H, d = heads[i], blk.attn.head_dim
            per = max(1, mb // B)  # heads ablated in one stacked pass
            for first in range(0, H, per):
                check(cancel)
                hs = list(range(first, min(H, first + per)))
                mask = torch.ones(len(hs), 1, H * d, device=device, dtype=tokens.dtype)
                for k, h in enumerate(hs):
                    mask[k, ..., h * d : (h + 1) * d] = 0
                active[i] = mask.repeat_interleave(B, dim=0)
                t = tokens.repeat(len(hs), 1, 1)
                for b in blocks[i:]:
                    t = b(t)
                active.pop(i)
                ce = F.cross_entropy(_head(model, t).float(), yc.repeat(len(hs)), reduction="none")
                sums[i][hs] += ce.view(len(hs), B).sum(1).double().cpu()
                done += len(hs)
                progress(callbacks, "head ablation", done, todo)
            tokens = blk(tokens)
        base_sum += float(F.cross_entropy(_head(model, tokens).float(), yc, reduction="sum"))
        n += B
    n = max(n, 1)
    base = base_sum / n
    return tuple(tuple(float(v) / n - base for v in s) for s in sums), base


def ablation_criterion(
    loaded: LoadedModel,
    batches: Sequence[Batch],
    *,
    ablation_samples: int = 0,
    micro_batch: int = 0,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    **_: Any,
) -> UnitScores:
    t0 = time.time()
    heads, _ = head_ablation(
        loaded,
        batches,
        samples=ablation_samples,
        micro_batch=micro_batch,
        callbacks=callbacks,
        cancel=cancel,
    )
    return UnitScores("ablation", heads=heads, seconds=time.time() - t0)


CRITERIA.add(
    "l1",
    Criterion(
        "l1", _magnitude(1), "L1 norm of each unit's grouped weights", needs_data=False, torch_pruning="l1"
    ),
)
CRITERIA.add(
    "l2",
    Criterion(
        "l2", _magnitude(2), "L2 norm of each unit's grouped weights", needs_data=False, torch_pruning="l2"
    ),
)
CRITERIA.add(
    "taylor",
    Criterion(
        "taylor", taylor_criterion, "grouped Taylor |w·g| (torch-pruning, Isomorphic)", torch_pruning="taylor"
    ),
)
CRITERIA.add(
    "random",
    Criterion(
        "random",
        random_criterion,
        "seeded random scores (the baseline)",
        needs_data=False,
        torch_pruning="random",
    ),
)
CRITERIA.add("taylor2", Criterion("taylor2", taylor2_criterion, "SAViT gate score (∂L/∂g)²"))
CRITERIA.add(
    "ablation", Criterion("ablation", ablation_criterion, "Δloss when one head is removed (ground truth)")
)
DEFAULT_CRITERIA = ("l1", "l2", "taylor", "taylor2", "ablation")


def grouped_criteria() -> tuple[str, ...]:
    """The criteria a torch-pruning pruner can rank with (Isomorphic's ``--importance`` choices)."""
    return tuple(n for n in CRITERIA.names() if CRITERIA.get(n).torch_pruning is not None)


def torch_pruning_name(criterion: str) -> str:
    """The torch-pruning importance criterion ``criterion`` ranks with (refused, listing the choices, for a
    criterion torch-pruning cannot rank by)."""
    tp_name = CRITERIA.get(criterion).torch_pruning
    if tp_name is None:
        raise StudioError(
            f"Criterion '{criterion}' cannot rank torch-pruning groups; use {', '.join(grouped_criteria())}."
        )
    return tp_name


def torch_pruning_importance(criterion: str) -> tp.importance.Importance:
    """The torch-pruning importance object criterion ``criterion`` ranks with."""
    return make_importance(torch_pruning_name(criterion))


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None if either side is constant."""
    from scipy.stats import spearmanr

    if len(a) != len(b) or len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    r = spearmanr(a, b).statistic
    return None if r is None or math.isnan(float(r)) else float(r)


def compute_importance(
    loaded: LoadedModel,
    batches: Sequence[Batch],
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    *,
    seed: int = 0,
    micro_batch: int = 0,
    ablation_samples: int = 0,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> ImportanceResult:
    """Scores of ``criteria`` for ``loaded``'s model over the calibration ``batches`` (model never changed).

    ``micro_batch`` bounds the images in one pass (0: chosen within the activation budget); ablation runs on
    the first ``ablation_samples`` images only when given (it costs about half a forward pass per head).
    """

    if loaded.plan is not None and not loaded.plan.is_dense:
        raise StudioError(
            "Importance is computed on an unpruned model; load the base checkpoint of this export."
        )
    check_fits(loaded.model, loaded.base)
    names = list(dict.fromkeys(criteria))
    if not names:
        raise StudioError(f"Give at least one criterion: {', '.join(CRITERIA.names())}.")
    crits = [CRITERIA.get(n) for n in names]
    if any(c.needs_data for c in crits) and not batches:
        raise StudioError("These criteria need calibration data: give --data and --batches > 0.")
    shared: dict[str, Any] = {}
    if {"taylor", "taylor2"} <= set(names):
        # one backward pass per batch serves both: taylor2 runs first and leaves ∂L/∂w for taylor
        shared["weight_grads"] = {}
        crits.sort(key=lambda c: c.name != "taylor2")
    by: dict[str, UnitScores] = {}
    for c in crits:
        check(cancel)
        emit(callbacks, "log", message=f"importance: {c.name}")
        by[c.name] = c.fn(
            loaded,
            batches,
            seed=seed,
            micro_batch=micro_batch,
            ablation_samples=ablation_samples,
            shared=shared,
            callbacks=callbacks,
            cancel=cancel,
        )
    scores = [by[n] for n in names]
    corr: dict[str, float | None] = {}
    if "ablation" in by:
        truth = [v for r in by["ablation"].heads for v in r]
        corr = {
            s.criterion: spearman([v for r in s.heads for v in r], truth)
            for s in scores
            if s.criterion != "ablation"
        }
    return ImportanceResult(
        base=loaded.base,
        scores=tuple(scores),
        correlation=corr,
        batches=len(batches),
        samples=sum(batch_sizes(batches)),
    )


@dataclass(frozen=True)
class ImportanceSpec:
    """What ``analyze importance`` computes: model, calibration data and criteria."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec | None = field(default_factory=lambda: DataSpec("demo"))
    criteria: tuple[str, ...] = DEFAULT_CRITERIA
    batches: int = 4
    batch_size: int = 64
    split: str = "train"
    seed: int = 0
    micro_batch: int = 0  # images per pass; 0: the largest within the activation budget
    ablation_samples: int = 0  # ablate on the first N calibration images only; 0: all

    @property
    def kind(self) -> str:
        return "importance"

    def validate(self) -> None:
        """Refuse an unknown criterion or a calibration the criteria cannot use, before any work starts."""
        if not self.criteria:
            raise StudioError(f"Give at least one criterion: {', '.join(CRITERIA.names())}.")
        for n in self.criteria:
            CRITERIA.get(n)
        for name in ("batches", "batch_size", "micro_batch", "ablation_samples", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "batch_size" else 0):
                low = 1 if name == "batch_size" else 0
                raise StudioError(f"--{name.replace('_', '-')} must be a whole number ≥ {low}, got {v!r}.")
        if self.split not in ("train", "val", "test"):
            raise StudioError(f"The calibration split must be train, val or test, not {self.split!r}.")
        needs = [n for n in self.criteria if CRITERIA.get(n).needs_data]
        if needs and (self.data is None or self.batches == 0):
            raise StudioError(
                f"Criteria {', '.join(needs)} need calibration data: give --data and --batches ≥ 1 "
                "(or keep only l1, l2)."
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImportanceSpec:
        try:
            return cls(
                model=ModelSpec.from_dict(d.get("model") or {}),
                data=None if d.get("data") is None else DataSpec.from_dict(d["data"]),
                criteria=tuple(str(c) for c in d.get("criteria", DEFAULT_CRITERIA)),
                batches=int(d.get("batches", 4)),
                batch_size=int(d.get("batch_size", 64)),
                split=str(d.get("split", "train")),
                seed=int(d.get("seed", 0)),
                micro_batch=int(d.get("micro_batch", 0)),
                ablation_samples=int(d.get("ablation_samples", 0)),
            )
        except (TypeError, ValueError) as e:
            raise StudioError(f"The importance spec is malformed ({e}).") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "importance",
            "micro_batch": self.micro_batch,
            "ablation_samples": self.ablation_samples,
            "model": self.model.to_dict(),
            "data": None if self.data is None else self.data.to_dict(),
            "criteria": list(self.criteria),
            "batches": self.batches,
            "batch_size": self.batch_size,
            "split": self.split,
            "seed": self.seed,
        }


def calibration(
    loaded: LoadedModel, data: DataSpec | None, split: str, n: int, batch_size: int, seed: int = 0
) -> list[Batch]:
    """``n`` seeded batches of a split (none without data)."""
    if data is None or n <= 0:
        return []
    if batch_size < 1:
        raise StudioError(f"--batch-size must be at least 1, got {batch_size}.")
    return calibration_batches(loaded, data, split, n, batch_size, seed)


def run_importance(
    spec: ImportanceSpec,
    *,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> ImportanceResult:
    """Load (or reuse) the model, draw the calibration batches and score every criterion of ``spec``."""
    for n in spec.criteria:
        CRITERIA.get(n)
    loaded = loaded or load_model(spec.model)
    batches = calibration(loaded, spec.data, spec.split, spec.batches, spec.batch_size, spec.seed)
    return compute_importance(
        loaded,
        batches,
        spec.criteria,
        seed=spec.seed,
        micro_batch=spec.micro_batch,
        ablation_samples=spec.ablation_samples,
        callbacks=callbacks,
        cancel=cancel,
    )


# ----------------------------------------------------------------------------------------- page helpers
def neuron_bins(mlp: Matrix, n_bins: int) -> tuple[list[list[float]], list[list[tuple[int, ...]]]]:
    """Rank bins of each block's MLP neurons: bin 0 holds the highest-scored ``1/n_bins`` of the block.

    Returns the mean score of each (block, bin) and the neuron indices in it. Neuron indices carry no order,
    so the heat map bins by rank: a row shows how a block's importance is spread.
    """
    if n_bins < 1:
        raise StudioError("Use at least one neuron bin.")
    values, members = [], []
    for row in mlp:
        t = torch.tensor(row, dtype=torch.float64)
        order = torch.argsort(-t, stable=True)
        chunks = [c for c in torch.tensor_split(order, min(n_bins, len(row))) if len(c)]
        members.append([tuple(sorted(int(i) for i in c)) for c in chunks])
        values.append([float(t[c].mean()) for c in chunks])
    return values, members


def cells(z: Sequence[Sequence[float]]) -> tuple[list[int], list[int], list[float]]:
    """Column, row and value of every cell of a (block × unit) score matrix (the heat map's click targets)."""
    pts = [(j, i, float(v)) for i, r in enumerate(z) for j, v in enumerate(r)]
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def marked(mask: Sequence[Sequence[bool]]) -> tuple[list[int], list[int]]:
    """Column and row of every true cell of a (block × unit) mask (the heat map's × overlay)."""
    return [j for r in mask for j, v in enumerate(r) if v], [i for i, r in enumerate(mask) for v in r if v]


def removed_heads(plan: PrunePlan | None, base: BaseArch) -> list[list[bool]]:
    """For each block and head, whether ``plan`` removes it (a removed block removes all its heads)."""
    out = []
    for i in range(base.depth):
        H = base.num_heads[i]
        b = None if plan is None else plan.block(i)
        if plan is not None and b is None:
            out.append([True] * H)
        else:
            kept = set(range(H)) if b is None or b.heads is None else set(b.heads)
            out.append([h not in kept for h in range(H)])
    return out


def removed_fraction(
    plan: PrunePlan | None, base: BaseArch, members: list[list[tuple[int, ...]]]
) -> list[list[float]]:
    """For each block and neuron bin, the fraction of its neurons ``plan`` removes."""
    out = []
    for i, bins in enumerate(members):
        b = None if plan is None else plan.block(i)
        if plan is not None and b is None:
            out.append([1.0] * len(bins))
            continue
        kept = None if b is None or b.mlp is None else set(b.mlp)
        out.append([0.0 if kept is None else sum(n not in kept for n in m) / max(len(m), 1) for m in bins])
    return out


def _edited(plan: PrunePlan, block: BlockPlan, note: str) -> PrunePlan:
    blocks = tuple(block if b.index == block.index else b for b in plan.blocks)
    edits = [*plan.params.get("edits", []), note]
    method = plan.method if plan.method != "dense" else "manual"
    return plan.with_(
        blocks=blocks, method=method, params={**plan.params, "edits": edits}, summary={}
    ).validate()


def _block_of(plan: PrunePlan, index: int) -> BlockPlan:
    b = plan.block(index)
    if b is None:
        raise StudioError(
            f"Block {index} is removed by this plan; restore the block before editing its units."
        )
    return b


def set_head(plan: PrunePlan, block: int, head: int, keep: bool) -> PrunePlan:
    """``plan`` with head ``head`` of ``block`` kept or dropped (the last head of a block cannot be dropped)."""
    b = _block_of(plan, block)
    H = plan.base.num_heads[block]
    if not 0 <= head < H:
        raise StudioError(f"Block {block} has heads 0..{H - 1}; there is no head {head}.")
    kept = set(range(H)) if b.heads is None else set(b.heads)
    kept = kept | {head} if keep else kept - {head}
    if not kept:
        raise StudioError(f"Head {head} is the last one of block {block}: a block keeps at least one head.")
    heads = None if len(kept) == H else tuple(sorted(kept))
    new = BlockPlan(b.index, heads, b.head_dims, b.mlp, b.attn_in, b.attn_out, b.mlp_in, b.mlp_out)
    return _edited(plan, new, f"block {block} head {head} {'keep' if keep else 'drop'}")


def set_neurons(plan: PrunePlan, block: int, neurons: Sequence[int], keep: bool) -> PrunePlan:
    """``plan`` with MLP ``neurons`` of ``block`` kept or dropped (a block keeps at least one neuron)."""
    b = _block_of(plan, block)
    M = plan.base.mlp_hidden[block]
    bad = [n for n in neurons if not 0 <= n < M]
    if bad:
        raise StudioError(f"Block {block} has MLP neurons 0..{M - 1}; {bad[0]} is out of range.")
    kept = set(range(M)) if b.mlp is None else set(b.mlp)
    kept = kept | set(neurons) if keep else kept - set(neurons)
    if not kept:
        raise StudioError(f"Dropping these neurons empties the MLP of block {block}; keep at least one.")
    mlp = None if len(kept) == M else tuple(sorted(kept))
    new = BlockPlan(b.index, b.heads, b.head_dims, mlp, b.attn_in, b.attn_out, b.mlp_in, b.mlp_out)
    return _edited(plan, new, f"block {block} {len(neurons)} MLP neurons {'keep' if keep else 'drop'}")


def toggle_head(plan: PrunePlan, block: int, head: int) -> PrunePlan:
    """Keep a removed head, or drop a kept one (a click on the heat map)."""
    return set_head(plan, block, head, keep=removed_heads(plan, plan.base)[block][head])


def unit_labels(base: BaseArch, block: int, members: list[list[tuple[int, ...]]] | None) -> list[str]:
    """The units of ``block`` an edit can address: ``head h`` and, with neuron bins, ``neuron bin j``."""
    heads = [f"head {h}" for h in range(base.num_heads[block])]
    return heads + ([f"neuron bin {j}" for j in range(len(members[block]))] if members else [])


def edit_unit(
    plan: PrunePlan, block: int, unit: str, keep: bool, members: list[list[tuple[int, ...]]] | None = None
) -> PrunePlan:
    """Apply a keep/drop of one labelled unit (see :func:`unit_labels`) to ``plan``."""
    kind, _, idx = unit.rpartition(" ")
    if kind == "head":
        return set_head(plan, block, int(idx), keep)
    if kind == "neuron bin" and members:
        return set_neurons(plan, block, members[block][int(idx)], keep)
    raise StudioError(f"Unknown unit '{unit}': use 'head N' or 'neuron bin N'.")
