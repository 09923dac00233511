"""P3B, "Pruning by Block Benefit" (Glandorf et al., arXiv 2506.23675): prune a ViT while fine-tuning it.

A *block* is one residual branch (Attention or MLP; 2L blocks). The method, as implemented here:

1. **Benefit** (:mod:`studio.analysis.block_benefit`): probe heads on detached features measure ΔΨ^c_b, ΔΨ^p_b,
   how much block b lowers the probe loss on the CLS token and on the patch tokens; averaged per window (the
   steps between two mask updates).
2. **Budget** (:func:`transform_benefits`, :class:`BlockBudget`, :func:`solve_keep_ratios`): per channel
   ``u = T·D/max D``, soft clamp ``v = softplus(1.4u) - softplus(1.4u - T)``, per kept parameter ``w = v/P^kept``,
   normalised by its mean, EMA with γ, blended ``I = α·I^c + (1-α)·I^p``; then the keep ratios κ_b solve
   ``Σ κ_b·W_b + W_non = (1 - prune_ratio)·(Σ W_b + W_non)`` with ``κ_b = clip(s·I_b, κ_min, 1)`` (water filling,
   solved exactly on the piecewise-linear curve), ramped linearly from 1 between the start and sparse epochs.
3. **Masks** (:class:`BranchGates`): gates on the attention input (LN1 output, C), the q/k/v head dims (one d_h
   mask shared by q, k, v and all heads: the head count never changes) and the attention output (C); on the MLP
   input (C), hidden units (4C) and output (C). Taylor scores ``(m·∂L/∂m)²`` summed over the window, rank-
   normalised per gate and weighted (attn_out 1.5, mlp_hid 0.75, mlp_out 1.5), ranked over the block; the
   threshold prunes the lowest-ranked elements until the block keeps κ_b(t)·W_b parameters; soft masks
   ``sigmoid(ln 9·(k - k* - ½)/(N·θ))`` over the rank position k sharpen as θ falls from 0.1 (sparse epoch) to 0
   (finalize epoch).
4. **Slicing** at the end of the finalize epoch: the hard masks become a :class:`~studio.plan.PrunePlan` with
   per-block residual read/write subsets and head dims, applied by :func:`studio.surgery.apply_plan`; the smaller
   model is then fine-tuned for the remaining epochs.

Everything runs inside :func:`studio.train.fit` as a hook (:class:`P3BPruner`), so checkpoints, exact resume and
cancel are the training loop's.

Where this differs from the reference code, deliberately (see research notes §2.11):
- Q2: gates are *not* in the optimizer by default (the reference lets AdamW move them between updates, which
  looks unintended); ``masks_in_optimizer=True`` mimics the reference.
- Q3: the masked model normalises LN1/LN2 over all C channels, the sliced one over the kept channels, so their
  outputs differ until the fine-tune phase repairs it (as in the reference); :class:`P3BPruner` has an
  ``exact_norm`` switch that makes the masked model compute LN over the kept channels (used by the parity test).
- Q6: if every block's benefit on a channel is ≤ 0, ``max D`` would flip signs; that channel then gives every
  block the same importance (uniform keep ratios if both channels are degenerate).
- ``zero_floor`` (default off, as the reference): on, a block whose benefit is ≤ 0 gets importance 0 on that
  channel, so with no EMA history it gets the minimum ratio. Off, the reference's soft clamp gives D = 0 the
  value 0.69 (of T = 10 for the top block), and dividing by the few parameters a nearly-emptied block still
  keeps pulls it back: the reactivation of lately converging blocks the paper builds on.
- Parameters are counted exactly (weights, biases, LN, LayerScale) for W_b, P^kept and the threshold; the
  reference's per-element estimate ignores biases. The threshold is the exact best count on the monotone
  kept-parameters curve, where the reference iterates a linearised estimate (≤ 30 times).
- Every gate keeps at least one element (the highest-ranked), because a plan cannot express an empty branch
  (the reference flags such a block ``skip_block``); a κ = 0 block therefore keeps a few dozen parameters.
- The soft-mask centre sits half a position after the last pruned element, so ``m ≥ 0.5`` keeps exactly the
  elements the threshold keeps.
- Models the masks cannot stand for are refused before any work (:func:`unit_refusals`): qk-norm, scale norms,
  non-LayerNorm pre-norms, and parallel blocks (ViT-22B's ``ParallelScalingBlock``: no residual stream between
  its attention and MLP branch for the benefit probes and the residual masks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from ..analysis.benefit_budget import (
    BlockBudget,
    BudgetSettings,
    solve_keep_ratios,
)
from ..analysis.block_benefit import (
    EPOCH_EVENT,
    FINAL_EVENT,
    BenefitMeter,
    BenefitProbes,
    FeatureTaps,
    block_names,
)
from ..distributed import DistContext, average_
from ..errors import StudioError
from ..evaluate import logits_of
from ..events import Callback, emit
from ..families import mlp_hidden, mlp_layout
from ..parallel import ParallelBlock
from ..plan import BaseArch, BlockPlan, PrunePlan
from ..surgery import check_supported
from . import METHODS, Budget, Method, Option

LN9 = math.log(9.0)
GATES = {"attn": ("attn_in", "qkv", "attn_out"), "mlp": ("mlp_in", "mlp_hid", "mlp_out")}
DEFAULT_GATE_WEIGHTS = "attn_out:1.5,mlp_hid:0.75,mlp_out:1.5"


def ramp(kappa: np.ndarray, step: int, start: int, sparse: int) -> np.ndarray:
    """Keep ratio applied at ``step``: ``1 - (1 - κ)·min(1, (t + 1 - t_start)/(t_sparse - t_start))``."""
    frac = 1.0 if sparse <= start else min(1.0, max(0.0, (step + 1 - start) / (sparse - start)))
    return 1.0 - (1.0 - np.asarray(kappa, dtype=np.float64)) * frac


def theta_at(step: int, sparse: int, final: int, tau_max: float = 0.1, tau_min: float = 0.0) -> float:
    """Soft-mask temperature: ``τ_max`` until the sparse step, then linear to ``τ_min`` at the final step."""
    if step < sparse:
        return tau_max
    if final <= sparse:
        return tau_min
    return tau_max + (tau_min - tau_max) * min(1.0, (step - sparse) / (final - sparse))


def soft_mask(positions: np.ndarray, pruned: int, total: int, theta: float) -> np.ndarray:
    """Mask value of the element at 1-based rank ``positions`` when the lowest ``pruned`` of ``total`` go.

    ``sigmoid(ln 9·(k - k* - ½)/(N·θ))``: 0.5 half-way between the last pruned and the first kept element, 0.9
    about N·θ positions later; θ = 0 gives the hard step.
    """
    k = np.asarray(positions, dtype=np.float64)
    if theta <= 0:
        return (k > pruned).astype(np.float64)
    z = LN9 * (k - pruned - 0.5) / (total * theta)
    return 1.0 / (1.0 + np.exp(-z))


def parse_gate_weights(text: str) -> dict[str, float]:
    """``"attn_out:1.5,mlp_hid:0.75"`` -> weights per gate (others 1.0)."""
    out = {g: 1.0 for gates in GATES.values() for g in gates}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, value = item.partition(":")
        if not sep or name.strip() not in out:
            raise StudioError(f"Gate weight {item!r} is not NAME:VALUE with NAME one of {', '.join(out)}.")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise StudioError(f"Gate weight {item!r}: {value!r} is not a number.") from None
    return out


def parse_keep_ratios(text: str | None, blocks: int) -> np.ndarray | None:
    """Hand-set keep ratios: ``blocks`` comma-separated values in [0, 1] (attn0, mlp0, attn1, ...)."""
    if not text:
        return None
    try:
        vals = np.array([float(v) for v in text.split(",") if v.strip()], dtype=np.float64)
    except ValueError:
        raise StudioError(f"Keep ratios must be comma-separated numbers, got {text!r}.") from None
    if len(vals) != blocks or ((vals < 0) | (vals > 1)).any():
        raise StudioError(
            f"Keep ratios need {blocks} values in [0, 1] (attn0, mlp0, attn1, mlp1, ...), got {len(vals)}."
        )
    return vals


# ================================================================================================ gates
@dataclass(frozen=True)
class BranchCost:
    """Exact parameters of a branch as a function of its kept (in, mid, out) counts.

    ``params = c_in·a + c_mid·d + c_out·b + c_in_mid·a·d + c_mid_out·d·b`` with a, d, b the kept input channels,
    middle units (head dims / hidden neurons) and output channels.
    """

    c_in: int
    c_mid: int
    c_out: int
    c_in_mid: int
    c_mid_out: int

    def __call__(self, a: Any, d: Any, b: Any) -> Any:
        return (
            self.c_in * a + self.c_mid * d + self.c_out * b + self.c_in_mid * a * d + self.c_mid_out * d * b
        )


def _per_channel(module: nn.Module, width: int) -> int:
    return sum(p.numel() for p in module.parameters()) // width


def _gate_refusal(i: int, blk: nn.Module) -> str | None:
    """Why P3B's soft masks cannot stand for the pruned block ``i``, or None.

    A mask multiplies a unit's output; a norm right after it (qk-norm on q/k, an attention-output or MLP-hidden
    scale norm) renormalises the masked vector, so the masked model would not compute what the sliced one does.
    The paper defines no rule for these norms, so the studio refuses them rather than train on a different model.
    """
    if not isinstance(blk.norm1, nn.LayerNorm) or not isinstance(blk.norm2, nn.LayerNorm):
        return (
            f"P3B cannot gate the residual channels of block {i} exactly: its masks need LayerNorm pre-norms, "
            f"the block uses {type(blk.norm1).__name__}. Prune this model with another method (Isomorphic, "
            "SAViT, the baselines)."
        )
    for module, what in ((blk.attn.q_norm, "q/k (qk_norm)"), (blk.attn.norm, "attention output (scale_attn_norm)"),
                         (blk.mlp.norm, "MLP hidden units (scale_mlp_norm)")):  # fmt: skip
        if not isinstance(module, nn.Identity):
            return (
                f"P3B cannot gate a {what} that a norm follows (block {i}): the norm would undo its soft masks. "
                "Prune this model with another method (Isomorphic, SAViT, the baselines), or build it without "
                "that norm."
            )
    return None


def unit_refusals(model: nn.Module) -> dict[str, str]:
    """:attr:`Method.unit_refusals` of P3B: its gates prune every unit at once, so the first block they cannot
    mask exactly refuses them all."""
    for i, blk in enumerate(getattr(model, "blocks", ())):
        if isinstance(blk, ParallelBlock):
            why: str | None = (
                f"P3B cannot gate the parallel block {i} (ViT-22B's ParallelScalingBlock): its benefit probes and "
                "residual masks need the stream between the attention and the MLP branch, which a parallel block "
                "does not have. Prune this model with another method (Isomorphic, SAViT, SLS, the baselines)."
            )
        elif getattr(getattr(blk, "attn", None), "rope", None) is not None:
            why = (
                f"P3B cannot gate block {i}'s head dims exactly: EVA-02's rotary embedding (RoPE) rotates them in "
                "pairs, so a masked dim is not a removed one. Prune this model with another method (Isomorphic, "
                "SAViT, SLS, the baselines)."
            )
        elif type(blk) is not Block:
            why = f"Block {i} is already pruned ({type(blk).__name__}); P3B starts from an unpruned model."
        else:
            why = _gate_refusal(i, blk)
        if why is not None:
            return dict.fromkeys(("head_dims", "mlp", "residual"), why)
    return {}


def branch_costs(block: nn.Module, dim: int) -> tuple[BranchCost, BranchCost]:
    """(attention, MLP) cost functions of one timm ``Block`` (same counting as :func:`studio.costs.plan_cost`)."""
    attn, mlp = block.attn, block.mlp
    H, d = attn.num_heads, attn.head_dim
    ls1 = 1 if hasattr(block.ls1, "gamma") else 0
    ls2 = 1 if hasattr(block.ls2, "gamma") else 0
    qk_norm = _per_channel(attn.q_norm, d) + _per_channel(attn.k_norm, d)
    a = BranchCost(
        c_in=_per_channel(block.norm1, dim),
        # per head dim: q/k/v biases and qk-norms; an output norm (scale_attn_norm) has H channels per dim
        c_mid=(3 * H if attn.qkv.bias is not None else 0) + qk_norm + H * _per_channel(attn.norm, H * d),
        c_out=(1 if attn.proj.bias is not None else 0) + ls1,
        c_in_mid=3 * H,
        c_mid_out=H,
    )
    layout, M = mlp_layout(mlp), mlp_hidden(mlp)
    m = BranchCost(
        c_in=_per_channel(block.norm2, dim),
        c_mid=layout.biases(mlp) + _per_channel(mlp.norm, M),
        c_out=(1 if mlp.fc2.bias is not None else 0) + ls2,
        c_in_mid=layout.copies(mlp),  # a GLU neuron owns two input rows
        c_mid_out=1,
    )
    return a, m


class BranchGates:
    """The three gates of one branch (block): mask values, Taylor sums, threshold and its hooks."""

    def __init__(
        self, kind: str, layer: int, sizes: tuple[int, int, int], cost: BranchCost, device: torch.device
    ) -> None:
        self.kind, self.layer, self.sizes, self.cost = kind, layer, sizes, cost
        self.names = GATES[kind]
        self.masks = {n: torch.ones(s, device=device, requires_grad=True) for n, s in zip(self.names, sizes)}
        # Taylor sums stay on the device (no per-step host sync); float64 so long windows do not lose precision
        self.taylor = {
            n: torch.zeros(s, dtype=torch.float64, device=device) for n, s in zip(self.names, sizes)
        }
        self.taylor_prev = {n: torch.zeros_like(t) for n, t in self.taylor.items()}
        self.count = 0
        self.count_prev = 0

    @property
    def full_params(self) -> int:
        return int(self.cost(*self.sizes))

    def hard(self, name: str) -> torch.Tensor:
        return self.masks[name].detach() >= 0.5

    def kept_counts(self) -> tuple[int, int, int]:
        return tuple(int(self.hard(n).sum()) for n in self.names)  # type: ignore[return-value]

    def kept_params(self) -> int:
        return int(self.cost(*self.kept_counts()))

    def max_element_params(self) -> int:
        """Parameters of the costliest single element at full width (the threshold's resolution)."""
        a, d, b = self.sizes
        full = self.cost(a, d, b)
        return int(
            max(full - self.cost(a - 1, d, b), full - self.cost(a, d - 1, b), full - self.cost(a, d, b - 1))
        )

    def accumulate(self) -> None:
        """Add ``(m·∂L/∂m)²`` of the last backward to the window's Taylor sums."""
        for n, m in self.masks.items():
            if m.grad is not None:
                self.taylor[n] += (m.detach() * m.grad.detach()).double().pow(2)
        self.count += 1

    def close_window(self) -> None:
        for n in self.names:
            self.taylor_prev[n] = self.taylor[n]
            self.taylor[n] = torch.zeros_like(self.taylor_prev[n])
        self.count_prev, self.count = self.count, 0

    def scores(self, *, merge_prev: bool = False) -> dict[str, np.ndarray]:
        n = self.count + (self.count_prev if merge_prev else 0)
        out = {}
        for g in self.names:
            s = self.taylor[g] + (self.taylor_prev[g] if merge_prev else 0)
            out[g] = (s / max(1, n)).cpu().numpy()
        return out

    def set_masks(
        self, target: float, theta: float, weights: Mapping[str, float], *, merge_prev: bool = False
    ) -> int:
        """Prune the lowest-ranked elements so the branch keeps about ``target`` parameters; returns the count.

        Ranks: ``ρ = σ_g·(rank within gate + 1)/n_g``, ascending over the block's concatenated gates; the best
        element of each gate is never pruned. The pruned count minimises ``|kept(k) - target|`` exactly.
        """
        scores = self.scores(merge_prev=merge_prev)
        rho, gate_id, index, protected = [], [], [], []
        for g_i, g in enumerate(self.names):
            s = scores[g]
            order = np.lexsort((np.arange(len(s)), s))  # stable: ties by index
            rank = np.empty(len(s), dtype=np.int64)
            rank[order] = np.arange(len(s))
            rho.append(weights.get(g, 1.0) * (rank + 1) / len(s))
            gate_id.append(np.full(len(s), g_i))
            index.append(np.arange(len(s)))
            protected.append(rank == len(s) - 1)
        rho_a, gid, idx, prot = (np.concatenate(v) for v in (rho, gate_id, index, protected))
        order = np.lexsort((idx, gid, rho_a, prot))  # protected last, then by ρ, gate, index
        N = len(order)
        onehot = np.zeros((N + 1, 3), dtype=np.int64)
        onehot[np.arange(1, N + 1), gid[order]] = 1
        gone = np.cumsum(onehot, axis=0)  # gone[k, g]: elements of gate g among the k lowest
        limit = N - len(self.names) + 1  # k = 0 .. N - n_gates (protected stay)
        a, d, b = (self.sizes[g] - gone[:limit, g] for g in range(3))
        kept = self.cost(a.astype(np.float64), d.astype(np.float64), b.astype(np.float64))
        k_star = int(np.argmin(np.abs(kept - target)))  # kept is non-increasing: first minimum keeps more
        values = soft_mask(np.arange(1, N + 1), k_star, N, theta)
        with torch.no_grad():
            for g_i, g in enumerate(self.names):
                sel = gid[order] == g_i
                m = np.empty(self.sizes[g_i])
                m[idx[order][sel]] = values[sel]
                self.masks[g].copy_(torch.from_numpy(m).to(self.masks[g]))
        return k_star

    def kept_indices(self) -> dict[str, tuple[int, ...] | None]:
        """Hard-mask kept indices per gate (None: all kept)."""
        out: dict[str, tuple[int, ...] | None] = {}
        for n, s in zip(self.names, self.sizes):
            keep = torch.nonzero(self.hard(n)).flatten().tolist()
            out[n] = None if len(keep) == s else tuple(int(i) for i in keep)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()},
            "taylor": {n: t.cpu().clone() for n, t in self.taylor.items()},
            "taylor_prev": {n: t.cpu().clone() for n, t in self.taylor_prev.items()},
            "count": self.count,
            "count_prev": self.count_prev,
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for n, m in self.masks.items():
                m.copy_(sd["masks"][n].to(m))
        dev = next(iter(self.masks.values())).device
        self.taylor = {n: t.to(dev, torch.float64) for n, t in sd["taylor"].items()}
        self.taylor_prev = {n: t.to(dev, torch.float64) for n, t in sd["taylor_prev"].items()}
        self.count, self.count_prev = int(sd["count"]), int(sd["count_prev"])


