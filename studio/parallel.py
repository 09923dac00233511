"""timm's parallel blocks as blocks the studio prunes, computing the same function.

**ParallelScalingBlock** (ViT-22B) becomes a studio :class:`ParallelBlock`:

timm's block fuses the MLP's input and the attention's q, k, v into one ``in_proj`` (rows ``[mlp | q | k | v]``,
``in_split``), adds ``mlp_bias`` to the MLP part when ``in_proj`` has no bias, and writes through one fused
``out_proj`` over ``[attention output, MLP hidden]`` (or, by default, ``attn_out_proj`` + ``mlp_out_proj``).

The studio splits that block, once, where every model is created (:func:`studio.models.create_vit`), into a
:class:`ParallelBlock` whose ``attn`` is timm's standard ``Attention`` (``qkv`` = the q, k, v rows of
``in_proj``; ``proj`` = the attention columns of ``out_proj``) and whose ``mlp`` is timm's ``Mlp`` (``fc1`` = the
MLP rows with their bias; ``fc2`` = the MLP columns). Every weight keeps its value and each unit owns exactly
the ``in_proj`` rows and ``out_proj`` columns it owned before, so the split block computes the same logits (up
to float summation order) and the one plan format, surgery, masking, costs, grouping and every method apply to
it unchanged: a head's group is its q/k/v rows of ``in_proj`` and its ``out_proj`` columns, a neuron's its MLP row
of ``in_proj``, its ``mlp_bias`` entry and its ``out_proj`` column. Exports carry the split names
(``blocks.i.attn.qkv``...), which the reload rebuilds the same way; a timm checkpoint is loaded into timm's own
blocks first and split after (:func:`studio.load.load_model`).

**ParallelThingsBlock** ("Three things", ``vit_*_18x2_*``: P attention branches, then P MLP branches, each with
its own norm and LayerScale) becomes one timm ``Block`` of ``P·H`` heads and ``P·M`` MLP neurons
(:func:`merge_things`): each branch's norm affine is folded into its input linear and its LayerScale into its
output linear, so the branches share one plain norm and concatenate; head ``i·H + h`` is branch ``i``'s head
``h``. The merged block carries :data:`MERGED` (its branch count), which is how the family finds it. Branches
with their own qk-norm or scale norms, or other attention/MLP layers, cannot share one norm and stay refused.

Why split rather than slice the fused layers in place: every part of the studio (surgery, costs, SAViT's gates,
P3B's masks, torch-pruning's tracing, LoRA) addresses a block's ``attn.qkv``/``mlp.fc1``; the split keeps one
code path for all of them, and torch-pruning traces two linears exactly where it cannot follow a ``split``.
"""

from __future__ import annotations

import copy

import torch
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, ParallelScalingBlock, ParallelThingsBlock
from torch import nn

#: timm's block types :func:`split_parallel` replaces
PARALLEL_TYPES: tuple[type[nn.Module], ...] = (ParallelScalingBlock, ParallelThingsBlock)


class ParallelBlock(nn.Module):
    """A parallel pre-norm block: ``x + drop_path(ls(attn(norm1(x)) + mlp(norm1(x))))``.

    Submodule names follow timm's ``Block`` where they mean the same (``norm1``, ``attn``, ``mlp``, ``ls1``,
    ``drop_path1``); ``norm2``/``ls2``/``drop_path2`` are identities (the branches share the input norm and the
    LayerScale), so code that visits a ``Block``'s parts visits these as no-ops.
    """

    def __init__(
        self, norm: nn.Module, attn: Attention, mlp: Mlp, ls: nn.Module, drop_path: nn.Module
    ) -> None:
        super().__init__()
        self.norm1, self.attn, self.mlp, self.ls1, self.drop_path1 = norm, attn, mlp, ls, drop_path
        self.norm2, self.ls2, self.drop_path2 = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        y = self.norm1(x)
        y = self.attn(y, attn_mask=attn_mask, is_causal=is_causal) + self.mlp(y)
        return x + self.drop_path1(self.ls1(y))


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=like.requires_grad)


def _parts(blk: ParallelScalingBlock) -> tuple[int, int]:
    """(MLP hidden width, attention width) of ``blk``'s ``in_split``."""
    return int(blk.in_split[0]), int(blk.in_split[1])


