"""timm's ``ParallelScalingBlock`` (ViT-22B's parallel block) as a studio :class:`ParallelBlock` of the same function.

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
(``blocks.i.attn.qkv``...), which the reload rebuilds the same way; a timm checkpoint of the fused block is
renamed on load (:func:`split_state_dict`).

Why split rather than slice the fused layers in place: every part of the studio (surgery, costs, SAViT's gates,
P3B's masks, torch-pruning's tracing, LoRA) addresses a block's ``attn.qkv``/``mlp.fc1``; the split keeps one
code path for all of them, and torch-pruning traces two linears exactly where it cannot follow a ``split``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import ParallelScalingBlock
from torch import nn


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
    M, D = _parts(blk)
    w, b = blk.in_proj.weight, blk.in_proj.bias
    fused = blk.out_proj is not None
    out_w = blk.out_proj.weight if fused else None
    proj_bias = (blk.out_proj if fused else blk.attn_out_proj).bias is not None
    with torch.device("meta"):  # shapes only: the weights below are the block's own
        attn = Attention(
            D,
            num_heads=blk.num_heads,
            qkv_bias=b is not None,
            qk_norm=False,
            proj_bias=proj_bias,
            attn_drop=blk.attn_drop.p,
        )
        # a fused out_proj has one bias: it stays with the attention half; the MLP half has none
        mlp_out_bias = (not fused) and blk.mlp_out_proj.bias is not None
        mlp = Mlp(D, M, w.shape[1], bias=(True, mlp_out_bias))
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
    """Replace every ``ParallelScalingBlock`` of ``model`` by its :func:`split_block`, **in place**."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return model
    for i, blk in enumerate(blocks):
        if type(blk) is ParallelScalingBlock:
            blocks[i] = split_block(blk)
    return model


def split_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm ``ParallelScalingBlock`` state dict renamed and split to ``model``'s :class:`ParallelBlock` keys
    (``in_proj`` -> ``attn.qkv`` + ``mlp.fc1``, ``mlp_bias`` -> ``mlp.fc1.bias``, ``out_proj`` or
    ``attn_out_proj``/``mlp_out_proj`` -> ``attn.proj`` + ``mlp.fc2``, ``in_norm`` -> ``norm1``, ``ls`` -> ``ls1``).
    Keys of other blocks, and a state dict already split, pass through unchanged."""
    out = dict(sd)
    for i, blk in enumerate(getattr(model, "blocks", ())):
        p = f"blocks.{i}."
        if not isinstance(blk, ParallelBlock) or p + "in_proj.weight" not in out:
            continue
        M, D = mlp_hidden_of(blk), blk.attn.attn_dim
        w = out.pop(p + "in_proj.weight")
        out[p + "attn.qkv.weight"], out[p + "mlp.fc1.weight"] = w[M:], w[:M]
        if (b := out.pop(p + "in_proj.bias", None)) is not None:
            out[p + "attn.qkv.bias"], out[p + "mlp.fc1.bias"] = b[M:], b[:M]
        if (mb := out.pop(p + "mlp_bias", None)) is not None:
            out[p + "mlp.fc1.bias"] = mb
        if (ow := out.pop(p + "out_proj.weight", None)) is not None:
            out[p + "attn.proj.weight"], out[p + "mlp.fc2.weight"] = ow[:, :D], ow[:, D:]
            if (ob := out.pop(p + "out_proj.bias", None)) is not None:
                out[p + "attn.proj.bias"] = ob
        renames = {
            "attn_out_proj.": "attn.proj.",
            "mlp_out_proj.": "mlp.fc2.",
            "in_norm.": "norm1.",
            "ls.": "ls1.",
        }
        renames.update({"q_norm.": "attn.q_norm.", "k_norm.": "attn.k_norm."})
        for k in [k for k in out if k.startswith(p)]:
            for old, new in renames.items():
                if k.startswith(p + old):
                    out[p + new + k[len(p + old) :]] = out.pop(k)
                    break
    return out


def mlp_hidden_of(blk: ParallelBlock) -> int:
    return int(blk.mlp.fc2.in_features)
