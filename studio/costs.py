"""Analytic parameters and MACs of a plan's pruned structure, without building or running the model.

Exact by construction for what :func:`studio.surgery.apply_plan` builds: ``params`` equals
``sum(p.numel() for p in pruned.parameters())`` and the MACs equal what :func:`studio.bench.count_macs` counts
at the dispatcher (``FlopCounterMode``, explicit attention): the patch-embedding convolution, every linear layer
(``mm``/``addmm``, biases not counted) and the two attention matmuls ``q·kᵀ`` and ``attn·v``
(``2·heads·N²·head_dim`` per block), and a relative position bias's MLP where it has one (``RelPosMlp``, once per
forward: per image at batch size 1, as counted). Norms, softmax, GELU and the residual index ops are not counted, as by the
counter. Cheap enough to call in a bisection loop (pass ``facts`` to skip reading the base architecture).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .families import mlp_hidden, mlp_layout
from .models import create_vit
from .plan import BaseArch, PrunePlan


@dataclass(frozen=True)
class ArchFacts:
    """What the plan's :class:`~studio.plan.BaseArch` does not say but the costs need, read from timm."""

    tokens: int  # sequence length N through the blocks
    patches: int
    patch_pixels: int  # in_chans * patch_h * patch_w
    patch_bias: bool
    pos_rows: int  # rows of pos_embed (0 without one)
    token_rows: int  # learned prefix tokens: cls + reg + dist
    stem_norm_pc: int  # params per channel of patch_embed.norm + norm_pre + norm + fc_norm together
    norm1_pc: int
    norm2_pc: int
    qkv_bias: bool
    proj_bias: bool
    mlp_in_copies: int  # input rows per MLP neuron: 1, or 2 for a GLU (value and gate)
    mlp_in_bias: int  # input bias entries per MLP neuron
    fc2_bias: bool
    layer_scale: bool  # LayerScale after the attention branch (after both branches in a parallel block)
    layer_scale2: bool  # LayerScale after the MLP branch (none in a parallel block)
    qk_norm_pc: int  # params per head-dim channel of q_norm + k_norm
    attn_norm_pc: int  # params per attention channel of the attention output norm (scale_attn_norm)
    mlp_norm_pc: int  # params per MLP neuron of the hidden norm (scale_mlp_norm)
    heads_out: int  # classifier heads reading the features (2 for distilled DeiT)
    head_bias: bool
    # an attention-pool head (global_pool='map'): what depends on the kept embedding width E', per channel, and
    # what does not (its latent query, q projection and q/k norms); all 0 without a pool
    pool_params_pc: int = 0
    pool_params_fixed: int = 0
    pool_linear_pc: int = 0
    pool_linear_fixed: int = 0
    pool_attention: int = 0
    # a per-head relative position bias (studio.relpos), per block: params and MACs per kept head and fixed ones
    # (the RelPosMlp's first layer); all 0 without one
    bias_params_ph: int = 0
    bias_params_fixed: int = 0
    bias_macs_ph: int = 0
    bias_macs_fixed: int = 0


def _pc(module: nn.Module, width: int) -> int:
    return sum(p.numel() for p in module.parameters()) // width


def arch_facts(base: BaseArch) -> ArchFacts:
    """Build the base on the meta device (no memory, ~0.1 s) and read its structural facts."""

    with torch.device("meta"):
        m = create_vit(base.arch, **base.kwargs)
    E = base.embed_dim
    conv = m.patch_embed.proj
    blk = m.blocks[0]
    heads = [h for h in (m.head, getattr(m, "head_dist", None)) if isinstance(h, nn.Linear)]
    return ArchFacts(
        tokens=m.patch_embed.num_patches + m.num_prefix_tokens,
        patches=m.patch_embed.num_patches,
        patch_pixels=conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1],
        patch_bias=conv.bias is not None,
        pos_rows=0 if m.pos_embed is None else m.pos_embed.shape[1],
        token_rows=sum(
            getattr(m, n).shape[1]
            for n in ("cls_token", "reg_token", "dist_token")
            if isinstance(getattr(m, n, None), torch.Tensor)
        ),
        stem_norm_pc=sum(_pc(n, E) for n in (m.patch_embed.norm, m.norm_pre, m.norm, m.fc_norm)),
        norm1_pc=_pc(blk.norm1, E),
        norm2_pc=_pc(blk.norm2, E),
        qkv_bias=blk.attn.qkv.bias is not None,
        proj_bias=blk.attn.proj.bias is not None,
        mlp_in_copies=mlp_layout(blk.mlp).copies(blk.mlp),
        mlp_in_bias=mlp_layout(blk.mlp).biases(blk.mlp),
        fc2_bias=blk.mlp.fc2.bias is not None,
        layer_scale=hasattr(blk.ls1, "gamma"),
        layer_scale2=hasattr(blk.ls2, "gamma"),
        qk_norm_pc=(_pc(blk.attn.q_norm, base.head_dim) + _pc(blk.attn.k_norm, base.head_dim)),
        attn_norm_pc=_pc(blk.attn.norm, blk.attn.attn_dim),
        mlp_norm_pc=_pc(blk.mlp.norm, mlp_hidden(blk.mlp)),
        heads_out=len(heads),
        head_bias=bool(heads) and heads[0].bias is not None,
        **_pool_facts(m, E),
        **_bias_facts(blk.attn),
    )


