"""timm's EVA models (``timm.models.eva.Eva``) as VisionTransformers the studio prunes, computing the same function.

EVA-02 (Fang et al. 2023, "EVA-02: A Visual Representation for Neon Genesis") is a pre-norm ViT whose attention
applies 2-D rotary position embeddings (RoPE; Su et al. 2021, "RoFormer") to q and k of the patch tokens, with
a SwiGLU MLP (packed ``GluMlp``, or ``SwiGLU`` with a hidden norm), q and v biases but no k bias, optionally a
sub-LayerNorm before ``proj`` and LayerScale as bare ``gamma_1``/``gamma_2`` parameters. EVA-01 (``eva_*``) is the
same block without RoPE. timm's ``Eva`` is not a ``VisionTransformer`` (its forward computes the rotary table and
hands it to every block), so the studio rebuilds it, once, where every model is created
(:func:`studio.models.create_vit`, and after a timm checkpoint is loaded into timm's own model,
:func:`studio.load.load_model`), into a timm ``VisionTransformer`` of timm ``Block``s (:func:`convert_eva`):

- the attention is a :class:`RopeAttention`, timm's ``Attention`` (same parameter names: ``qkv``, ``proj``, ``norm``,
  ``q_norm``/``k_norm``) that rotates q and k of the non-prefix tokens with the model's rotary table, held as a
  non-persistent buffer (the table is a function of the grid, recomputed by every rebuild, never exported);
- the fused ``qkv`` takes ``cat(q_bias, 0, v_bias)`` as its bias, or the rows of separate ``q_proj``/``k_proj``/
  ``v_proj``; the k rows' bias starts at zero (EVA has none) and is one more trainable vector per block;
- ``gamma_1``/``gamma_2`` become ``LayerScale`` ``ls1``/``ls2``; the patch embedding, tokens, position embedding,
  norms and head are the model's own modules.

Every weight keeps its value, so the rebuilt model gives timm's logits (up to float rounding) and the plan, surgery,
masking, costs, grouping and every method apply to it as to any ViT. Heads, MLP neurons, embedding channels and
blocks are pruned as in any ViT. **Head dims go in rotary pairs**: a rotation mixes two dims at one frequency, so
a kept dim needs its partner and its frequency's column of the table. The surgery and the masks cut a plan's head
dims exactly when they are whole pairs laid out as the rotation reads them (:func:`check_rope_dims`,
:func:`slice_rope`); the score-based methods keep or drop whole pairs (:func:`head_dim_pairs`, ranked by their
summed scores: the baselines through :func:`studio.prune.select.plan_from_scores`, Isomorphic after
torch-pruning's per-dim ranking); SPLoRA and P3B, whose masks act on single dims during training, refuse them.

DINOv3 (Siméoni et al. 2025, "DINOv3"; timm's ``vit_*_dinov3*`` are ``Eva``s) is the same block with its own
rotary table (``RotaryEmbeddingDinoV3``: periods over a centred, normalised grid, rotate-half, same
``cat(sin, cos)`` layout), register tokens, LayerScale and no absolute position embedding; it is rebuilt the
same way. Models built with ``dynamic_img_size`` (DINOv3's default) are pruned at one image size, the loaded
one: the table is computed for its patch grid and the patch embedding flattens to tokens as a fixed-size one
does, so the rebuilt model computes timm's function at that size (and the export is fixed-size). Rotary
coordinate augmentation (``rope_shift_coords``/``rope_jitter_coords``/``rope_rescale_coords``)
acts in training only: the rebuilt model holds the un-augmented table, so it computes timm's function in eval
and a recovery fine-tunes without the augmentation.

What the rebuild cannot express is refused at load (:func:`eva_refusal`, one sentence each): post-norm blocks
(``EvaBlockPostNorm``), timm's ``AttentionRope`` (``attn_type='rope'``, grouped-query), gated attention, rotary
tables other than the ``cat`` and DINOv3 types or varying per forward (patch dropout, mixed RoPE), and attention-pool or max pooling heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Format, LayerScale
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .errors import StudioError

#: attribute a rebuilt EVA carries: the class name of timm's rotary embedding it came with (None: EVA-01)
ROPE_TYPE = "eva_rope_type"


def rope_pairs(head_dim: int, rotate_half: bool) -> list[tuple[int, int]]:
    """The head-dim pairs one rotation mixes: ``(2i, 2i+1)`` (interleaved) or ``(i, i + d/2)`` (rotate-half)."""
    h = head_dim // 2
    return [(i, i + h) for i in range(h)] if rotate_half else [(2 * i, 2 * i + 1) for i in range(h)]


def check_rope_dims(attn: nn.Module, dims: Sequence[int], block: int) -> None:
    """Refuse kept head dims of a rotary attention that split a pair or break the rotation's layout.

    The kept dims must be whole pairs, laid out as the rotation reads them (interleaved: each pair's two dims
    next to each other; rotate-half: the pairs' first dims, then their second dims in the same order); then the
    sliced rotation (:func:`slice_rope`) rotates each kept pair at its own frequency and a dropped pair is an
    exact zero in the masked model.
    """
    if getattr(attn, "rope", None) is None:
        return
    kept = list(dims)
    half = bool(attn.rotate_half)
    n = len(kept) // 2
    pairs = set(rope_pairs(attn.head_dim, half))
    got = (
        list(zip(kept[:n], kept[n:], strict=True)) if half else list(zip(kept[::2], kept[1::2], strict=False))
    )
    if len(kept) % 2 or any(p not in pairs for p in got):
        layout = "(i, i + d/2), first dims then second dims" if half else "(2i, 2i+1), side by side"
        raise StudioError(
            f"Block {block}'s kept head dims {kept[:8]}... split EVA-02's rotary pairs {layout}: a rotation mixes "
            "the two dims of a pair, so keep or drop them together."
        )


def slice_rope(rope: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """The rotary table ``cat(sin, cos)`` of the kept head dims: each kept dim keeps its own frequency."""
    sin, cos = rope.chunk(2, -1)
    idx = torch.as_tensor(list(dims), dtype=torch.long, device=rope.device)
    return torch.cat([sin.index_select(-1, idx), cos.index_select(-1, idx)], dim=-1)


class RopeAttention(Attention):
    """timm's ``Attention`` with EVA-02's rotary position embedding on q and k of the patch tokens (RoFormer).

    ``rope`` is the model's table ``cat(sin, cos)`` of shape ``(patches, 2·head_dim)`` (a non-persistent buffer,
    ``None`` for EVA-01: then this is timm's ``Attention``); the first ``num_prefix_tokens`` tokens (class,
    registers) are not rotated, as in timm's ``EvaAttention``. ``rotate_half`` pairs dim ``i`` with ``i + d/2``
    instead of ``2i`` with ``2i + 1``. The rotation is elementwise, so it is not counted in the MACs.
    """

    rope: torch.Tensor | None

    def __init__(
        self, *args: Any, rope: torch.Tensor | None, num_prefix_tokens: int, rotate_half: bool, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("rope", rope, persistent=False)
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        n = self.num_prefix_tokens
        rot = apply_rot_embed_cat(t[:, :, n:, :], self.rope, half=self.rotate_half)
        return torch.cat([t[:, :, :n, :], rot.type_as(t)], dim=2)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        q, k, v = heads_qkv(self, x)
        if self.rope is not None:
            q, k = self._rotate(q), self._rotate(k)
        return attend(self, q, k, v, attn_mask, is_causal)


def heads_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ``x`` per head, ``(B, heads, N, head_dim)``, q and k through the qk-norm (timm's Attention)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attend(
    attn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
) -> torch.Tensor:
    """timm Attention's core from per-head q, k, v, with an additive ``mask`` (a bias, for studio.relpos): fused
    SDPA or the explicit path (the same function; studio.attention reads the probabilities of the latter),
    then the output norm and ``proj``. One copy for the studio's attention subclasses."""
    B, _, N, _ = q.shape
    if attn.fused_attn:
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0, is_causal=is_causal
        )
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)
        a = maybe_add_mask(a, resolve_self_attn_mask(N, a, mask, is_causal))
        x = attn.attn_drop(a.softmax(dim=-1)) @ v
    x = x.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    return attn.proj_drop(attn.proj(attn.norm(x)))


