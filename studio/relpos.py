"""timm's relative-position ViTs and BEiT as VisionTransformers the studio prunes, computing the same function.

BEiT (Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers"; ``timm.models.beit.Beit``, ``beit_*``,
``beitv2_*``) is a pre-norm ViT with a class token whose attention adds a learned per-head bias, looked up by
the relative offset of two patches in a table (as in Swin-V1), to the attention logits; three more table rows
hold the class token's bias to, from and with itself. The table is per block, or one model-level table shared by
every block (``use_shared_rel_pos_bias``), or both (they add). q and v have biases, k none; LayerScale is bare
``gamma_1``/``gamma_2`` parameters.

timm's relative-position ViTs (``timm.models.vision_transformer_relpos.VisionTransformerRelPos``, ``vit_relpos_*``,
``vit_srelpos_*``; timm's implementation after Shaw et al. 2018, "Self-Attention with Relative Position
Representations", and Swin's relative position bias) have no absolute position embedding; the per-head bias is
a table (``RelPosBias``, rows for the class token as in BEiT) or, by default, Swin-V2's log-spaced continuous
position bias (Liu et al. 2022, "Swin Transformer V2"): a small MLP (``RelPosMlp``) maps the log-spaced
coordinates of each relative offset to one bias per head, zero for the class token's row and column. ``vit_srelpos_*``
share one bias module across the blocks.

Neither is a ``VisionTransformer`` (their forwards hand the shared bias to every block), so the studio rebuilds
them, once, where every model is created (:func:`studio.models.create_vit`, and after a timm checkpoint is
loaded into timm's own model, :func:`studio.load.load_model`), into a timm ``VisionTransformer`` of timm
``Block``s (:func:`convert_relpos`):

- the attention is a :class:`RelPosAttention`, timm's ``Attention`` (same parameter names: ``qkv``, ``proj``,
  ``norm``, ``q_norm``/``k_norm``) that adds its ``rel_pos`` module's ``(1, heads, N, N)`` bias to the logits:
  a :class:`RelPosTable` (BEiT, ``RelPosBias``) or a :class:`RelPosMlpBias` (``RelPosMlp``);
- BEiT's ``q_bias``/``v_bias`` become one biased ``qkv`` with a zero, trainable k bias, and ``gamma_1``/
  ``gamma_2`` ``LayerScale`` (:func:`studio.eva.fused_qkv`, :func:`studio.eva.layer_scale`, as for EVA);
- a shared bias becomes **one copy per block** (a per-block table and the shared one add into one table): the
  surgery prunes heads per block, so each block must own the bias columns of its own kept heads. An unpruned
  rebuilt model computes timm's function, but fine-tuning then trains the copies apart;
- the lookup index and the MLP's log-spaced coordinates are functions of the grid: non-persistent buffers that
  every rebuild recomputes (timm's constructor computes them), never exported.

Heads, head dims, MLP neurons, embedding channels and blocks are pruned by every method: the bias is per head,
so a pruned head keeps its table column or its MLP output row (:meth:`RelPosTable.keep_heads`, which the
surgery calls), and the masked model stays exact (a dropped head's v is zero, whatever its logits). The MLP of
``RelPosMlp`` runs once per forward on the ``(2h-1)(2w-1)`` offsets; the analytic costs count it
(:meth:`RelPosMlpBias.costs`) rather than cache its output, so it stays trainable and exportable.

What the rebuild cannot express is refused at load (:func:`relpos_refusal`, one sentence each): timm's post-norm
``ResPostRelPosBlock`` (``vit_relpos_*_rpn_*``: a norm on each branch's output, which timm's pre-norm ``Block``
cannot express), other blocks or MLPs, and bias modules other than ``RelPosBias`` and ``RelPosMlp``. Neither
model has a dynamic image size or an attention-pool head to refuse (timm's constructors allow none).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import RelPosBias, RelPosMlp
from timm.layers.attention import Attention, maybe_add_mask
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import RelPosBlock, VisionTransformerRelPos
from torch import nn

from .eva import as_attention, as_block, as_vit, attend, fused_qkv, heads_qkv, layer_scale, param_copy

#: timm's model types :func:`convert_relpos` rebuilds
REBUILT_TYPES: tuple[type[nn.Module], ...] = (Beit, VisionTransformerRelPos)
#: attribute a rebuilt model carries: ``"beit"`` or ``"vit_relpos"`` (how the families find it)
ORIGIN = "relpos_origin"
#: attribute a rebuilt model carries: whether timm's model shared one bias across its blocks
SHARED = "relpos_shared"


class BiasCosts(NamedTuple):
    """What one block's relative position bias costs in one forward (:func:`studio.costs.plan_cost`)."""

    params_per_head: int
    params_fixed: int
    macs_per_head: int
    macs_fixed: int


