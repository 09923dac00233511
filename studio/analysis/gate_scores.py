"""SAViT's gate scores (Zheng et al., NeurIPS 2022): Taylor scores of heads, MLP neurons and embedding channels
through multiplicative gates, plus the 3x3 Hessian of the gate loss between the unit types.

An analysis (no plan): the Importance page's ``taylor2`` criterion shows the scores, and SAViT's allocation
(:mod:`studio.prune.savit`) turns scores + Hessian into a plan under a MACs target. Gates sit on a deep copy
of the model, so the cached model is never touched.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bench import unfused_attention
from ..errors import StudioError
from ..evaluate import logits_of
from ..events import Callback, CancelToken, check, progress
from ..parallel import ParallelBlock
from ..plan import BaseArch, PrunePlan
from ..surgery import check_supported
from .criteria import calibration_micro_batch, micro_batches

Batch = tuple[torch.Tensor, torch.Tensor]

TYPES = ("heads", "mlp", "embed")


# ------------------------------------------------------------------------------------------------- gates
class SavitGates(nn.Module):
    """The gate parameters of one model: per block a head gate and an MLP gate, and one residual gate."""

    def __init__(self, base: BaseArch, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.heads = nn.ParameterList([nn.Parameter(torch.ones(h, device=device)) for h in base.num_heads])
        self.mlp = nn.ParameterList([nn.Parameter(torch.ones(m, device=device)) for m in base.mlp_hidden])
        self.res = nn.Parameter(torch.ones(base.embed_dim, device=device))

    def of(self, kind: int, block: int) -> nn.Parameter:
        """Gate of type ``kind`` (0 heads, 1 mlp, 2 residual) in ``block`` (the residual gate is shared)."""
        if kind == 0:
            return self.heads[block]
        if kind == 1:
            return self.mlp[block]
        return self.res

    def flat(self) -> list[nn.Parameter]:
        return [*self.heads, *self.mlp, self.res]

    @torch.no_grad()
    def set_plan(self, plan: PrunePlan) -> None:
        """Gates at 0 for every head, neuron and embedding channel ``plan`` drops (blocks must all be kept)."""
        if plan.depth != plan.base.depth:
            raise StudioError("SAViT gates cannot express removed blocks; use a plan that keeps every block.")
        for g in self.flat():
            g.fill_(1.0)
        for b in plan.blocks:
            if b.heads is not None:
                keep = torch.zeros_like(self.heads[b.index])
                keep[list(b.heads)] = 1.0
                self.heads[b.index].copy_(keep)
            if b.mlp is not None:
                keep = torch.zeros_like(self.mlp[b.index])
                keep[list(b.mlp)] = 1.0
                self.mlp[b.index].copy_(keep)
        if plan.embed is not None:
            keep = torch.zeros_like(self.res)
            keep[list(plan.embed)] = 1.0
            self.res.copy_(keep)


class _GatedBlock(nn.Module):
    """A timm ``Block`` whose two residual sums (a parallel block's one) are multiplied by the shared residual
    gate (SAViT's placement)."""

    def __init__(self, block: nn.Module, res_gate: nn.Parameter) -> None:
        super().__init__()
        self.block = block
        self.__dict__["res_gate"] = res_gate  # shared with every block: not registered here

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, g = self.block, self.res_gate
        if isinstance(b, ParallelBlock):  # one residual sum: both branches read the same input
            return g * b(x, attn_mask=attn_mask, is_causal=is_causal)
        x = g * (x + b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=attn_mask, is_causal=is_causal))))
        return g * (x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))))


