"""The one surgery: physically remove what a :class:`~studio.plan.PrunePlan` drops from a timm ViT.

Every method ends with a plan and every plan is applied here, so pruning, export reloading and CLI replay share
one code path. What is sliced (``index_select`` on the weights, in base-model indices):

- depth: blocks absent from the plan are dropped (``model.blocks = nn.Sequential(kept)``);
- heads and head dims: ``qkv`` rows of q, k and v of the kept (head, dim) pairs, ``proj`` input columns;
  ``num_heads``, ``head_dim``, ``attn_dim`` and ``scale`` are updated (timm's ``Attention.forward`` reads them,
  so no forward is replaced); an attention's per-head bias module (``rel_pos``, :mod:`studio.relpos`) keeps the
  kept heads' through its ``keep_heads``;
- MLP neurons: ``fc1`` rows (+bias; both halves of a GLU, or ``fc1_g`` and ``fc1_x`` rows of a SwiGLU:
  :class:`studio.families.MlpLayout`), ``fc2`` columns;
- embedding channels: ``patch_embed.proj`` output channels, ``cls_token`` / ``reg_token`` / ``dist_token`` /
  ``pos_embed`` as data, every LayerNorm, the ``qkv``/``fc1`` input columns, ``proj``/``fc2`` output rows,
  LayerScale, and the input columns of ``head`` (and ``head_dist`` of distilled DeiT);
- per-block residual subsets (P3B): the block becomes a :class:`ResidualSubsetBlock` that reads and writes only
  its channels of the residual stream.

Why plain ``index_select`` and not torch-pruning's DependencyGraph: the plan already names every kept index, so
there is nothing to discover; tracing timm ViTs has known failures (unwrapped ``cls_token``/``pos_embed``,
fused attention, forward-signature drift — see research/anchors.md §2), and replaying its pruning history needs
a re-trace of the model. Explicit slicing is exact, deterministic, needs no example input, and is the same on
every device; the coupling it encodes (which weights share an index) is written out once, here.

Attention temperature after head-dim pruning: timm's fused SDPA ignores ``attn.scale`` and always uses
``1/sqrt(head_dim)``. To keep the base temperature (``scale_policy="keep"``) the factor
``sqrt(d_new)/sqrt(d_old)`` is folded into the q rows of ``qkv`` and ``attn.scale`` is set to ``d_new**-0.5``,
so the fused and the explicit paths compute the same function. ``"reset"`` uses ``1/sqrt(d_new)`` unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention, maybe_add_mask
from timm.layers.attention_pool import AttentionPoolLatent
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .errors import StudioError
from .eva import check_rope_dims, slice_rope
from .families import mlp_hidden, mlp_layout
from .models import check_family, describe_base
from .parallel import ParallelBlock
from .petl import ConvpassBlock, check_unfused
from .plan import BaseArch, BlockPlan, PrunePlan

Index = Sequence[int] | None


# ----------------------------------------------------------------------------------------------- modules
class ResidualSubsetBlock(nn.Module):
    """A pre-norm ViT block whose branches read and write subsets of the residual stream (P3B).

    ``x_sub = x[..., in_idx]`` -> LayerNorm over the kept channels -> branch -> ``x[..., out_idx] += y``.
    ``attn_in``/``attn_out``/``mlp_in``/``mlp_out`` are positions among the model's kept embedding channels,
    stored as buffers (they travel in ``state_dict`` and safetensors); a ``None`` buffer means "all channels".
    The write is a gather from ``[y, 0]`` (``Gather`` in ONNX, dynamic batch) rather than ``index_add``, whose
    ONNX export fixes the batch size. Submodule names are those of timm's ``Block``, so weight keys match.
    """

    attn_in: torch.Tensor | None
    attn_out: torch.Tensor | None
    mlp_in: torch.Tensor | None
    mlp_out: torch.Tensor | None

    def __init__(self, block: Block, idx: dict[str, torch.Tensor | None], width: int) -> None:
        super().__init__()
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, getattr(block, name))
        for name in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            self.register_buffer(name, idx.get(name))
        for name in ("attn_out", "mlp_out"):
            self.register_buffer(f"{name}_gather", _scatter_map(idx.get(name), width), persistent=False)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        h = x if self.attn_in is None else x.index_select(-1, self.attn_in)
        y = self.drop_path1(self.ls1(self.attn(self.norm1(h), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + _spread(y, self.attn_out_gather)
        h = x if self.mlp_in is None else x.index_select(-1, self.mlp_in)
        y = self.drop_path2(self.ls2(self.mlp(self.norm2(h))))
        return x + _spread(y, self.mlp_out_gather)


def _scatter_map(out_idx: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """For each of ``width`` channels, its position in ``out_idx``, or ``len(out_idx)`` (a zero column)."""
    if out_idx is None:
        return None
    m = torch.full((width,), len(out_idx), dtype=torch.long, device=out_idx.device)
    m[out_idx] = torch.arange(len(out_idx), device=out_idx.device)
    return m


def _spread(y: torch.Tensor, gather: torch.Tensor | None) -> torch.Tensor:
    if gather is None:
        return y
    return torch.cat([y, y.new_zeros(*y.shape[:-1], 1)], dim=-1).index_select(-1, gather)


class SubsetNorm(nn.Module):
    """Normalise only channels ``idx`` (statistics over them alone) and output zeros elsewhere.

    Used by :func:`mask_model`: a dense model whose norms see exactly the channels a pruned model keeps, so the
    masked and the pruned model compute the same function.
    """

    idx: torch.Tensor

    def __init__(self, norm: nn.Module, idx: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("idx", torch.as_tensor(list(idx), dtype=torch.long, device=_device_of(norm)))
        self.norm = _slice_norm(copy.deepcopy(norm), self.idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x).index_copy(-1, self.idx, self.norm(x.index_select(-1, self.idx)))


# --------------------------------------------------------------------------------------------- checking
def check_supported(model: nn.Module) -> VisionTransformer:
    """Refuse models the surgery cannot slice exactly, saying what is unsupported (the family check of
    :func:`studio.models.check_family`, also accepting blocks this surgery has already pruned)."""
    return check_family(model, blocks=(Block, ResidualSubsetBlock, ParallelBlock, ConvpassBlock))


def check_fits(model: nn.Module, base: BaseArch) -> None:
    """Refuse a model whose structure is not the (unpruned) base the plan refers to."""

    vit = check_supported(model)
    if any(isinstance(b, ResidualSubsetBlock) for b in vit.blocks):
        raise StudioError(
            "This model is already pruned; a plan applies to its unpruned base. Load the base model "
            "(or an unpruned export) and apply the plan to it."
        )
    have = describe_base(vit, base.arch, base.kwargs)
    fields = ("depth", "embed_dim", "num_heads", "head_dim", "mlp_hidden", "num_classes", "num_prefix_tokens")
    bad = [f for f in fields if getattr(have, f) != getattr(base, f)]
    if bad:
        f = bad[0]
        raise StudioError(
            f"The plan does not fit this model: plan base has {f}={getattr(base, f)}, the model has "
            f"{getattr(have, f)}. Apply the plan to the model it was made for ({base.arch}), "
            "or make a new plan for this model."
        )


# --------------------------------------------------------------------------------------------- slicing
def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _as_index(idx: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(list(idx), dtype=torch.long, device=like.device)


def _sliced(p: torch.Tensor, dim: int, idx: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(p.detach().index_select(dim, idx.to(p.device)), requires_grad=p.requires_grad)


def _slice_linear(lin: nn.Module, out_idx: Index = None, in_idx: Index = None) -> None:
    if not isinstance(lin, nn.Linear):
        return  # nn.Identity heads (num_classes=0)
    if out_idx is not None:
        i = _as_index(out_idx, lin.weight)
        lin.weight = _sliced(lin.weight, 0, i)
        if lin.bias is not None:
            lin.bias = _sliced(lin.bias, 0, i)
        lin.out_features = len(i)
    if in_idx is not None:
        i = _as_index(in_idx, lin.weight)
        lin.weight = _sliced(lin.weight, 1, i)
        lin.in_features = len(i)


def _slice_norm(norm: nn.Module, idx: Index) -> nn.Module:
    if idx is None or isinstance(norm, nn.Identity):
        return norm
    if not hasattr(norm, "normalized_shape"):
        raise StudioError(
            f"Cannot slice a {type(norm).__name__} norm layer; the surgery supports LayerNorm/RmsNorm."
        )
    ref = next(iter(norm.parameters()), None)
    i = _as_index(idx, ref if ref is not None else torch.empty(0))
    for name in ("weight", "bias"):
        p = getattr(norm, name, None)
        if isinstance(p, torch.Tensor):
            setattr(norm, name, _sliced(p, 0, i))
    norm.normalized_shape = (len(i),)
    return norm


def _slice_param(module: nn.Module, name: str, idx: Index, dim: int = -1) -> None:
    p = getattr(module, name, None)
    if idx is None or not isinstance(p, torch.Tensor):
        return
    setattr(module, name, _sliced(p, dim, _as_index(idx, p)))


def _attn_rows(
    attn_dim: int, head_dim: int, heads: Sequence[int], dims: Sequence[int]
) -> tuple[list[int], list[int]]:
    """(qkv rows, proj columns) of the kept (head, dim) pairs; qkv rows are ordered q | k | v like timm."""
    cols = [h * head_dim + j for h in heads for j in dims]
    return [part * attn_dim + c for part in range(3) for c in cols], cols


def _prune_attention(attn: Attention, b: BlockPlan, read: Index, write: Index, scale_policy: str) -> None:
    H, d = attn.num_heads, attn.head_dim
    heads = list(range(H)) if b.heads is None else list(b.heads)
    dims = list(range(d)) if b.head_dims is None else list(b.head_dims)
    rows, cols = _attn_rows(attn.attn_dim, d, heads, dims)
    pruned = b.heads is not None or b.head_dims is not None
    _slice_linear(attn.qkv, rows if pruned else None, read)
    _slice_linear(attn.proj, write, cols if pruned else None)
    # scale_attn_norm: the norm over the attention output keeps the kept (head, dim) channels
    attn.norm = _slice_norm(attn.norm, cols if pruned else None)
    if b.head_dims is not None and getattr(attn, "rope", None) is not None:
        check_rope_dims(attn, dims, b.index)  # EVA-02: whole rotary pairs only
        attn.rope = slice_rope(attn.rope, dims)  # each kept dim keeps its frequency
    rel_pos = getattr(attn, "rel_pos", None)
    if b.heads is not None and rel_pos is not None:
        rel_pos.keep_heads(heads)  # BEiT / relpos ViT: a per-head bias keeps the kept heads' (studio.relpos)
    new_d = len(dims)
    attn.num_heads, attn.head_dim, attn.attn_dim = len(heads), new_d, len(heads) * new_d
    if b.head_dims is not None:
        # qk-norm: q_norm/k_norm normalise one head's dims, shared by all heads, so they keep the kept dims
        # (their statistics are then over the kept dims, which the masked reference reproduces with SubsetNorm)
        attn.q_norm = _slice_norm(attn.q_norm, dims)
        attn.k_norm = _slice_norm(attn.k_norm, dims)
        old_scale = float(attn.scale)
        attn.scale = new_d**-0.5
        if scale_policy == "keep":
            # SDPA divides by sqrt(new_d); fold the rest of the base temperature into q.
            _scale_q(attn, old_scale / attn.scale)


def _scale_q(attn: Attention, r: float) -> None:
    """Multiply the attention's queries by ``r``: in q's ``qkv`` rows, or, under qk-norm (which would undo a
    scale of its input), in ``q_norm``'s affine weight and bias."""
    with torch.no_grad():
        if isinstance(attn.q_norm, nn.Identity):
            attn.qkv.weight[: attn.attn_dim].mul_(r)
            if attn.qkv.bias is not None:
                attn.qkv.bias[: attn.attn_dim].mul_(r)
            return
        norm = attn.q_norm.norm if isinstance(attn.q_norm, SubsetNorm) else attn.q_norm
        if not isinstance(getattr(norm, "weight", None), torch.Tensor):
            raise StudioError(
                "Head-dim pruning of a qk-norm model whose q_norm has no affine weight cannot keep the "
                "attention temperature; use --scale-policy reset, or prune whole heads."
            )
        for name in ("weight", "bias"):
            p = getattr(norm, name, None)
            if isinstance(p, torch.Tensor):
                p.mul_(r)


