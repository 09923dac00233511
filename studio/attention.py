"""CLS attention maps per kept head and attention rollout, read from the model's own attention modules.

No second implementation of attention: each block's timm ``Attention`` is run on its explicit path
(``fused_attn = False``; fused SDPA never materialises the probabilities) and a forward hook on its ``attn_drop``
(the identity at inference, applied to ``softmax(q k^T * scale)``) records the probabilities it computed. The
explicit path is the same function as the fused one (the surgery keeps ``attn.scale`` equal to the SDPA
temperature), so the maps are those of the model as it predicts. The flags are flipped on a deep copy: the model
passed in (a cached, shared one) is never changed.

Heads are named by their index in the *base* model, so a pruned model's maps sit beside the dense model's with
the removed heads marked: :func:`cls_attention` takes the plan the model was pruned with (None: unpruned).
Rollout (Abnar & Zuidema, 2020): per block, the head-mean attention plus the identity (the residual), rows
renormalised, multiplied through the blocks; its CLS row over the patches.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import DataSpec, prepare
from .errors import StudioError
from .models import LoadedModel
from .plan import PrunePlan


@dataclass(frozen=True)
class BlockAttention:
    """One kept block: its base index, the base indices of its kept heads and their CLS maps.

    ``maps`` is ``(images, kept heads, grid_h, grid_w)``: each kept head's attention from the CLS token to every
    patch. ``removed`` are the base heads the plan removed from this block.
    """

    block: int
    heads: tuple[int, ...]
    removed: tuple[int, ...]
    maps: torch.Tensor


@dataclass(frozen=True)
class AttentionMaps:
    """CLS attention of every kept block and head, and the rollout, for a batch of images."""

    blocks: tuple[BlockAttention, ...]
    removed_blocks: tuple[int, ...]
    rollout: torch.Tensor  # (images, grid_h, grid_w)
    grid: tuple[int, int]

    def block(self, index: int) -> BlockAttention | None:
        """The maps of base block ``index`` (None if the plan removed it)."""
        return next((b for b in self.blocks if b.block == index), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": list(self.grid),
            "removed_blocks": list(self.removed_blocks),
            "blocks": [
                {
                    "block": b.block,
                    "heads": list(b.heads),
                    "removed": list(b.removed),
                    "maps": b.maps.tolist(),
                }
                for b in self.blocks
            ],
            "rollout": self.rollout.tolist(),
        }


def _attentions(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    mods = [getattr(b, "attn", None) for b in (blocks or [])]
    bad = [i for i, a in enumerate(mods) if not (hasattr(a, "attn_drop") and hasattr(a, "fused_attn"))]
    if not mods or bad:
        raise StudioError(
            "Attention maps need timm ViT blocks whose attention has an explicit path (timm's Attention); "
            f"block {bad[0] if bad else 0} has none."
        )
    return mods


@torch.inference_mode()
def cls_attention(
    model: nn.Module,
    images: torch.Tensor,
    *,
    plan: PrunePlan | None = None,
    num_prefix_tokens: int | None = None,
) -> AttentionMaps:
    """CLS attention per kept head of every kept block, and the rollout, of ``model`` on ``images``.

    Args:
        model: a timm ViT, unpruned or pruned with ``plan`` (not modified: a copy runs).
        images: a normalised batch ``(B, 3, H, W)`` on the model's device.
        plan: the plan ``model`` was pruned with, to name blocks and heads in base indices (None: unpruned).
        num_prefix_tokens: CLS/register/distillation tokens before the patches (default: the model's).
    """
    m = copy.deepcopy(model).eval()
    attns = _attentions(m)
    prefix = int(num_prefix_tokens if num_prefix_tokens is not None else getattr(m, "num_prefix_tokens", 1))
    if prefix < 1:
        raise StudioError("CLS attention needs a model with a class token (num_prefix_tokens >= 1).")
    kept_blocks = list(range(len(attns))) if plan is None else [b.index for b in plan.blocks]
    if len(kept_blocks) != len(attns):
        raise StudioError(
            f"The plan keeps {len(kept_blocks)} blocks but the model has {len(attns)}: give the plan it was "
            "pruned with."
        )
    probs: list[torch.Tensor] = []
    hooks = []
    for a in attns:
        a.fused_attn = False  # the explicit path materialises softmax(q k^T * scale); same function as SDPA
        hooks.append(
            a.attn_drop.register_forward_hook(lambda _m, _i, out: probs.append(out.detach().float()))
        )
    try:
        m(images)
    finally:
        for h in hooks:
            h.remove()
    if len(probs) != len(attns):
        raise StudioError(
            "The model's attention modules did not all run their explicit path; cannot read maps."
        )
    n_patches = probs[0].shape[-1] - prefix
    grid = _grid(m, n_patches)
    blocks = []
    for index, p in zip(kept_blocks, probs):
        base_heads = _base_heads(plan, index, p.shape[1])
        cls_row = p[:, :, 0, prefix:]  # (B, kept heads, patches)
        blocks.append(
            BlockAttention(
                block=index,
                heads=base_heads,
                removed=_removed_heads(plan, index, base_heads),
                maps=cls_row.reshape(*cls_row.shape[:2], *grid).cpu(),
            )
        )
    removed_blocks = () if plan is None else tuple(i for i in range(plan.base.depth) if i not in kept_blocks)
    return AttentionMaps(tuple(blocks), removed_blocks, _rollout(probs, prefix, grid), grid)


def _grid(model: nn.Module, n: int) -> tuple[int, int]:
    g = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if g is not None and int(g[0]) * int(g[1]) == n:
        return int(g[0]), int(g[1])
    side = round(n**0.5)
    if side * side != n:
        raise StudioError(f"Cannot lay {n} patch tokens out as a grid.")
    return side, side


def _base_heads(plan: PrunePlan | None, index: int, kept: int) -> tuple[int, ...]:
    b = None if plan is None else plan.block(index)
    heads = tuple(range(kept)) if b is None or b.heads is None else tuple(b.heads)
    if len(heads) != kept:
        raise StudioError(
            f"Block {index} runs {kept} heads but the plan keeps {len(heads)}: give the plan it was pruned with."
        )
    return heads


def _removed_heads(plan: PrunePlan | None, index: int, kept: Sequence[int]) -> tuple[int, ...]:
    if plan is None:
        return ()
    return tuple(h for h in range(plan.base.num_heads[index]) if h not in set(kept))


def _rollout(probs: Sequence[torch.Tensor], prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Attention rollout over the blocks: (head-mean + identity), rows renormalised, multiplied; CLS row."""
    n = probs[0].shape[-1]
    eye = torch.eye(n, dtype=probs[0].dtype, device=probs[0].device)
    joint = eye.expand(probs[0].shape[0], n, n)
    for p in probs:
        a = p.mean(dim=1) + eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a @ joint
    cls = joint[:, 0, prefix:]
    return cls.reshape(cls.shape[0], *grid).cpu()


@dataclass(frozen=True)
class AttentionPair:
    """The same images through the dense and the pruned model: pictures (denormalised, ``(H, W, 3)`` in [0, 1]),
    labels, and both models' maps, heads in base indices (the pruned one's removed heads listed per block)."""

    images: tuple[Any, ...]
    labels: tuple[int, ...]
    dense: AttentionMaps
    pruned: AttentionMaps
    num_heads: tuple[int, ...]  # the base's heads per block


def attention_pair(
    dense: LoadedModel, pruned: LoadedModel, data: DataSpec, indices: Sequence[int], *, split: str = "test"
) -> AttentionPair:
    """CLS maps of the dense model and of a pruned form of it (an export: its plan names the kept units) on the
    images ``indices`` of ``split``, preprocessed as the dense model expects."""
    if pruned.plan is None:
        raise StudioError(f"{pruned.source} has no plan: pick a pruned model to compare with the dense one.")
    pruned.plan.made_for(dense.base)
    ds = prepare(data, split, dense.data_config, dense.base.num_classes, class_names=dense.known_class_names)
    bad = [i for i in indices if not 0 <= int(i) < len(ds)]  # type: ignore[arg-type]
    if bad or not indices:
        raise StudioError(
            f"Image {bad[0] if bad else '(none)'} is not in the {split} split (0..{len(ds) - 1})."
        )  # type: ignore[arg-type]
    items = [ds[int(i)] for i in indices]
    x = torch.stack([im for im, _ in items])
    mean = torch.tensor(dense.data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(dense.data_config["std"]).view(3, 1, 1)
    pictures = tuple((im * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() for im in x)
    return AttentionPair(
        images=pictures,
        labels=tuple(int(y) for _, y in items),
        dense=cls_attention(dense.model, x.to(dense.device)),
        pruned=cls_attention(pruned.model, x.to(pruned.device), plan=pruned.plan),
        num_heads=dense.base.num_heads,
    )