def gated_model(model: nn.Module, base: BaseArch) -> tuple[nn.Module, SavitGates]:
    """A frozen deep copy of ``model`` with SAViT's gates installed (the original is not touched).

    Head gate: forward-pre-hook on ``attn.proj`` scaling each head's ``d`` input columns (the position of the
    reference's ``attn_gate``, so the same gradient); MLP gate: forward hook on ``fc1`` (pre-GELU; on a GLU's
    hidden product, which has no single pre-activation per neuron); residual
    gate: after ``pos_drop`` (position embedding added) and inside every block after each residual sum.
    """
    vit = check_supported(copy.deepcopy(model))
    device = next(vit.parameters()).device
    for p in vit.parameters():
        p.requires_grad_(False)
    gates = SavitGates(base, device)
    d = base.head_dim

    def head_hook(gate: nn.Parameter):
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (args[0] * gate.repeat_interleave(d), *args[1:])

        return hook

    def scale_hook(gate: nn.Parameter):
        def hook(_mod: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            return out * gate

        return hook

    for i, blk in enumerate(vit.blocks):
        blk.attn.proj.register_forward_pre_hook(head_hook(gates.heads[i]))
        # Mlp: on fc1's output (pre-GELU, the reference's place); a GLU has no single pre-activation per neuron,
        # so its gate scales the hidden product (drop1's output, fc2's input)
        gate_at = blk.mlp.fc1 if type(blk.mlp).__name__ == "Mlp" else blk.mlp.drop1
        gate_at.register_forward_hook(scale_hook(gates.mlp[i]))
    vit.pos_drop.register_forward_hook(scale_hook(gates.res))
    vit.blocks = nn.Sequential(*[_GatedBlock(b, gates.res) for b in vit.blocks])
    vit.savit_gates = gates  # registered, so .to(device) moves the gates too
    return vit.eval(), gates


# ------------------------------------------------------------------------------------------------ scores
@dataclass(frozen=True)
class SavitScores:
    """Taylor2 importance of every gate unit and the 3×3 interaction matrix (order: heads, mlp, embed).

    Scores are averages over ``batches``; ``hessian`` is the identity when no HVP was computed.
    ``hessian_samples`` holds each HVP batch's own (normalised) matrix, whose mean ``hessian`` is, and
    ``pairs`` the layers it sampled: ``(l1, l2)`` with ``l2[i][j]`` the block of type ``j`` paired with type
    ``i``'s block ``l1`` (the residual gate is shared, so its block index does not matter).
    """

    heads: tuple[tuple[float, ...], ...]
    mlp: tuple[tuple[float, ...], ...]
    embed: tuple[float, ...]
    hessian: tuple[tuple[float, float, float], ...]
    batches: int
    hvp_batches: int
    hessian_embed: float = 6.0
    hessian_samples: tuple[tuple[tuple[float, ...], ...], ...] = field(default=(), repr=False)
    pairs: tuple[tuple[int, tuple[tuple[int, ...], ...]], ...] = field(default=(), repr=False)

    @property
    def hessian_se(self) -> tuple[tuple[float | None, ...], ...]:
        """Standard error of each entry of ``hessian`` over the HVP batches (None with fewer than two): how
        much of SAViT's head/MLP/embedding split is sampling noise (the reference averages ~4,000 batches)."""
        if len(self.hessian_samples) < 2:
            return tuple(tuple(None for _ in range(3)) for _ in range(3))
        h = np.asarray(self.hessian_samples, dtype=np.float64)
        se = h.std(axis=0, ddof=1) / np.sqrt(len(h))
        return tuple(tuple(float(v) for v in row) for row in se)

    def to_dict(self) -> dict[str, Any]:
        return {
            "heads": [list(h) for h in self.heads],
            "mlp": [list(m) for m in self.mlp],
            "embed": list(self.embed),
            "hessian": [list(r) for r in self.hessian],
            "hessian_se": [list(r) for r in self.hessian_se],
            "batches": self.batches,
            "hvp_batches": self.hvp_batches,
            "hessian_embed": self.hessian_embed,
        }


def _normaliser(base: BaseArch, hessian_embed: float) -> np.ndarray:
    a = base.num_heads[0] * base.head_dim
    b = base.mlp_hidden[0]
    c = base.embed_dim * base.depth * hessian_embed
    s = np.array([a, b, c], dtype=np.float64)
    return np.outer(s, s)


def savit_scores(
    model: nn.Module,
    base: BaseArch,
    batches: Sequence[Batch],
    *,
    hvp_every: int = 1,
    hvp_batches: int | None = None,
    hessian_embed: float = 6.0,
    seed: int = 0,
    micro_batch: int = 0,
    weight_grads: dict[str, torch.Tensor] | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> SavitScores:
    """Taylor2 gate scores and the Hessian interaction matrix over ``batches`` (SAViT §3, see module doc).

    Each batch runs in micro-batches (``micro_batch`` images; 0 picks the largest within the activation
    budget): the batch's gate gradient is the share-weighted sum of the micro-batches' and is squared only
    then, and the Hessian-vector products are linear, so both equal the whole batch's while only one
    micro-batch's graph is alive. ``create_graph`` is used only on the batches that take HVPs.

    Args:
        hvp_every: compute the Hessian-vector products on every k-th batch (0: none, ``Ĥ`` = identity).
        hvp_batches: at most this many batches take HVPs (the first eligible ones; None: all eligible). The
            Hessian's sample count: the reference takes them on every one of its ~4,000 scoring batches.
        hessian_embed: the reference's normaliser knob for the shared residual gate.
        weight_grads: if given (and no HVPs are asked), filled with ∂L/∂w of the model's own weights summed
            over the batches from the same backward passes — what the Taylor criterion needs — so the
            Importance analysis computes both criteria with one pass over the data.
    """
    if not batches:
        raise StudioError("SAViT needs calibration batches: give --data and --calib-batches > 0.")
    if hvp_every < 0:
        raise StudioError(f"--hvp-every must be ≥ 0 (0 disables the Hessian), got {hvp_every}.")
    if hvp_batches is not None and hvp_batches < 0:
        raise StudioError(f"--hvp-batches must be ≥ 0 (0 disables the Hessian), got {hvp_batches}.")
    if hvp_batches == 0:
        hvp_every = 0
    gm, gates = gated_model(model, base)
    device = next(gm.parameters()).device
    params = gates.flat()
    n_gates = len(params)
    if weight_grads is not None:
        if hvp_every:
            raise StudioError(
                "Weight gradients come only from a pass without Hessian products (hvp_every=0)."
            )
        named = [(n, p) for n, p in gm.named_parameters() if not n.startswith("savit_gates.")]
        for _, p in named:
            p.requires_grad_(True)
        params = [*params, *(p for _, p in named)]
        wsum = [torch.zeros_like(p) for _, p in named]
    L = base.depth
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params[:n_gates]]
    samples: list[np.ndarray] = []  # each HVP batch's normalised matrix (their mean is Ĥ)
    drawn: list[tuple[int, tuple[tuple[int, ...], ...]]] = []
    Z = _normaliser(base, hessian_embed)
    rng = random.Random(seed)
    n_hvp = 0
    index = {id(p): k for k, p in enumerate(params)}
    for t, (x, y) in enumerate(batches):
        check(cancel)
        x, y = x.to(device), torch.as_tensor(y).to(device).long()
        do_h = hvp_every > 0 and t % hvp_every == 0 and (hvp_batches is None or n_hvp < hvp_batches)
        mb = calibration_micro_batch(gm, base, batches, "hessian" if do_h else "backward", micro_batch)
        # Hessian products need double backward, which only timm's explicit attention math has; a batch
        # without them keeps the fused kernel (the same function, less time and memory)
        with unfused_attention(gm) if do_h else contextlib.nullcontext():
            # the layer pairs of this batch's HVPs, drawn in the reference's order (l1, then l2 per i, j)
            pairs: list[tuple[int, list[int]]] = []
            if do_h:
                l1 = rng.randrange(L)
                pairs = [(l1, [rng.randint(0, l1) for _ in range(3)]) for _ in range(3)]
                drawn.append((l1, tuple(tuple(l2s) for _, l2s in pairs)))
            grad = [torch.zeros_like(p, dtype=torch.float64) for p in params[:n_gates]]
            h_batch = np.zeros((3, 3), dtype=np.float64)
            loss_sum = 0.0
            for xc, yc, share in micro_batches(x, y, mb):
                with torch.enable_grad():
                    loss = F.cross_entropy(logits_of(gm, xc).float(), yc) * share
                    grads = torch.autograd.grad(loss, params, create_graph=do_h)
                    for g_acc, g in zip(grad, grads[:n_gates]):
                        g_acc += g.detach().double()
                    if weight_grads is not None:
                        for w_acc, g in zip(wsum, grads[n_gates:]):
                            w_acc += g.detach()
                    for i, (l1, l2s) in enumerate(pairs):
                        gi = grads[index[id(gates.of(i, l1))]]
                        targets = [gates.of(j, l2) for j, l2 in enumerate(l2s)]
                        # v = gate values = ones, so (∂L/∂g_i)·v is a plain sum; one call for the 3 targets
                        hs = torch.autograd.grad(gi.sum(), targets, retain_graph=i < 2, allow_unused=True)
                        for j, h in enumerate(hs):
                            if h is not None:
                                h_batch[i, j] += float(h.detach().double().sum())
                loss_sum += float(loss.detach())
                del loss, grads  # the micro-batch's graph goes here, before the next one is built
            for a, g in zip(acc, grad):
                a += g**2
            if do_h:
                samples.append(h_batch / Z)
                n_hvp += 1
            progress(callbacks, "savit scores", t + 1, len(batches), loss=loss_sum)
    T = len(batches)
    if weight_grads is not None:
        # the gated copy wraps each block (``blocks.i.block.…``): give the weights their own model's names
        for (n, _), g in zip(named, wsum):
            weight_grads[n.replace(".block.", ".", 1) if n.startswith("blocks.") else n] = g
    scores = [(a / T).cpu() for a in acc]
    hess = np.mean(samples, axis=0) if n_hvp else np.eye(3)
    if not np.all(np.isfinite(hess)) or not all(torch.isfinite(s).all() for s in scores):
        raise StudioError(
            "SAViT scores are not finite (the loss or its curvature overflowed). Use fewer or smaller "
            "calibration batches, or check the model's accuracy on the data first."
        )
    return SavitScores(
        heads=tuple(tuple(s.tolist()) for s in scores[:L]),
        mlp=tuple(tuple(s.tolist()) for s in scores[L : 2 * L]),
        embed=tuple(scores[-1].tolist()),
        hessian=tuple(tuple(float(v) for v in row) for row in hess),  # type: ignore[misc]
        batches=T,
        hvp_batches=n_hvp,
        hessian_embed=hessian_embed,
        hessian_samples=tuple(tuple(tuple(float(v) for v in row) for row in h) for h in samples),
        pairs=tuple(drawn),
    )