def _bias_facts(attn: nn.Module) -> dict[str, int]:
    """A relative position bias's costs per block (the same in every block of a base model)."""
    rel_pos = getattr(attn, "rel_pos", None)
    if rel_pos is None:
        return {}
    c = rel_pos.costs()  # studio.relpos.BiasCosts
    return {
        "bias_params_ph": c.params_per_head,
        "bias_params_fixed": c.params_fixed,
        "bias_macs_ph": c.macs_per_head,
        "bias_macs_fixed": c.macs_fixed,
    }


def _pool_facts(m: nn.Module, E: int) -> dict[str, int]:
    """The attention pool's costs, split into a part per kept embedding channel and a fixed part.

    Per channel: ``kv`` input columns (``2A``), ``proj`` output rows (``A`` + bias), the norm, the MLP's input
    columns and output rows (+ ``fc2`` bias) and its ``pos_embed``; fixed: the latent, ``q``, the q/k norms and
    the ``kv``/``fc1`` biases. MACs: ``kv`` over the N pooled tokens, ``q``/``proj``/MLP over the latent tokens,
    and the two attention matmuls (``2·L·N·A``), as :func:`studio.bench.count_macs` counts them.
    """
    pool = getattr(m, "attn_pool", None)
    if pool is None:
        return {}
    A, L = pool.num_heads * pool.head_dim, pool.latent_len
    N = m.patch_embed.num_patches + (m.num_prefix_tokens if m.pool_include_prefix else 0)
    mlp = pool.mlp
    M = mlp.fc1.out_features
    q = pool.q if isinstance(pool.q, nn.Linear) else None
    fixed = pool.latent.numel() + sum(p.numel() for p in (*pool.q.parameters(), *pool.q_norm.parameters()))
    fixed += sum(p.numel() for p in pool.k_norm.parameters())
    fixed += (2 * A if pool.kv.bias is not None else 0) + (M if mlp.fc1.bias is not None else 0)
    per = 2 * A + A + (1 if pool.proj.bias is not None else 0) + _pc(pool.norm, E) + 2 * M
    per += (1 if mlp.fc2.bias is not None else 0) + (
        pool.pos_embed.shape[0] if pool.pos_embed is not None else 0
    )
    return {
        "pool_params_pc": per,
        "pool_params_fixed": fixed,
        "pool_linear_pc": N * 2 * A + L * A + L * 2 * M,
        "pool_linear_fixed": L * q.in_features * q.out_features if q is not None else 0,
        "pool_attention": 2 * L * N * A,
    }


def plan_cost(plan: PrunePlan, facts: ArchFacts | None = None) -> dict[str, int]:
    """Params and per-image MACs of the model ``apply_plan(base, plan)`` builds.

    Returns ``params``, ``macs`` (total), ``macs_attention``, ``macs_linear``, ``macs_conv``.
    """
    f = facts or arch_facts(plan.base)
    base = plan.base
    E = base.embed_dim if plan.embed is None else len(plan.embed)
    N, C = f.tokens, base.num_classes
    params = (
        E * f.patch_pixels + (E if f.patch_bias else 0) + E * (f.pos_rows + f.token_rows) + E * f.stem_norm_pc
    )
    params += f.heads_out * (C * E + (C if f.head_bias else 0))
    conv = f.patches * E * f.patch_pixels
    linear = f.heads_out * C * E
    params += f.pool_params_fixed + E * f.pool_params_pc
    linear += f.pool_linear_fixed + E * f.pool_linear_pc
    attention = f.pool_attention
    for b in plan.blocks:
        k = plan.kept(b.index)
        H, d, M = k["heads"], k["head_dim"], k["mlp"]
        A = H * d
        a_in, a_out, m_in, m_out = (
            E if v is None else len(v) for v in (b.attn_in, b.attn_out, b.mlp_in, b.mlp_out)
        )
        params += a_in * f.norm1_pc + 3 * A * a_in + (3 * A if f.qkv_bias else 0) + d * f.qk_norm_pc
        params += a_out * A + (a_out if f.proj_bias else 0) + (a_out if f.layer_scale else 0)
        params += (
            m_in * f.norm2_pc
            + f.mlp_in_copies * M * m_in
            + M * f.mlp_in_bias
            + A * f.attn_norm_pc
            + M * f.mlp_norm_pc
        )
        params += m_out * M + (m_out if f.fc2_bias else 0) + (m_out if f.layer_scale2 else 0)
        linear += N * (3 * A * a_in + A * a_out + f.mlp_in_copies * M * m_in + M * m_out)
        params += H * f.bias_params_ph + f.bias_params_fixed
        linear += H * f.bias_macs_ph + f.bias_macs_fixed
        attention += 2 * H * N * N * d
    return {
        "params": params,
        "macs": conv + linear + attention,
        "macs_attention": attention,
        "macs_linear": linear,
        "macs_conv": conv,
    }


def with_summary(plan: PrunePlan, facts: ArchFacts | None = None) -> PrunePlan:
    """``plan`` with ``summary`` filled: params/MACs before and after (and the MACs fraction kept)."""
    f = facts or arch_facts(plan.base)
    before = plan_cost(PrunePlan.dense(plan.base), f)
    after = plan_cost(plan, f)
    summary = {
        **plan.summary,
        "params_before": before["params"],
        "params_after": after["params"],
        "macs_before": before["macs"],
        "macs_after": after["macs"],
        "macs_fraction": round(after["macs"] / before["macs"], 6),
        "params_fraction": round(after["params"] / before["params"], 6),
    }
    return plan.with_(summary=summary)