def is_eva(model: nn.Module) -> bool:
    """Whether ``model`` is a rebuilt EVA (:func:`convert_eva`): one of its attentions is a RopeAttention."""
    return any(isinstance(getattr(b, "attn", None), RopeAttention) for b in getattr(model, "blocks", ()))


def has_rope(model: nn.Module) -> bool:
    """Whether ``model`` is a rebuilt EVA whose attentions rotate q and k (EVA-02; EVA-01 has no RoPE)."""
    return any(
        getattr(getattr(b, "attn", None), "rope", None) is not None for b in getattr(model, "blocks", ())
    )


def head_dim_pairs(model: nn.Module) -> tuple[tuple[int, int], ...] | None:
    """The head-dim pairs every rotary attention of ``model`` mixes (EVA-02), or None without RoPE.

    What a method keeps or drops together when it prunes head dims (:func:`studio.prune.select.plan_from_scores`
    ``tied_dims``): every block of a rebuilt EVA has one head dim and one rotation layout.
    """
    rotary = [
        b.attn
        for b in getattr(model, "blocks", ())
        if getattr(getattr(b, "attn", None), "rope", None) is not None
    ]
    if not rotary:
        return None
    layouts = {(int(a.head_dim), bool(a.rotate_half)) for a in rotary}
    if len(layouts) > 1:  # never built by convert_eva; a hand-made model
        raise StudioError(
            f"This model's rotary attentions differ in head dim or rotation layout {sorted(layouts)}; the "
            "studio prunes head dims of one layout per model: prune heads, MLP neurons, embedding or blocks."
        )
    ((d, half),) = layouts
    return tuple(rope_pairs(d, half))