def split_block(blk: ParallelScalingBlock) -> ParallelBlock:
    """The :class:`ParallelBlock` computing what ``blk`` computes, holding copies of its weights."""
    M, D = _parts(blk)  # D: the attention width (timm's block keeps it equal to the embedding width)
    w, b = blk.in_proj.weight, blk.in_proj.bias
    E = w.shape[1]
    fused = blk.out_proj is not None
    out_w = blk.out_proj.weight if fused else None
    proj_bias = (blk.out_proj if fused else blk.attn_out_proj).bias is not None
    with torch.device("meta"):  # shapes only: the weights below are the block's own
        attn = Attention(
            E,
            num_heads=blk.num_heads,
            attn_head_dim=blk.head_dim,
            qkv_bias=b is not None,
            qk_norm=False,
            proj_bias=proj_bias,
            attn_drop=blk.attn_drop.p,
        )
        # a fused out_proj has one bias: it stays with the attention half; the MLP half has none
        mlp_out_bias = (not fused) and blk.mlp_out_proj.bias is not None
        mlp = Mlp(E, M, E, bias=(True, mlp_out_bias))
    attn.q_norm, attn.k_norm, attn.attn_drop = blk.q_norm, blk.k_norm, blk.attn_drop
    attn.head_dim, attn.scale = blk.head_dim, blk.scale
    attn.qkv.weight = _param(w[M:], w)
    attn.qkv.bias = None if b is None else _param(b[M:], b)
    mlp.fc1.weight = _param(w[:M], w)
    mlp.fc1.bias = _param(b[:M], b) if b is not None else _param(blk.mlp_bias, blk.mlp_bias)
    if fused:
        attn.proj.weight = _param(out_w[:, :D], out_w)
        if blk.out_proj.bias is not None:
            attn.proj.bias = _param(blk.out_proj.bias, blk.out_proj.bias)
        mlp.fc2.weight = _param(out_w[:, D:], out_w)
    else:
        attn.proj, mlp.fc2 = blk.attn_out_proj, blk.mlp_out_proj
    attn.proj_drop = nn.Identity()  # timm's block drops the MLP activation only (mlp_drop)
    mlp.act, mlp.drop1, mlp.drop2 = blk.mlp_act, blk.mlp_drop, nn.Identity()
    return ParallelBlock(blk.in_norm, attn, mlp, blk.ls, blk.drop_path)


def split_parallel(model: nn.Module) -> nn.Module:
    """Replace every ``ParallelScalingBlock`` of ``model`` by its :func:`split_block` and every mergeable
    ``ParallelThingsBlock`` by its :func:`merge_things`, **in place** (other blocks are left as they are; the
    family check refuses what stays)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return model
    for i, blk in enumerate(blocks):
        if type(blk) is ParallelScalingBlock:
            blocks[i] = split_block(blk)
        elif type(blk) is ParallelThingsBlock and things_refusal(blk) is None:
            blocks[i] = merge_things(blk)
    return model


# ------------------------------------------------------------------------------------- ParallelThingsBlock
#: attribute a merged ParallelThingsBlock carries (its branch count): how the family finds it
MERGED = "parallel_branches"


def things_refusal(blk: ParallelThingsBlock) -> str | None:
    """Why the branches of ``blk`` cannot be merged into one ``Block`` exactly, or None.

    A branch's own norm after q/k (qk-norm) or on its output (scale norms) is not shared by the merged heads or
    neurons, and only timm's ``Attention``/``Mlp`` have the layout the merge concatenates.
    """
    for s in blk.attns:
        a = s.attn
        if type(a) is not Attention or getattr(a, "gate", None) is not None:
            return f"its attention branch is a {type(a).__name__} (gated or not timm's Attention)"
        if not all(isinstance(getattr(a, n), nn.Identity) for n in ("q_norm", "k_norm", "norm")):
            return "its attention branches use qk-norm or a scale norm (each branch's own)"
    for s in blk.ffns:
        if type(s.mlp).__name__ != "Mlp" or not isinstance(s.mlp.norm, nn.Identity):
            return f"its MLP branch is a {type(s.mlp).__name__} (a GLU, or with a scale norm)"
    return None


def _affine(norm: nn.Module, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a pre-norm's affine (ones / zeros where it has none)."""
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    one = torch.ones(width, dtype=like.dtype, device=like.device)
    return (w.detach() if isinstance(w, torch.Tensor) else one), (
        b.detach() if isinstance(b, torch.Tensor) else torch.zeros_like(one)
    )


