"""Grouped importance: per-weight scores summed over the coupled weights of each prunable unit.

A unit's group is every weight that disappears with it (DepGraph's notion of a group, written out for timm ViTs):

- head ``h`` of a block: the q, k and v rows of the head in ``qkv`` (weight and bias) and its ``proj`` columns;
- head dim ``j`` of a block: row ``j`` of q, k and v in every head, and the matching ``proj`` columns;
- MLP neuron ``n``: ``fc1`` row ``n`` (weight and bias; both rows of a GLU, :class:`studio.families.MlpLayout`)
  and ``fc2`` column ``n``;
- embedding channel ``c``: everything that reads or writes the residual stream at ``c`` — the patch convolution's
  output channel, ``cls``/``reg``/``dist`` tokens and ``pos_embed``, every LayerNorm, ``qkv``/``fc1`` input
  columns, ``proj``/``fc2`` output rows and biases, LayerScale, and the classifier input columns.

Per-weight scores are given as a mapping from parameter name to a tensor of the parameter's shape
(``|w|``, ``w²``, ``|w·g|``...), so magnitude, Taylor and any later criterion share this code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from timm.models.vision_transformer import VisionTransformer

from ..analysis.criteria import UnitScores
from ..families import mlp_hidden, mlp_layout

# (parameter-name pattern, axis that indexes the embedding channel)
_EMBED_AXES: tuple[tuple[re.Pattern[str], int], ...] = tuple(
    (re.compile(p), a)
    for p, a in (
        (r"^patch_embed\.proj\.(weight|bias)$", 0),
        (r"^patch_embed\.norm\.(weight|bias)$", 0),
        (r"^(cls_token|reg_token|dist_token|pos_embed)$", -1),
        (r"^(norm_pre|norm|fc_norm)\.(weight|bias)$", 0),
        (r"^blocks\.\d+\.norm[12]\.(weight|bias)$", 0),
        (r"^blocks\.\d+\.attn\.qkv\.weight$", 1),
        (r"^blocks\.\d+\.attn\.proj\.(weight|bias)$", 0),
        (r"^blocks\.\d+\.ls[12]\.gamma$", 0),
        (r"^blocks\.\d+\.mlp\.fc1(_g|_x)?\.weight$", 1),
        (r"^blocks\.\d+\.mlp\.fc2\.(weight|bias)$", 0),
        (r"^(head|head_dist)\.weight$", 1),
    )
)


def embed_axis(name: str) -> int | None:
    """The axis of parameter ``name`` that indexes embedding channels, or None if it has none."""
    for pattern, axis in _EMBED_AXES:
        if pattern.match(name):
            return axis
    return None


def _sum_except(t: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis % t.ndim
    return t.sum(dim=[d for d in range(t.ndim) if d != axis]) if t.ndim > 1 else t


def unit_scores(
    model: VisionTransformer, elem: Mapping[str, torch.Tensor], scopes: Iterable[str]
) -> UnitScores:
    """Sum per-weight scores ``elem`` (name -> tensor shaped like the parameter) over each unit's group.

    Missing names count as zero (e.g. a bias-free ``qkv``). Scores are float64 on the CPU.
    """
    scopes = set(scopes)

    def get(name: str) -> torch.Tensor | None:
        t = elem.get(name)
        return None if t is None else t.detach().double().cpu()

    heads, dims, mlp = [], [], []
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        H, d = a.num_heads, a.head_dim
        pre = f"blocks.{i}."
        qkv_w, qkv_b, proj_w = (
            get(pre + "attn.qkv.weight"),
            get(pre + "attn.qkv.bias"),
            get(pre + "attn.proj.weight"),
        )
        hs = torch.zeros(H, d, dtype=torch.float64)  # score of each (head, dim) pair
        if qkv_w is not None:
            hs += qkv_w.view(3, H, d, -1).sum(dim=(0, 3))
        if qkv_b is not None:
            hs += qkv_b.view(3, H, d).sum(dim=0)
        if proj_w is not None:
            hs += proj_w.view(-1, H, d).sum(dim=0)
        heads.append(hs.sum(1))
        dims.append(hs.sum(0))
        M = mlp_hidden(blk.mlp)
        ms = torch.zeros(M, dtype=torch.float64)
        for attr, offset in mlp_layout(blk.mlp).inputs(blk.mlp):  # a GLU neuron owns two input rows
            for kind in ("weight", "bias"):
                t = get(f"{pre}mlp.{attr}.{kind}")
                if t is not None:
                    ms += _sum_except(t, 0)[offset : offset + M]
        t = get(pre + "mlp.fc2.weight")
        if t is not None:
            ms += _sum_except(t, 1)
        mlp.append(ms)
    embed = None
    if "embed" in scopes:
        embed = torch.zeros(int(model.embed_dim), dtype=torch.float64)
        for name, _ in model.named_parameters():
            axis = embed_axis(name)
            t = get(name)
            if axis is not None and t is not None:
                embed += _sum_except(t, axis)
    return UnitScores.of_tensors(
        heads=heads if "heads" in scopes else None,
        head_dims=dims if "head_dims" in scopes else None,
        mlp=mlp if "mlp" in scopes else None,
        embed=embed,
    )