def eva_refusal(model: nn.Module) -> str | None:
    """Why timm's ``Eva`` ``model`` cannot be rebuilt as a studio ViT exactly (one sentence), or None."""
    if not isinstance(model, Eva):
        return None
    if model.patch_drop is not None:
        return (
            "This timm Eva uses patch dropout, which drops rows of the rotary table per forward; build it with "
            "patch_drop_rate=0."
        )
    if model.rope is not None and (
        getattr(model, "rope_mixed", False)
        or type(model.rope) not in (RotaryEmbeddingCat, RotaryEmbeddingDinoV3)
    ):
        return (
            f"This timm Eva's rotary embedding is a {type(model.rope).__name__}; the studio supports EVA-02's "
            "RotaryEmbeddingCat (rope_type='cat') and DINOv3's RotaryEmbeddingDinoV3 (rope_type='dinov3') only."
        )
    if model.global_pool not in ("avg", "token", ""):
        return (
            f"This timm Eva pools with global_pool='{model.global_pool}'; the studio prunes EVA with "
            "global_pool='avg' or 'token'."
        )
    for i, blk in enumerate(model.blocks):
        if type(blk) is not EvaBlock:
            return (
                f"Block {i} is a {type(blk).__name__}; the studio prunes EVA's pre-norm EvaBlock only (no "
                "post-norm EvaBlockPostNorm, use_post_norm=False)."
            )
        if type(blk.attn) is not EvaAttention:
            return (
                f"Block {i} uses {type(blk.attn).__name__}; the studio prunes EVA's EvaAttention only (no "
                "attn_type='rope' or grouped-query attention): build it with attn_type='eva'."
            )
        if blk.attn.gate is not None:
            return f"Block {i} uses gated attention, which the studio does not support: build it with gated_attn=False."
    return None