class RelPosTable(nn.Module):
    """A per-head bias looked up in a learned table of relative offsets (BEiT, timm's ``RelPosBias``).

    ``relative_position_bias_table`` is ``(offsets, heads)``; ``relative_position_index`` (non-persistent) gives,
    for each of the ``N × N`` token pairs, its row (the class token's rows included, as timm lays them out).
    """

    relative_position_index: torch.Tensor

    def __init__(self, table: nn.Parameter, index: torch.Tensor, tokens: int) -> None:
        super().__init__()
        self.relative_position_bias_table = table
        self.register_buffer("relative_position_index", index.reshape(-1), persistent=False)
        self.tokens = tokens

    def forward(self) -> torch.Tensor:
        """The ``(1, heads, N, N)`` bias."""
        t = self.relative_position_bias_table
        bias = t[self.relative_position_index].view(self.tokens, self.tokens, t.shape[1])
        return bias.permute(2, 0, 1).unsqueeze(0)

    def keep_heads(self, heads: Sequence[int]) -> None:
        """Keep the table columns of ``heads`` (in that order)."""
        t = self.relative_position_bias_table
        idx = torch.as_tensor(list(heads), dtype=torch.long, device=t.device)
        self.relative_position_bias_table = nn.Parameter(
            t.detach().index_select(1, idx), requires_grad=t.requires_grad
        )

    def costs(self) -> BiasCosts:
        """A table column per head; the lookup has no MACs."""
        return BiasCosts(int(self.relative_position_bias_table.shape[0]), 0, 0, 0)


class RelPosMlpBias(nn.Module):
    """Swin-V2's continuous per-head bias (timm's ``RelPosMlp``): an MLP of the log-spaced relative offsets.

    ``mlp`` maps each offset's two coordinates (``rel_coords_log``, ``(2h-1, 2w-1, 2)``) to one value per head
    (its ``fc2`` output rows are the heads); ``relative_position_index`` picks each patch pair's offset; ``act``
    and ``gain`` are Swin-V2's ``16·sigmoid`` (``mode='swin'``) or an identity; the ``prefix`` tokens' rows and
    columns are zero, as in timm.
    """

    relative_position_index: torch.Tensor
    rel_coords_log: torch.Tensor

    def __init__(
        self,
        mlp: nn.Module,
        coords: torch.Tensor,
        index: torch.Tensor,
        patches: int,
        prefix: int,
        act: nn.Module,
        gain: float | None,
    ) -> None:
        super().__init__()
        self.mlp, self.act, self.gain = mlp, act, gain
        self.register_buffer("rel_coords_log", coords, persistent=False)
        self.register_buffer("relative_position_index", index.reshape(-1), persistent=False)
        self.patches, self.prefix = patches, prefix

    def forward(self) -> torch.Tensor:
        """The ``(1, heads, N, N)`` bias."""
        out = self.mlp(self.rel_coords_log)
        heads = out.shape[-1]
        bias = out.reshape(-1, heads)[self.relative_position_index].view(self.patches, self.patches, heads)
        bias = self.act(bias.permute(2, 0, 1))
        if self.gain is not None:
            bias = self.gain * bias
        if self.prefix:
            bias = F.pad(bias, [self.prefix, 0, self.prefix, 0])
        return bias.unsqueeze(0)

    def keep_heads(self, heads: Sequence[int]) -> None:
        """Keep the MLP's output rows (weight and bias) of ``heads`` (in that order)."""
        fc2 = self.mlp.fc2
        idx = torch.as_tensor(list(heads), dtype=torch.long, device=fc2.weight.device)
        fc2.weight = nn.Parameter(
            fc2.weight.detach().index_select(0, idx), requires_grad=fc2.weight.requires_grad
        )
        if fc2.bias is not None:
            fc2.bias = nn.Parameter(
                fc2.bias.detach().index_select(0, idx), requires_grad=fc2.bias.requires_grad
            )
        fc2.out_features = len(idx)

    def costs(self) -> BiasCosts:
        """The MLP on every offset: ``fc1`` is fixed, each head owns an ``fc2`` row.

        The MLP runs once per forward, whatever the batch: its MACs are counted per image at batch size 1, as
        :func:`studio.bench.count_macs` counts them.
        """
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        offsets = self.rel_coords_log.numel() // self.rel_coords_log.shape[-1]
        fixed = sum(p.numel() for p in fc1.parameters())
        per = fc2.in_features + (1 if fc2.bias is not None else 0)
        return BiasCosts(per, fixed, offsets * fc2.in_features, offsets * fc1.in_features * fc1.out_features)