def _prune_block(
    blk: Block, b: BlockPlan, embed: list[int] | None, width: int, scale_policy: str
) -> nn.Module:
    """Slice one block in place; wrap it in a :class:`ResidualSubsetBlock` if it reads/writes a subset."""
    sub = {n: getattr(b, n) for n in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    ch = {n: (list(v) if v is not None else embed) for n, v in sub.items()}  # base indices (None: all)
    blk.norm1 = _slice_norm(blk.norm1, ch["attn_in"])
    _prune_attention(blk.attn, b, ch["attn_in"], ch["attn_out"], scale_policy)
    _slice_param(blk.ls1, "gamma", ch["attn_out"])
    blk.norm2 = _slice_norm(blk.norm2, ch["mlp_in"])
    layout = mlp_layout(blk.mlp)  # the rows each neuron owns: one fc1 row, or both halves of a GLU
    rows = layout.rows(blk.mlp, b.mlp) if b.mlp is not None else {}
    for attr in layout.names(blk.mlp):
        _slice_linear(getattr(blk.mlp, attr), rows.get(attr), ch["mlp_in"])
    blk.mlp.norm = _slice_norm(blk.mlp.norm, b.mlp)  # scale_mlp_norm: over the kept neurons
    _slice_linear(blk.mlp.fc2, ch["mlp_out"], b.mlp)
    _slice_param(blk.ls2, "gamma", ch["mlp_out"])
    kept = embed if embed is not None else list(range(width))
    if all(v is None or list(v) == kept for v in sub.values()):
        return blk
    pos = {c: i for i, c in enumerate(kept)}
    dev = _device_of(blk)
    idx = {
        n: None
        if v is None or list(v) == kept
        else torch.tensor([pos[c] for c in v], dtype=torch.long, device=dev)
        for n, v in sub.items()
    }
    return ResidualSubsetBlock(blk, idx, len(kept))


def _prune_embed(model: VisionTransformer, embed: list[int]) -> None:
    pe = model.patch_embed
    conv = pe.proj
    i = _as_index(embed, conv.weight)
    conv.weight = _sliced(conv.weight, 0, i)
    if conv.bias is not None:
        conv.bias = _sliced(conv.bias, 0, i)
    conv.out_channels = len(embed)
    pe.norm = _slice_norm(pe.norm, embed)
    for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        _slice_param(model, name, embed)
    model.norm_pre = _slice_norm(model.norm_pre, embed)
    model.norm = _slice_norm(model.norm, embed)
    model.fc_norm = _slice_norm(model.fc_norm, embed)
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if head is not None:
            _slice_linear(head, None, embed)
    if getattr(model, "attn_pool", None) is not None:
        _prune_pool(model.attn_pool, embed)
    width = len(embed)
    model.embed_dim = model.num_features = width
    if hasattr(model, "head_hidden_size"):
        model.head_hidden_size = width


class PrunedAttentionPool(AttentionPoolLatent):
    """timm's attention-pool head (``global_pool='map'``, SigLIP) reading and writing a pruned embedding.

    Only the forward differs: timm reshapes the attention output to the *input* width, which equals the pool's
    attention width only while the embedding is whole; here it is reshaped to ``num_heads * head_dim`` (the
    attention width, which the plan keeps whole). The class is swapped in by :func:`apply_plan`, so the weight
    names and the export stay those of timm's module.
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        width = self.num_heads * self.head_dim
        q = self.q(self.latent.expand(B, -1, -1))
        q = q.reshape(B, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, attn_mask)
            x = attn.softmax(dim=-1) @ v
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, self.latent_len, width)))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        if self.pool == "token":
            return x[:, 0]
        return x.mean(1) if self.pool == "avg" else x


def _prune_pool(pool: AttentionPoolLatent, embed: list[int]) -> None:
    """The pool over the kept embedding channels: what it reads (``kv`` input, its ``pos_embed``) and what it
    writes (``proj`` output, its norm, its MLP's input and output); the latent query and the attention width
    are not embedding channels and stay whole."""
    _slice_param(pool, "pos_embed", embed)
    _slice_linear(pool.kv, None, embed)
    if getattr(pool, "mlp", None) is None:
        raise StudioError(
            "Embedding pruning of an attention-pool head without its projection and MLP (out_features=0) is not "
            "supported; keep the embedding whole (SLS --embed none, --scope without embed)."
        )
    _slice_linear(pool.proj, embed, None)
    pool.norm = _slice_norm(pool.norm, embed)
    _slice_linear(pool.mlp.fc1, None, embed)
    _slice_linear(pool.mlp.fc2, embed, None)
    pool.__class__ = PrunedAttentionPool


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PrunePlan) -> VisionTransformer:
    """Physically prune ``model`` **in place** to the structure ``plan`` keeps, and return it.

    ``model`` must be the unpruned base the plan refers to (deep-copy a cached/pristine model first). A plan that
    keeps everything returns a model computing the same logits bit for bit.
    """
    plan.validate()
    check_fits(model, plan.base)
    if any(not b.is_dense for b in plan.blocks) or plan.embed is not None:
        check_unfused(model)  # LoRA adapters would not be sliced with their base weights
    vit: VisionTransformer = model  # type: ignore[assignment]
    embed = None if plan.embed is None else list(plan.embed)
    old = list(vit.blocks)
    kept = [_prune_block(old[b.index], b, embed, plan.base.embed_dim, plan.scale_policy) for b in plan.blocks]
    if embed is not None:
        _prune_embed(vit, embed)
    vit.blocks = nn.Sequential(*kept)
    reduction = vit.patch_embed.feat_ratio() if hasattr(vit.patch_embed, "feat_ratio") else 16
    vit.feature_info = [
        dict(module=f"blocks.{i}", num_chs=vit.embed_dim, reduction=reduction) for i in range(len(kept))
    ]
    return vit


# ------------------------------------------------------------------------------------------------ masks
@torch.no_grad()
def mask_model(model: nn.Module, plan: PrunePlan) -> VisionTransformer:
    """A dense copy of ``model`` computing what ``apply_plan(model, plan)`` computes, with dropped units zeroed.

    The reference for parity tests. Exactness (up to float summation order) holds because every dropped unit
    contributes an exact zero: heads / head dims zero their q, k, v rows (bias too) and ``proj`` columns; MLP
    neurons zero ``fc1`` rows+bias and ``fc2`` columns; a removed block zeroes ``proj`` and ``fc2`` (weight and
    bias) so it adds exactly 0; dropped embedding channels are zeroed where they are created (patch conv, tokens,
    ``pos_embed``) and written (``proj``/``fc2`` rows+bias), so they stay 0 in the residual stream. Zeroing a norm's
    weights would *not* be exact (its statistics still see the dropped channels), so norms that read a subset are
    replaced by :class:`SubsetNorm`, which normalises over exactly the kept channels.
    """
    plan.validate()
    check_fits(model, plan.base)
    vit: VisionTransformer = copy.deepcopy(model)  # type: ignore[assignment]
    base = plan.base
    E = base.embed_dim
    embed = None if plan.embed is None else list(plan.embed)
    drop_e = [] if embed is None else sorted(set(range(E)) - set(embed))

    def zero(p: torch.Tensor | None, idx: Sequence[int], dim: int) -> None:
        if p is not None and len(idx):
            p.index_fill_(dim, _as_index(idx, p), 0.0)

    for i, blk in enumerate(vit.blocks):
        attn, mlp = blk.attn, blk.mlp
        b = plan.block(i)
        if b is None:
            for lin in (attn.proj, mlp.fc2):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
            continue
        H, d, A = attn.num_heads, attn.head_dim, attn.attn_dim
        heads = set(range(H)) if b.heads is None else set(b.heads)
        dims = set(range(d)) if b.head_dims is None else set(b.head_dims)
        if b.head_dims is not None:
            check_rope_dims(
                attn, b.head_dims, i
            )  # a dropped rotary pair is an exact zero, half a pair is not
        drop_cols = [h * d + j for h in range(H) for j in range(d) if h not in heads or j not in dims]
        zero(attn.qkv.weight, [p * A + c for p in range(3) for c in drop_cols], 0)
        zero(attn.qkv.bias, [p * A + c for p in range(3) for c in drop_cols], 0)
        zero(attn.proj.weight, drop_cols, 1)
        if drop_cols and not isinstance(attn.norm, nn.Identity):  # scale_attn_norm over the kept channels
            attn.norm = SubsetNorm(attn.norm, [c for c in range(A) if c not in set(drop_cols)])
        if b.head_dims is not None and not isinstance(attn.q_norm, nn.Identity):
            # qk-norm over the kept head dims only, zero on the dropped ones (what the sliced norms compute)
            attn.q_norm = SubsetNorm(attn.q_norm, sorted(dims))
            attn.k_norm = SubsetNorm(attn.k_norm, sorted(dims))
        if b.head_dims is not None and plan.scale_policy == "reset":
            _scale_q(
                attn, math.sqrt(d / len(dims))
            )  # dense SDPA divides by sqrt(d); reset wants sqrt(len(dims))
        if b.mlp is not None:
            drop_m = sorted(set(range(mlp_hidden(mlp))) - set(b.mlp))
            for attr, rows in mlp_layout(mlp).rows(mlp, drop_m).items():
                zero(getattr(mlp, attr).weight, rows, 0)
                zero(getattr(mlp, attr).bias, rows, 0)
            zero(mlp.fc2.weight, drop_m, 1)
            if not isinstance(mlp.norm, nn.Identity):  # scale_mlp_norm over the kept neurons
                mlp.norm = SubsetNorm(mlp.norm, b.mlp)
        for norm_name, read in (("norm1", b.attn_in), ("norm2", b.mlp_in)):
            read = read if read is not None else embed
            if read is not None:
                setattr(blk, norm_name, SubsetNorm(getattr(blk, norm_name), read))
        for lin, write in ((attn.proj, b.attn_out), (mlp.fc2, b.mlp_out)):
            write = write if write is not None else embed
            if write is not None:
                drop_w = sorted(set(range(E)) - set(write))
                zero(lin.weight, drop_w, 0)
                zero(lin.bias, drop_w, 0)
    if embed is not None:
        zero(vit.patch_embed.proj.weight, drop_e, 0)
        zero(vit.patch_embed.proj.bias, drop_e, 0)
        for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
            p = getattr(vit, name, None)
            if isinstance(p, torch.Tensor):
                zero(p, drop_e, p.ndim - 1)
        for name in ("norm_pre", "norm", "fc_norm"):
            if not isinstance(getattr(vit, name), nn.Identity):
                setattr(vit, name, SubsetNorm(getattr(vit, name), embed))
        if not isinstance(vit.patch_embed.norm, nn.Identity):
            vit.patch_embed.norm = SubsetNorm(vit.patch_embed.norm, embed)
        pool = getattr(vit, "attn_pool", None)
        if (
            pool is not None and getattr(pool, "mlp", None) is not None
        ):  # the pool writes zeros on the dropped channels and normalises the kept ones
            if isinstance(pool.pos_embed, torch.Tensor):
                zero(pool.pos_embed, drop_e, pool.pos_embed.ndim - 1)
            for lin in (pool.proj, pool.mlp.fc2):
                zero(lin.weight, drop_e, 0)
                zero(lin.bias, drop_e, 0)
            if not isinstance(pool.norm, nn.Identity):
                pool.norm = SubsetNorm(pool.norm, embed)
    return vit


def pruned_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per kept block: heads, head_dim, MLP hidden and residual read/write widths (for display and tests)."""
    vit = check_supported(model)
    out = []
    for blk in vit.blocks:
        a = blk.attn
        out.append(
            {
                "heads": a.num_heads,
                "head_dim": a.head_dim,
                "mlp": mlp_hidden(blk.mlp),
                "attn_in": a.qkv.in_features,
                "attn_out": a.proj.out_features,
                "mlp_in": mlp_layout(blk.mlp).linears(blk.mlp)[0].in_features,
                "mlp_out": blk.mlp.fc2.out_features,
            }
        )
    return out