def param_copy(t: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """A parameter holding a copy of ``t``."""
    return nn.Parameter(t.detach().clone(), requires_grad=requires_grad)


def fused_qkv(a: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(weight, bias or None, requires_grad) of the fused qkv that computes ``a``'s q, k and v.

    ``a`` is an attention with a ``qkv`` linear and ``q_bias``/``v_bias`` (EVA, BEiT), or, in EVA, separate
    ``q_proj``/``k_proj``/``v_proj``.
    """
    if a.qkv is not None:
        w, grad = a.qkv.weight, a.qkv.weight.requires_grad
        if a.q_bias is None:
            return w, None, grad
        # EVA has no k bias (timm keeps a zero buffer): the fused bias starts at zero there
        return w, torch.cat((a.q_bias.detach(), torch.zeros_like(a.q_bias), a.v_bias.detach())), grad
    lins = (a.q_proj, a.k_proj, a.v_proj)
    w = torch.cat([lin.weight.detach() for lin in lins])
    if all(lin.bias is None for lin in lins):
        return w, None, a.q_proj.weight.requires_grad
    zero = torch.zeros(lins[0].out_features, dtype=w.dtype, device=w.device)
    b = torch.cat([lin.bias.detach() if lin.bias is not None else zero for lin in lins])
    return w, b, a.q_proj.weight.requires_grad


def as_attention(
    cls: type[Attention], src: nn.Module, qkv: tuple[torch.Tensor, torch.Tensor | None, bool], **extra: Any
) -> Attention:
    """A ``cls`` (timm's ``Attention`` or a studio subclass) holding ``src``'s weights: the fused ``qkv``
    (weight, bias or None, requires_grad: :func:`fused_qkv`), and ``src``'s own proj, dropouts, qk-norm and
    output norm where it has them, scale and fused flag; ``extra`` are ``cls``'s own arguments (EVA, BEiT,
    relpos ViT)."""
    w, b, grad = qkv
    with torch.device("meta"):  # shapes only: every weight is the source's own
        out = cls(
            src.proj.out_features,
            num_heads=src.num_heads,
            attn_head_dim=w.shape[0] // 3 // src.num_heads,
            qkv_bias=b is not None,
            proj_bias=src.proj.bias is not None,
            **extra,
        )
    out.qkv.weight = param_copy(w, grad)
    out.qkv.bias = None if b is None else param_copy(b, grad)
    out.proj, out.proj_drop, out.attn_drop = src.proj, src.proj_drop, src.attn_drop
    for name in ("q_norm", "k_norm", "norm"):  # where the source has none, timm's identities stay
        if hasattr(src, name):
            setattr(out, name, getattr(src, name))
    out.scale, out.fused_attn = src.scale, src.fused_attn
    return out


def _attention(a: EvaAttention, rope: torch.Tensor | None) -> Attention:
    out = as_attention(
        RopeAttention,
        a,
        fused_qkv(a),
        rope=None,
        num_prefix_tokens=a.num_prefix_tokens,
        rotate_half=bool(a.rotate_half),
    )
    out.register_buffer("rope", rope, persistent=False)
    return out


def layer_scale(gamma: nn.Parameter | None) -> nn.Module:
    """timm's ``LayerScale`` holding a copy of a bare ``gamma`` parameter (EVA, BEiT), or an identity."""
    if gamma is None:
        return nn.Identity()
    with torch.device("meta"):
        ls = LayerScale(gamma.shape[0])
    ls.gamma = param_copy(gamma, gamma.requires_grad)
    return ls


def as_block(src: nn.Module, attn: nn.Module, ls1: nn.Module, ls2: nn.Module) -> Block:
    """A timm pre-norm ``Block`` of ``attn``, ``src``'s norms, MLP and drop paths, and the LayerScales given."""
    with torch.device("meta"):
        out = Block(src.norm1.normalized_shape[0], num_heads=1)
    out.norm1, out.attn, out.ls1, out.drop_path1 = src.norm1, attn, ls1, src.drop_path1
    out.norm2, out.mlp, out.ls2, out.drop_path2 = src.norm2, src.mlp, ls2, src.drop_path2
    return out


def _block(blk: EvaBlock, rope: torch.Tensor | None) -> Block:
    return as_block(blk, _attention(blk.attn, rope), layer_scale(blk.gamma_1), layer_scale(blk.gamma_2))


def convert_eva(model: nn.Module) -> nn.Module:
    """The timm ``VisionTransformer`` computing what timm's ``Eva`` ``model`` computes (other models unchanged).

    Raises nothing: an Eva that :func:`eva_refusal` refuses is returned as it is, and the family check
    (:func:`studio.families.check`) reports the sentence.
    """
    if not isinstance(model, Eva) or eva_refusal(model) is not None:
        return model
    pe = model.patch_embed
    rope = None
    if model.rope is not None:  # fixed grid: the same table in every forward
        was = model.rope.training
        model.rope.eval()  # the un-augmented table (coordinate augmentation acts in training only)
        rope = model.rope.get_embed(shape=list(pe.grid_size)).detach()
        model.rope.train(was)
    if model.dynamic_img_size:
        # the studio prunes at one image size (the model's): its patch grid is the table's, and the patch
        # embedding flattens to tokens as a fixed-size one does (timm's dynamic mode leaves it NHWC)
        pe.flatten, pe.output_fmt, pe.strict_img_size = True, Format.NCHW, True
    vit = as_vit(
        model,
        [_block(b, rope) for b in model.blocks],
        reg_token=model.reg_token,
        no_embed_class=model.no_embed_class,
        norm_pre=model.norm_pre,
    )
    setattr(vit, ROPE_TYPE, None if model.rope is None else type(model.rope).__name__)
    return vit


def as_vit(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    *,
    reg_token: nn.Parameter | None = None,
    no_embed_class: bool = False,
    norm_pre: nn.Module | None = None,
) -> VisionTransformer:
    """A timm ``VisionTransformer`` of ``blocks`` around ``model``'s own stem and head (EVA, BEiT, relpos ViT).

    ``model`` has timm's usual attribute names (``patch_embed``, ``cls_token``, ``pos_embed`` or None,
    ``norm``, ``fc_norm``, ``head_drop``, ``head``, ``global_pool``); its ``pos_drop`` (an identity where it has
    none) runs after the tokens are concatenated, as in the model. Without a position embedding timm's
    ``VisionTransformer`` skips ``pos_drop``, so the same module is also its ``patch_drop`` (one call either way).
    """
    pe = model.patch_embed
    cls_token = getattr(model, "cls_token", None)
    with torch.device("meta"):  # the skeleton only: every module below is replaced by the model's own
        vit = VisionTransformer(
            img_size=pe.img_size,
            patch_size=pe.patch_size,
            embed_dim=model.embed_dim,
            depth=0,
            num_heads=1,
            num_classes=model.num_classes,
            global_pool=model.global_pool,
            class_token=cls_token is not None,
            reg_tokens=0 if reg_token is None else reg_token.shape[1],
            no_embed_class=no_embed_class,
            fc_norm=not isinstance(model.fc_norm, nn.Identity),
        )
    vit.patch_embed, vit.cls_token, vit.reg_token = pe, cls_token, reg_token
    vit.pos_embed = getattr(model, "pos_embed", None)
    pos_drop = getattr(model, "pos_drop", None)
    vit.pos_drop = nn.Identity() if pos_drop is None else pos_drop
    vit.patch_drop = nn.Identity() if vit.pos_embed is not None else vit.pos_drop
    vit.norm_pre = nn.Identity() if norm_pre is None else norm_pre
    vit.blocks = nn.Sequential(*blocks)
    vit.norm, vit.fc_norm, vit.head_drop, vit.head = model.norm, model.fc_norm, model.head_drop, model.head
    vit.num_prefix_tokens, vit.has_class_token = model.num_prefix_tokens, cls_token is not None
    vit.feature_info = list(getattr(model, "feature_info", vit.feature_info))
    for name in ("pretrained_cfg", "default_cfg", "pretrained_cfg_overlay"):
        if hasattr(model, name):
            setattr(vit, name, getattr(model, name))
    return vit.train(model.training)