#: the per-head bias modules a :class:`RelPosAttention` holds
RelPosModule = RelPosTable | RelPosMlpBias


class RelPosAttention(Attention):
    """timm's ``Attention`` adding its ``rel_pos`` module's per-head bias to the attention logits (or, with
    ``rel_pos=None``, timm's ``Attention``). The bias is added before the softmax on the fused (SDPA's float
    mask) and the explicit path alike; an ``attn_mask`` given by the caller adds to it."""

    def __init__(self, *args: Any, rel_pos: RelPosModule | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rel_pos = rel_pos

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        q, k, v = heads_qkv(self, x)
        bias = attn_mask
        if self.rel_pos is not None:
            bias = maybe_add_mask(self.rel_pos().to(q.dtype), attn_mask)
        return attend(self, q, k, v, bias, is_causal)


def is_relpos(model: nn.Module) -> bool:
    """Whether ``model`` is a rebuilt BEiT or relative-position ViT (:func:`convert_relpos`)."""
    return getattr(model, ORIGIN, None) is not None


def bias_kind(model: nn.Module) -> type[nn.Module] | None:
    """The bias module type of a rebuilt model's first biased attention (None: no relative bias)."""
    for b in getattr(model, "blocks", ()):
        rp = getattr(getattr(b, "attn", None), "rel_pos", None)
        if rp is not None:
            return type(rp)
    return None


# ------------------------------------------------------------------------------------------------ refusals
def relpos_refusal(model: nn.Module) -> str | None:
    """Why timm's ``Beit`` or ``VisionTransformerRelPos`` ``model`` cannot be rebuilt exactly (one sentence), or
    None (also for any other model)."""
    if isinstance(model, Beit):
        for i, blk in enumerate(model.blocks):
            if type(blk) is not BeitBlock:
                return (
                    f"Block {i} is a {type(blk).__name__}; the studio prunes BEiT's pre-norm Block only: use a "
                    "beit_* or beitv2_* architecture."
                )
        return None
    if not isinstance(model, VisionTransformerRelPos):
        return None
    for i, blk in enumerate(model.blocks):
        if type(blk).__name__ == "ResPostRelPosBlock":
            return (
                f"Block {i} is timm's post-norm ResPostRelPosBlock (a norm on each branch's output), which timm's "
                "pre-norm Block cannot express; the studio prunes the pre-norm RelPosBlock only: use a vit_relpos_* "
                "architecture without '_rpn' (block_fn=RelPosBlock)."
            )
        if type(blk) is not RelPosBlock or type(blk.mlp).__name__ != "Mlp":
            return (
                f"Block {i} is a {type(blk).__name__} with a {type(getattr(blk, 'mlp', None)).__name__}; the "
                "studio prunes timm's pre-norm RelPosBlock with its Mlp only: use a vit_relpos_* architecture."
            )
    for where, rp in [("the shared bias", model.shared_rel_pos)] + [
        (f"block {i}'s bias", b.attn.rel_pos) for i, b in enumerate(model.blocks)
    ]:
        if rp is not None and type(rp) not in (RelPosBias, RelPosMlp):
            return (
                f"The relative position module of {where} is a {type(rp).__name__}; the studio rebuilds timm's "
                "RelPosBias and RelPosMlp only: build the model with rel_pos_type='mlp' or 'bias'."
            )
    return None


# ---------------------------------------------------------------------------------------------- rebuild
def _table(src: nn.Module, tokens: int, shared: nn.Module | None = None) -> RelPosTable:
    """A :class:`RelPosTable` copying ``src``'s table and index (plus ``shared``'s table: same layout, and
    BEiT adds the two biases)."""
    t = src.relative_position_bias_table
    data = t.detach() if shared is None else t.detach() + shared.relative_position_bias_table.detach()
    return RelPosTable(
        param_copy(data, t.requires_grad), src.relative_position_index.detach().clone(), tokens
    )


def _mlp_bias(src: RelPosMlp) -> RelPosMlpBias:
    return RelPosMlpBias(
        copy.deepcopy(src.mlp),
        src.rel_coords_log.detach().clone(),
        src.relative_position_index.detach().clone(),
        src.window_area,
        src.prefix_tokens,
        copy.deepcopy(src.bias_act),
        src.bias_gain,
    )


def _attention(
    src: nn.Module, qkv: tuple[torch.Tensor, torch.Tensor | None, bool], rel_pos: RelPosModule | None
) -> RelPosAttention:
    out = as_attention(RelPosAttention, src, qkv, rel_pos=None)
    out.rel_pos = rel_pos
    return out


def _beit(model: Beit) -> VisionTransformer:
    shared = model.rel_pos_bias
    N = model.patch_embed.num_patches + 1
    blocks = []
    for blk in model.blocks:
        a = blk.attn
        if a.relative_position_bias_table is not None:
            rel_pos: RelPosModule | None = _table(a, N, shared)
        elif shared is not None:
            rel_pos = _table(shared, N)
        else:
            rel_pos = None
        blocks.append(
            as_block(
                blk, _attention(a, fused_qkv(a), rel_pos), layer_scale(blk.gamma_1), layer_scale(blk.gamma_2)
            )
        )
    vit = as_vit(model, blocks)
    setattr(vit, SHARED, shared is not None)
    return vit


def _relpos(model: VisionTransformerRelPos) -> VisionTransformer:
    shared = model.shared_rel_pos
    N = model.patch_embed.num_patches + model.num_prefix_tokens
    blocks = []
    for blk in model.blocks:
        a = blk.attn
        src = a.rel_pos if a.rel_pos is not None else shared  # timm's block uses its own bias first
        if isinstance(src, RelPosMlp):
            rel_pos: RelPosModule | None = _mlp_bias(src)
        elif src is not None:
            rel_pos = _table(src, N)
        else:
            rel_pos = None
        qkv = (a.qkv.weight, a.qkv.bias, a.qkv.weight.requires_grad)
        blocks.append(as_block(blk, _attention(a, qkv, rel_pos), blk.ls1, blk.ls2))
    vit = as_vit(model, blocks)
    setattr(vit, SHARED, shared is not None)
    return vit


def convert_relpos(model: nn.Module) -> nn.Module:
    """The timm ``VisionTransformer`` computing what timm's ``Beit`` or ``VisionTransformerRelPos`` ``model``
    computes (other models unchanged).

    Raises nothing: a model that :func:`relpos_refusal` refuses is returned as it is, and the family check
    (:func:`studio.families.check`) reports the sentence.
    """
    if not isinstance(model, REBUILT_TYPES) or relpos_refusal(model) is not None:
        return model
    vit = _beit(model) if isinstance(model, Beit) else _relpos(model)
    setattr(vit, ORIGIN, "beit" if isinstance(model, Beit) else "vit_relpos")
    return vit