def _gate_hook(mask: torch.Tensor, repeat: int = 1):
    def hook(_module: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        m = mask if repeat == 1 else mask.repeat(repeat)
        return out * m.to(out.dtype)

    return hook


def _norm_gate_hook(mask: torch.Tensor, exact: Any):
    """Gate on a LayerNorm output; with ``exact()`` true and a hard mask, LN statistics use the kept channels."""

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        if exact():
            keep = torch.nonzero(mask.detach() >= 0.5).flatten()
            if len(keep) < mask.numel():
                x = args[0].index_select(-1, keep)
                w = None if module.weight is None else module.weight.index_select(0, keep)
                b = None if module.bias is None else module.bias.index_select(0, keep)
                y = F.layer_norm(x, (len(keep),), w, b, module.eps)
                out = torch.zeros_like(out).index_copy(-1, keep, y.to(out.dtype))
        return out * mask.to(out.dtype)

    return hook


# ============================================================================================ schedule
@dataclass(frozen=True)
class Schedule:
    """Epochs of the run and the steps they mean (reference defaults 10 / 25 / 50 of a 50-epoch pruning run).

    The masks start updating at ``start_epoch``, κ reaches its target at ``sparse_epoch``, θ reaches 0 and the
    model is sliced at the end of epoch ``finalize_epoch - 1`` (after ``finalize_epoch`` epochs); the remaining
    ``epochs - finalize_epoch`` epochs fine-tune the sliced model.
    """

    epochs: int
    start_epoch: int
    sparse_epoch: int
    finalize_epoch: int
    steps_per_epoch: int
    steps_per_update: int

    @classmethod
    def for_run(
        cls,
        epochs: int,
        steps_per_epoch: int,
        *,
        start: int | None = None,
        sparse: int | None = None,
        finalize: int | None = None,
        steps_per_update: int | None = None,
        fractions: tuple[float, float, float] = (0.1, 0.25, 0.5),
    ) -> Schedule:
        """Scale the schedule with the run length (defaults: 10 %, 25 %, 50 % of the epochs); ~3 updates/epoch."""
        if epochs < 2:
            raise StudioError(
                "P3B needs at least 2 epochs (a pruning phase and the slicing); use --epochs ≥ 2."
            )
        f = finalize if finalize is not None else max(1, round(fractions[2] * epochs))
        s = sparse if sparse is not None else max(0, round(fractions[1] * epochs))
        t = start if start is not None else max(0, round(fractions[0] * epochs))
        s = min(s, f)
        t = min(t, s)
        k = steps_per_update if steps_per_update is not None else max(1, round(steps_per_epoch / 3))
        sched = cls(epochs, t, s, f, steps_per_epoch, k)
        sched.validate()
        return sched

    def validate(self) -> None:
        if not 0 <= self.start_epoch <= self.sparse_epoch <= self.finalize_epoch <= self.epochs:
            raise StudioError(
                "P3B schedule must satisfy 0 ≤ start ≤ sparse ≤ finalize ≤ epochs, got "
                f"{self.start_epoch} / {self.sparse_epoch} / {self.finalize_epoch} / {self.epochs}."
            )
        if self.finalize_epoch <= self.start_epoch:
            raise StudioError(
                "P3B's finalize epoch must come after its start epoch (no mask update otherwise)."
            )
        if self.steps_per_update < 1:
            raise StudioError("Steps per mask update must be at least 1.")

    @property
    def t_start(self) -> int:
        return self.start_epoch * self.steps_per_epoch

    @property
    def t_sparse(self) -> int:
        return self.sparse_epoch * self.steps_per_epoch

    @property
    def t_final(self) -> int:
        return self.finalize_epoch * self.steps_per_epoch

    def is_update(self, step: int) -> bool:
        """Whether the masks update after (0-based) step ``step``."""
        return self.t_start <= step < self.t_final and (step - self.t_start) % self.steps_per_update == (
            self.steps_per_update - 1
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "t_start": self.t_start, "t_sparse": self.t_sparse, "t_final": self.t_final}


# ============================================================================================== pruner
@dataclass(frozen=True)
class P3BSettings:
    """Everything P3B reads besides the schedule (CLI options of ``prune --method p3b``)."""

    prune_ratio: float = 0.5
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    tau_max: float = 0.1
    tau_min: float = 0.0
    gate_weights: str = DEFAULT_GATE_WEIGHTS
    keep_ratios: str | None = None
    patch_probe: str = "conv"
    probe_lr: float = 5e-4
    probe_weight_decay: float = 0.05
    masks_in_optimizer: bool = False
    label_smoothing: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["budget"] = self.budget.to_dict()
        return d


class P3BPruner:
    """The :func:`studio.train.fit` hook that measures block benefit and prunes with soft→hard masks.

    Installs taps and gate hooks on ``model`` (remove them with :meth:`remove`); ``finalize()`` turns the hard
    masks into a :class:`PrunePlan`.
    """

    def __init__(
        self,
        model: nn.Module,
        base: BaseArch,
        schedule: Schedule,
        settings: P3BSettings,
        *,
        callbacks: Sequence[Callback] = (),
        ctx: DistContext | None = None,
    ) -> None:
        """``ctx``: the torchrun group this rank belongs to (None: one process). Gates, probes and benefits sit
        outside the DDP model, so the pruner averages their gradients and benefits over the ranks itself,
        once per optimizer step: every rank then holds the same masks, κ and probes."""
        vit = check_supported(model)
        self.model, self.base, self.schedule, self.settings = vit, base, schedule, settings
        self.callbacks = list(callbacks)
        self.device = next(vit.parameters()).device
        self.weights = parse_gate_weights(settings.gate_weights)
        depth, C = len(vit.blocks), int(vit.embed_dim)
        self.names = block_names(depth)
        self.hand_kappa = parse_keep_ratios(settings.keep_ratios, 2 * depth)
        self.exact_norm = False
        self.branches: list[BranchGates] = []
        self._handles: list[Any] = []
        for i, blk in enumerate(vit.blocks):
            if type(blk) is not Block:
                raise StudioError(
                    f"Block {i} is already pruned ({type(blk).__name__}); P3B starts from an unpruned model."
                )
            why = _gate_refusal(i, blk)
            if why is not None:
                raise StudioError(why)
            ca, cm = branch_costs(blk, C)
            H, d = blk.attn.num_heads, blk.attn.head_dim
            ga = BranchGates("attn", i, (C, d, C), ca, self.device)
            gm = BranchGates("mlp", i, (C, mlp_hidden(blk.mlp), C), cm, self.device)
            exact = self._exact
            self._handles += [
                blk.norm1.register_forward_hook(_norm_gate_hook(ga.masks["attn_in"], exact)),
                blk.attn.qkv.register_forward_hook(_gate_hook(ga.masks["qkv"], 3 * H)),
                blk.attn.proj.register_forward_hook(_gate_hook(ga.masks["attn_out"])),
                blk.norm2.register_forward_hook(_norm_gate_hook(gm.masks["mlp_in"], exact)),
                blk.mlp.act.register_forward_hook(_gate_hook(gm.masks["mlp_hid"])),
                blk.mlp.fc2.register_forward_hook(_gate_hook(gm.masks["mlp_out"])),
            ]
            self.branches += [ga, gm]
        self.block_params = np.array([b.full_params for b in self.branches], dtype=np.float64)
        total = sum(p.numel() for p in vit.parameters())
        self.non_block_params = int(total - self.block_params.sum())
        self.taps = FeatureTaps(vit)
        self.probes = BenefitProbes.for_model(vit, patch_probe=settings.patch_probe, seed=settings.seed)
        n = len(self.branches)
        self.window, self.window_prev, self.epoch_meter = BenefitMeter(n), BenefitMeter(n), BenefitMeter(n)
        self.budget = BlockBudget(settings.budget)
        self.kappa = np.ones(n)
        self.kappa_applied = np.ones(n)
        self.theta = settings.tau_max
        self.updates = 0
        self.ctx = ctx
        # this optimizer step's benefit sums over its micro-batches (gradient accumulation) and their count
        self._step_benefit: list[torch.Tensor] = []
        self._step_micro = 0

    # -- helpers ----------------------------------------------------------------------------------------
    def _exact(self) -> bool:
        return self.exact_norm

    def gate_tensors(self) -> list[torch.Tensor]:
        return [m for b in self.branches for m in b.masks.values()]

    def kept_params(self) -> np.ndarray:
        return np.array([b.kept_params() for b in self.branches], dtype=np.float64)

    def remove(self) -> None:
        """Detach every hook (taps and gates) from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.taps.remove()

    def setup_record(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "block_params": [int(v) for v in self.block_params],
            "non_block_params": self.non_block_params,
            "settings": {**self.settings.budget.to_dict(), **self.settings.to_dict()},
            "schedule": self.schedule.to_dict(),
            "probe": self.settings.patch_probe,
            "probe_params": sum(p.numel() for p in self.probes.parameters()),
            "gate_sizes": [list(b.sizes) for b in self.branches],
        }

    # -- fit hooks --------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        decay = [p for p in self.probes.parameters() if p.ndim > 1]
        no_decay = [p for p in self.probes.parameters() if p.ndim <= 1]
        groups = [
            {"params": decay, "weight_decay": self.settings.probe_weight_decay, "lr": self.settings.probe_lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": self.settings.probe_lr},
        ]
        if self.settings.masks_in_optimizer:  # Q2: the reference's AdamW trains the gates (no decay)
            groups.append({"params": self.gate_tensors(), "weight_decay": 0.0})
        return groups

    # P3B acts once per optimizer step on the step's gradients, so it can run with gradient accumulation
    accumulates = True

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: Any) -> torch.Tensor:

        self.probes.train()
        logits = logits_of(model, x)
        state.logits = logits
        # the probes learn from this micro-batch's detached features in their own backward, outside autocast;
        # with accumulation their loss is a mean over the step's micro-batches, like the model's
        with torch.autocast(self.device.type, enabled=False):
            losses = self.probes(self.taps.stacked(), y, label_smoothing=self.settings.label_smoothing)
            accum = max(1, int(getattr(state.spec, "accum_steps", 1)))
            (losses.total / accum if accum > 1 else losses.total).backward()
            dc, dp = losses.benefit()
        if not self._step_benefit:
            self._step_benefit = [
                torch.zeros_like(dc, dtype=torch.float64),
                torch.zeros_like(dp, dtype=torch.float64),
            ]
        self._step_benefit[0] += dc.detach().double()
        self._step_benefit[1] += dp.detach().double()
        self._step_micro += 1
        return F.cross_entropy(logits.float(), y, label_smoothing=self.settings.label_smoothing)

    def after_backward(self, state: Any) -> None:
        t = state.step
        sched = self.schedule
        dc, dp = (b / max(1, self._step_micro) for b in self._step_benefit)
        self._step_benefit, self._step_micro = [], 0
        # one all-reduce per step: the gate and probe gradients and the benefits this rank saw on its shard
        average_(
            [*(m.grad for m in self.gate_tensors()), *(p.grad for p in self.probes.parameters()), dc, dp],
            self.ctx,
        )
        if sched.t_start <= t < sched.t_final:
            for b in self.branches:
                b.accumulate()
        if not self.settings.masks_in_optimizer:
            for m in self.gate_tensors():
                m.grad = None
        self.epoch_meter.add(dc, dp)
        if t >= sched.t_start:
            self.window.add(dc, dp)

    def after_step(self, state: Any) -> None:
        t = state.step - 1
        if self.schedule.is_update(t):
            self.update(t)

    def on_epoch_end(self, state: Any) -> dict[str, Any]:
        cls, patch = self.epoch_meter.mean()
        kept = self.kept_params()
        record = {
            "epoch": state.epoch,
            "step": state.step,
            "benefit_cls": cls.tolist(),
            "benefit_patch": patch.tolist(),
            "kappa": self.kappa.tolist(),
            "kappa_applied": self.kappa_applied.tolist(),
            "kept_params": [int(v) for v in kept],
            "theta": self.theta,
            "updates": self.updates,
            "params_kept": int(kept.sum()) + self.non_block_params,
            "params_total": int(self.block_params.sum()) + self.non_block_params,
        }
        emit(self.callbacks, EPOCH_EVENT, **record)
        self.epoch_meter.reset()
        return {
            "p3b_params_kept": record["params_kept"],
            "p3b_theta": self.theta,
            "p3b_updates": self.updates,
        }

    # -- the mask update ----------------------------------------------------------------------------------
    def target_kappa(self, window: BenefitMeter) -> np.ndarray:
        """κ from a window's benefits (EMA-smoothed importance, water-filling), or the hand-set ratios."""
        cls, patch = window.mean()
        imp = self.budget.update(cls, patch, self.kept_params())
        if self.hand_kappa is not None:
            return self.hand_kappa.copy()
        b = self.settings.budget
        w_non = 0 if b.block_params_only else self.non_block_params
        return solve_keep_ratios(
            imp, self.block_params, w_non, self.settings.prune_ratio, min_keep=b.min_keep
        )

    def update(self, t: int, *, final: bool = False) -> None:
        """Recompute κ, then every block's masks; close the window (``final``: merge the last two windows)."""
        s = self.schedule
        window = self.window.merged(self.window_prev) if final else self.window
        self.kappa = self.target_kappa(window)
        self.kappa_applied = self.kappa.copy() if final else ramp(self.kappa, t, s.t_start, s.t_sparse)
        self.theta = (
            0.0 if final else theta_at(t, s.t_sparse, s.t_final, self.settings.tau_max, self.settings.tau_min)
        )
        for b, k in zip(self.branches, self.kappa_applied):
            b.set_masks(k * b.full_params, self.theta, self.weights, merge_prev=final)
        self.updates += 1
        if not final:
            self.window_prev, self.window = self.window, BenefitMeter(len(self.branches))
            for b in self.branches:
                b.close_window()

    def finalize(self) -> PrunePlan:
        """Final κ and hard masks from the merged last two windows, as a plan (emits the final record)."""
        self.update(self.schedule.t_final, final=True)
        plan = self.plan()
        kept = self.kept_params()
        emit(
            self.callbacks,
            FINAL_EVENT,
            kappa=self.kappa.tolist(),
            kept_params=[int(v) for v in kept],
            params_kept=int(kept.sum()) + self.non_block_params,
            params_total=int(self.block_params.sum()) + self.non_block_params,
            structure=[dict(zip(b.names, b.kept_counts())) for b in self.branches],
        )
        return plan

    def plan(self) -> PrunePlan:
        """The current hard masks as a plan on ``base`` (heads are never removed by P3B)."""
        blocks = []
        for i in range(len(self.branches) // 2):
            a, m = self.branches[2 * i].kept_indices(), self.branches[2 * i + 1].kept_indices()
            blocks.append(
                BlockPlan(
                    index=i,
                    head_dims=a["qkv"],
                    mlp=m["mlp_hid"],
                    attn_in=a["attn_in"],
                    attn_out=a["attn_out"],
                    mlp_in=m["mlp_in"],
                    mlp_out=m["mlp_out"],
                )
            )
        params = {
            **self.settings.to_dict(),
            "schedule": self.schedule.to_dict(),
            "kappa": self.kappa.tolist(),
        }
        return PrunePlan(base=self.base, blocks=tuple(blocks), method="p3b", params=params).validate()

    # -- checkpoint state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "probes": {k: v.detach().clone() for k, v in self.probes.state_dict().items()},
            "branches": [b.state_dict() for b in self.branches],
            "window": self.window.state_dict(),
            "window_prev": self.window_prev.state_dict(),
            "epoch_meter": self.epoch_meter.state_dict(),
            "budget": self.budget.state_dict(),
            "kappa": torch.from_numpy(self.kappa.copy()),
            "kappa_applied": torch.from_numpy(self.kappa_applied.copy()),
            "theta": self.theta,
            "updates": self.updates,
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.probes.load_state_dict(sd["probes"])
        for b, s in zip(self.branches, sd["branches"]):
            b.load_state_dict(s)
        self.window.load_state_dict(sd["window"])
        self.window_prev.load_state_dict(sd["window_prev"])
        self.epoch_meter.load_state_dict(sd["epoch_meter"])
        self.budget.load_state_dict(sd["budget"])
        self.kappa = sd["kappa"].numpy().astype(np.float64)
        self.kappa_applied = sd["kappa_applied"].numpy().astype(np.float64)
        self.theta, self.updates = float(sd["theta"]), int(sd["updates"])


# ============================================================================================== the job
OPTIONS: tuple[Option, ...] = (
    Option(
        "prune_ratio",
        float,
        0.5,
        "fraction of ALL parameters to remove (P3B budgets parameters, not MACs)",
        low=0.0,
        high=0.99,
    ),
    Option("epochs", int, 40, "total epochs: pruning phase + fine-tuning of the sliced model", low=1),
    Option("start_epoch", int, None, "first epoch with mask updates (default 10% of the epochs)"),
    Option("sparse_epoch", int, None, "epoch where κ reaches its target (default 25%)"),
    Option("finalize_epoch", int, None, "slice after this many epochs, fine-tune the rest (default 50%)"),
    Option("steps_per_update", int, None, "optimizer steps between mask updates (default: ~3 per epoch)"),
    Option(
        "accum_steps",
        int,
        1,
        "micro-batches of --batch-size per optimizer step (gradient accumulation; the paper: 2, on 4 GPUs)",
        low=1,
        high=1024,
    ),
    Option(
        "probe",
        str,
        "auto",
        "patch probe: conv (paper, heavy), mean (cheap deviation), auto (conv on GPU)",
        choices=("auto", "conv", "mean"),
    ),
    Option("lr", float, 5e-4, "learning rate (constant while pruning, cosine while fine-tuning)"),
    Option("probe_lr", float, 5e-4, "learning rate of the probe heads (not scaled, as in the paper)"),
    Option("finetune_lr", float, None, "learning rate of the fine-tune phase (default: --lr)"),
    Option("weight_decay", float, 0.05, "AdamW weight decay"),
    Option("label_smoothing", float, 0.1, "label smoothing of the task and probe losses"),
    Option("gamma", float, 0.2, "EMA weight of the newest benefit window"),
    Option("alpha", float, 0.5, "blend of CLS (α) and patch (1-α) importance"),
    Option("imp_scale", float, 10.0, "T of the benefit transform"),
    Option("tau_max", float, 0.1, "soft-mask temperature until the sparse epoch"),
    Option("tau_min", float, 0.0, "soft-mask temperature at the finalize epoch (0: hard)"),
    Option("gate_weights", str, DEFAULT_GATE_WEIGHTS, "rank weights per gate, NAME:VALUE,..."),
    Option(
        "keep_ratios", str, None, "hand-set keep ratios, 2L values attn0,mlp0,attn1,... (replaces the budget)"
    ),
    Option("min_keep", float, 0.0, "smallest keep ratio a block gets"),
    Option("block_params_only", bool, False, "count the prune ratio over block parameters only"),
    Option(
        "zero_floor",
        bool,
        False,
        "blocks with benefit ≤ 0 get no importance (off, the default: the reference's soft clamp)",
    ),
    Option(
        "masks_in_optimizer", bool, False, "train the gates with AdamW like the reference code (quirk Q2)"
    ),
)


def settings_from_params(params: Mapping[str, Any], device: torch.device, seed: int = 0) -> P3BSettings:
    probe = params.get("probe") or "auto"
    if probe == "auto":
        probe = "conv" if device.type == "cuda" else "mean"
    budget = BudgetSettings(
        scale=float(params.get("imp_scale", 10.0)),
        gamma=float(params.get("gamma", 0.2)),
        alpha=float(params.get("alpha", 0.5)),
        zero_floor=bool(params.get("zero_floor", False)),
        min_keep=float(params.get("min_keep", 0.0)),
        block_params_only=bool(params.get("block_params_only", False)),
    )
    pr = float(params.get("prune_ratio", 0.5))
    if not 0.0 <= pr < 1.0:
        raise StudioError(f"--prune-ratio must be in [0, 1), got {pr}.")
    for name in ("gamma", "alpha"):
        if not 0.0 <= float(params.get(name, 0.5)) <= 1.0:
            raise StudioError(f"--{name} must be in [0, 1].")
    return P3BSettings(
        prune_ratio=pr,
        budget=budget,
        tau_max=float(params.get("tau_max", 0.1)),
        tau_min=float(params.get("tau_min", 0.0)),
        gate_weights=str(params.get("gate_weights") or DEFAULT_GATE_WEIGHTS),
        keep_ratios=params.get("keep_ratios"),
        patch_probe=probe,
        probe_lr=float(params.get("probe_lr", 5e-4)),
        probe_weight_decay=float(params.get("weight_decay", 0.05)),
        masks_in_optimizer=bool(params.get("masks_in_optimizer", False)),
        label_smoothing=float(params.get("label_smoothing", 0.1)),
        seed=seed,
    )


def check_params(params: Mapping[str, Any]) -> None:
    """The budget settings and the epoch schedule, as the job will build them (the schedule's epoch checks do
    not depend on the number of steps per epoch)."""
    settings_from_params(params, torch.device("cpu"))
    Schedule.for_run(
        int(params["epochs"]),
        1,
        start=params.get("start_epoch"),
        sparse=params.get("sparse_epoch"),
        finalize=params.get("finalize_epoch"),
        steps_per_update=params.get("steps_per_update") or 1,
    )


METHOD = Method(
    "p3b",
    None,
    "Pruning by Block Benefit: probe-measured block benefit sets per-block budgets while fine-tuning (a training job)",
    options=OPTIONS,
    needs_data=True,
    budgets=(Budget("prune_ratio", "Fraction of the parameters to remove", 0.05, 0.9, 0.5, 0.05),),
    rounds=False,
    flow="p3b",
    units=("head_dims", "mlp", "residual"),
    unit_refusals=unit_refusals,
    check=check_params,
)

if "p3b" not in METHODS:
    METHODS.add("p3b", METHOD)
