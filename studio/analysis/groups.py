"""Grouped importance: per-weight scores summed over the coupled weights of each prunable unit.

The one writing-out of which weights a unit owns (DepGraph's notion of a group, Fang et al., CVPR 2023, for the
timm ViT families the surgery prunes): every criterion that scores groups -- the baselines, SPLoRA, the
sensitivity sweep, the Importance analysis and Isomorphic's guard -- sums its per-weight scores here.

- head ``h`` of a block: the q, k and v rows of the head in ``qkv`` (weight and bias), its ``proj`` columns and,
  with a scale norm, its channels of ``attn.norm``;
- head dim ``j`` of a block: row ``j`` of q, k and v in every head and the matching ``proj`` columns (plus the
  ``q_norm``/``k_norm`` entry ``j`` all heads share, under qk-norm);
- MLP neuron ``n``: its ``fc1`` rows (weight and bias; both rows of a GLU, :class:`studio.families.MlpLayout`),
  its ``mlp.norm`` entry under a scale norm, and ``fc2`` column ``n``;
- embedding channel ``c``: everything that reads or writes the residual stream at ``c`` -- the patch convolution's
  output channel, ``cls``/``reg``/``dist`` tokens and ``pos_embed``, every LayerNorm, ``qkv``/``fc1`` input
  columns, ``proj``/``fc2`` output rows and biases, LayerScale, an attention pool's ``kv`` input columns and its
  output side (the surgery keeps the pool's output on the kept embedding), and the classifier input columns.

Parallel blocks need no rule of their own: :mod:`studio.parallel` splits timm's ``ParallelScalingBlock`` at load
so that ``attn.qkv`` holds the q/k/v rows of its fused ``in_proj``, ``mlp.fc1`` the MLP rows (bias: ``mlp_bias``)
and ``attn.proj``/``mlp.fc2`` the columns of its ``out_proj`` (a head owns exactly those rows and columns of the
fused layers; its one ``in_norm`` is ``norm1``), and merges a ``ParallelThingsBlock``'s branches into one block
whose head ``i·H + h`` is branch ``i``'s head ``h``.

Per-weight scores are given as a mapping from parameter name to a tensor of the parameter's shape (``|w|``,
``w²``, ``|w·g|``...). :func:`unit_scores` sums them per unit; :func:`torch_pruning_scores` gives the numbers
torch-pruning's ``Group*Importance`` computes on its dependency groups (weights of linear, conv and LayerNorm
layers only, each group divided by its mean), which is what Isomorphic's pruner ranks -- from these same groups,
so there is one grouping in the studio; ``tests/test_groups.py`` checks it against torch-pruning's own
DependencyGraph on every model family.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import StudioError
from ..families import mlp_hidden, mlp_layout
from .criteria import Grads, UnitScores

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
        (r"^attn_pool\.kv\.weight$", 1),
        (r"^attn_pool\.proj\.(weight|bias)$", 0),
        (r"^attn_pool\.norm\.(weight|bias)$", 0),
        (r"^attn_pool\.mlp\.fc1\.weight$", 1),
        (r"^attn_pool\.mlp\.fc2\.(weight|bias)$", 0),
        (r"^(head|head_dist)\.weight$", 1),
    )
)

#: The layer types whose weights torch-pruning's grouped importances score (its default ``target_types``).
TORCH_PRUNING_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def embed_axis(name: str) -> int | None:
    """The axis of parameter ``name`` that indexes embedding channels, or None if it has none."""
    for pattern, axis in _EMBED_AXES:
        if pattern.match(name):
            return axis
    return None


def _sum_except(t: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis % t.ndim
    return t.sum(dim=[d for d in range(t.ndim) if d != axis]) if t.ndim > 1 else t


@dataclass(frozen=True)
class GroupSums:
    """Per-weight scores summed over each unit's group, before heads and head dims are told apart.

    Attributes:
        channels: per block, a (heads, head_dim) matrix: the score of attention channel (h, j) -- its q, k and v
            rows, its ``proj`` column and its scale-norm entry.
        shared_dims: per block, what every head shares at dim ``j`` (``q_norm``/``k_norm``; zeros without qk-norm).
        mlp: per block, one sum per hidden neuron.
        embed: one sum per embedding channel, or None when not asked for.
    """

    channels: tuple[torch.Tensor, ...]
    shared_dims: tuple[torch.Tensor, ...]
    mlp: tuple[torch.Tensor, ...]
    embed: torch.Tensor | None


def group_sums(model: VisionTransformer, elem: Mapping[str, torch.Tensor], embed: bool = True) -> GroupSums:
    """Sum per-weight scores ``elem`` (name -> tensor shaped like the parameter) over each unit's group.

    Missing names count as zero (e.g. a bias-free ``qkv``). Sums are float64 on the CPU.
    """

    def get(name: str) -> torch.Tensor | None:
        t = elem.get(name)
        return None if t is None else t.detach().double().cpu()

    channels, shared, mlp = [], [], []
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        H, d = a.num_heads, a.head_dim
        pre = f"blocks.{i}."
        cs = torch.zeros(H, d, dtype=torch.float64)
        if (t := get(pre + "attn.qkv.weight")) is not None:
            cs += t.view(3, H, d, -1).sum(dim=(0, 3))
        if (t := get(pre + "attn.qkv.bias")) is not None:
            cs += t.view(3, H, d).sum(dim=0)
        if (t := get(pre + "attn.proj.weight")) is not None:
            cs += t.view(-1, H, d).sum(dim=0)
        for kind in ("weight", "bias"):  # a scale norm over the attention width (normformer)
            if (t := get(f"{pre}attn.norm.{kind}")) is not None:
                cs += t.view(H, d)
        channels.append(cs)
        sd = torch.zeros(d, dtype=torch.float64)
        for name in ("q_norm", "k_norm"):
            for kind in ("weight", "bias"):
                if (t := get(f"{pre}attn.{name}.{kind}")) is not None:
                    sd += t
        shared.append(sd)
        M = mlp_hidden(blk.mlp)
        ms = torch.zeros(M, dtype=torch.float64)
        for attr, offset in mlp_layout(blk.mlp).inputs(blk.mlp):  # a GLU neuron owns two input rows
            for kind in ("weight", "bias"):
                if (t := get(f"{pre}mlp.{attr}.{kind}")) is not None:
                    ms += _sum_except(t, 0)[offset : offset + M]
        for kind in ("weight", "bias"):
            if (t := get(f"{pre}mlp.norm.{kind}")) is not None:
                ms += t
        if (t := get(pre + "mlp.fc2.weight")) is not None:
            ms += _sum_except(t, 1)
        mlp.append(ms)
    emb = None
    if embed:
        emb = torch.zeros(int(model.embed_dim), dtype=torch.float64)
        for name, _ in model.named_parameters():
            axis = embed_axis(name)
            if axis is not None and (t := get(name)) is not None:
                emb += _sum_except(t, axis)
    return GroupSums(tuple(channels), tuple(shared), tuple(mlp), emb)


def unit_scores(
    model: VisionTransformer, elem: Mapping[str, torch.Tensor], scopes: Iterable[str], criterion: str = ""
) -> UnitScores:
    """Per-weight scores ``elem`` summed over each unit's group (a head over its channels, a head dim over its
    channels in every head plus what the heads share), for the unit kinds in ``scopes``."""
    scopes = set(scopes)
    s = group_sums(model, elem, embed="embed" in scopes)
    return UnitScores.of_tensors(
        criterion,
        heads=[c.sum(1) for c in s.channels] if "heads" in scopes else None,
        head_dims=[c.sum(0) + sd for c, sd in zip(s.channels, s.shared_dims)]
        if "head_dims" in scopes
        else None,
        mlp=list(s.mlp) if "mlp" in scopes else None,
        embed=s.embed,
    )


def torch_pruning_elem(
    model: nn.Module, importance: str, grads: Grads | None = None
) -> dict[str, torch.Tensor]:
    """The per-weight scores of torch-pruning's grouped importance ``importance`` (``l1``, ``l2``: ``|w|^p``;
    ``taylor``: ``|w ⊙ g|`` with the summed calibration gradients): weights of its target layer types only --
    no biases, tokens, position embedding or LayerScale (its ``bias=False`` default)."""
    if importance == "taylor" and grads is None:
        raise StudioError("Taylor importance needs calibration gradients: give data to calibrate on.")
    elem: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, TORCH_PRUNING_TYPES) or getattr(mod, "weight", None) is None:
            continue
        name = f"{mod_name}.weight"
        w = mod.weight.detach()
        if importance in ("l1", "l2"):
            elem[name] = w.abs().pow(int(importance[1]))
        elif importance == "taylor":
            g = grads.get(name) if grads is not None else None
            elem[name] = torch.zeros_like(w) if g is None else (w * g.to(w.device)).abs()
        else:
            raise StudioError(
                f"Unknown torch-pruning importance '{importance}': use taylor, l1, l2 or random."
            )
    return elem


@dataclass(frozen=True)
class NormalisedScores:
    """torch-pruning's scores of every group, each group divided by its mean (its default ``normalizer``).

    ``channels`` are the attention channels of each block as (heads, head_dim); ``heads`` their means over dims
    (what the global head ranking uses) and ``head_dims`` their means over heads (what the ``qkv`` scope ranks).
    """

    channels: tuple[torch.Tensor, ...]
    heads: tuple[torch.Tensor, ...]
    head_dims: tuple[torch.Tensor, ...]
    mlp: tuple[torch.Tensor, ...]
    embed: torch.Tensor


def torch_pruning_scores(
    model: VisionTransformer, importance: str, grads: Grads | None = None
) -> NormalisedScores:
    """The scores torch-pruning's ``importance`` gives every unit of ``model``, computed on the studio's groups.

    ``random`` draws torch-pruning's ``RandomImportance`` in its order (each block's attention channels, then its
    neurons, then the embedding), from the caller's random state.
    """
    if importance == "random":
        chans, mlp = [], []
        for blk in model.blocks:
            a = blk.attn
            chans.append(torch.rand(a.num_heads * a.head_dim).double().view(a.num_heads, a.head_dim))
            mlp.append(torch.rand(mlp_hidden(blk.mlp)).double())
        embed = torch.rand(int(model.embed_dim)).double()
    else:
        s = group_sums(model, torch_pruning_elem(model, importance, grads))
        chans = [c / c.mean() for c in s.channels]
        mlp = [m / m.mean() for m in s.mlp]
        assert s.embed is not None
        embed = s.embed / s.embed.mean()
    return NormalisedScores(
        tuple(chans), tuple(c.mean(1) for c in chans), tuple(c.mean(0) for c in chans), tuple(mlp), embed
    )