def _gamma(ls: nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    g = getattr(ls, "gamma", None)
    return (
        g.detach() if isinstance(g, torch.Tensor) else torch.ones(width, dtype=like.dtype, device=like.device)
    )


def _fold_in(lin: nn.Linear, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``lin ∘ norm``'s affine on the norm's plain output: ``W·diag(w)``, ``W·b + c``."""
    W = lin.weight.detach()
    w, b = _affine(norm, W.shape[1], W)
    c = lin.bias.detach() if lin.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    return W * w, W @ b + c


def _fold_out(lin: nn.Linear, ls: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``ls ∘ lin``: LayerScale's gamma folded into the output rows."""
    W = lin.weight.detach()
    g = _gamma(ls, W.shape[0], W)
    c = lin.bias.detach() if lin.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    return W * g[:, None], c * g


def _plain_norm(norm: nn.Module) -> nn.Module:
    """A copy of ``norm`` with its affine at the identity (weight 1, bias 0): the branches' affines are folded."""
    out = copy.deepcopy(norm)
    for name, fill in (("weight", 1.0), ("bias", 0.0)):
        p = getattr(out, name, None)
        if isinstance(p, torch.Tensor):
            setattr(out, name, nn.Parameter(torch.full_like(p.detach(), fill), requires_grad=p.requires_grad))
    return out


def merge_things(blk: ParallelThingsBlock) -> Block:
    """One timm ``Block`` computing what ``blk``'s parallel branches compute (up to float rounding).

    ``x + Σ_i ls_i(attn_i(norm_i(x)))`` is one attention of ``P·H`` heads on a shared plain norm: each branch's
    norm affine folds into its ``qkv`` (``W·diag(w)``, bias ``W·b + c``), its LayerScale into its ``proj`` rows, the
    ``qkv`` rows concatenate per q/k/v (head ``i·H + h`` is branch ``i``'s head ``h``), the ``proj`` columns
    concatenate and their biases add; the MLPs likewise become one ``Mlp`` of ``P·M`` neurons (neuron ``i·M + n``).
    The merged layers always have biases (a folded norm bias needs one). Stochastic depth drops the summed
    branches together (timm drops each branch alone), which matters only in training with ``drop_path > 0``.
    """
    P = len(blk.attns)
    a0, m0 = blk.attns[0].attn, blk.ffns[0].mlp
    E, H, d = a0.qkv.in_features, a0.num_heads, a0.head_dim
    M = m0.fc1.out_features
    with torch.device("meta"):  # shapes only: every weight is set below
        out = Block(E, num_heads=1, mlp_ratio=M * P / E)
        out.attn = Attention(E, num_heads=P * H, attn_head_dim=d, qkv_bias=True, proj_bias=True)
        out.mlp = Mlp(E, P * M, E, bias=True)
    qkv = [_fold_in(s.attn.qkv, s.norm) for s in blk.attns]
    A = H * d
    out.attn.qkv.weight = _param(
        torch.cat([w[k * A : (k + 1) * A] for k in range(3) for w, _ in qkv]), a0.qkv.weight
    )
    out.attn.qkv.bias = _param(
        torch.cat([b[k * A : (k + 1) * A] for k in range(3) for _, b in qkv]), a0.qkv.weight
    )
    proj = [_fold_out(s.attn.proj, s.ls) for s in blk.attns]
    out.attn.proj.weight = _param(torch.cat([w for w, _ in proj], dim=1), a0.proj.weight)
    out.attn.proj.bias = _param(sum(b for _, b in proj), a0.proj.weight)
    out.attn.attn_drop, out.attn.proj_drop = a0.attn_drop, a0.proj_drop
    fc1 = [_fold_in(s.mlp.fc1, s.norm) for s in blk.ffns]
    out.mlp.fc1.weight = _param(torch.cat([w for w, _ in fc1]), m0.fc1.weight)
    out.mlp.fc1.bias = _param(torch.cat([b for _, b in fc1]), m0.fc1.weight)
    fc2 = [_fold_out(s.mlp.fc2, s.ls) for s in blk.ffns]
    out.mlp.fc2.weight = _param(torch.cat([w for w, _ in fc2], dim=1), m0.fc2.weight)
    out.mlp.fc2.bias = _param(sum(b for _, b in fc2), m0.fc2.weight)
    out.mlp.act, out.mlp.drop1, out.mlp.drop2 = m0.act, m0.drop1, m0.drop2
    out.norm1, out.norm2 = _plain_norm(blk.attns[0].norm), _plain_norm(blk.ffns[0].norm)
    out.ls1, out.ls2 = nn.Identity(), nn.Identity()
    out.drop_path1, out.drop_path2 = blk.attns[0].drop_path, blk.ffns[0].drop_path
    setattr(out, MERGED, P)
    return out
