"""The surgery against two independent references: the dense model with dropped units masked to zero, and
hand-written block math for residual subsets. Fused attention on and off."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from studio.bench import count_macs
from studio.costs import plan_cost
from studio.errors import StudioError
from studio.models import create_vit, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.surgery import ResidualSubsetBlock, apply_plan, mask_model, pruned_widths

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
ARCHS = ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224")
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def make(arch: str = ARCHS[0], **extra):
    """A tiny ViT with every weight perturbed (so LayerNorm affine params and biases matter)."""
    torch.manual_seed(0)
    kw = {**KW, **extra}
    m = create_vit(arch, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m, describe_base(m, arch, kw)


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused


def logits(model: torch.nn.Module, fused: bool = True) -> torch.Tensor:
    set_fused(model, fused)
    with torch.inference_mode():
        return model(X)


def plans(base):
    evens = tuple(range(0, 48, 2))
    return {
        "heads": PrunePlan(base, (BlockPlan(0, heads=(0, 2)), BlockPlan(1), BlockPlan(2, heads=(1,)))),
        "head_dims": PrunePlan(
            base,
            (BlockPlan(0, head_dims=tuple(range(0, 16, 2))), BlockPlan(1, head_dims=(1, 3, 5)), BlockPlan(2)),
        ),
        "head_dims_reset": PrunePlan(
            base, (BlockPlan(0, head_dims=(0, 1, 2, 3)), BlockPlan(1), BlockPlan(2)), scale_policy="reset"
        ),
        "mlp": PrunePlan(
            base, (BlockPlan(0, mlp=tuple(range(0, 192, 3))), BlockPlan(1), BlockPlan(2, mlp=(5,)))
        ),
        "depth": PrunePlan(base, (BlockPlan(0), BlockPlan(2, heads=(1,)))),
        "residual": PrunePlan(
            base,
            (
                BlockPlan(
                    0,
                    attn_in=evens,
                    attn_out=tuple(range(10, 40)),
                    mlp_in=tuple(range(5, 48)),
                    mlp_out=tuple(range(0, 48, 3)),
                ),
                BlockPlan(1),
                BlockPlan(2, mlp_out=(1, 2, 3)),
            ),
        ),
        "embed": PrunePlan(base, (BlockPlan(0), BlockPlan(1, heads=(0,)), BlockPlan(2)), embed=evens),
        "everything": PrunePlan(
            base,
            (
                BlockPlan(
                    0, heads=(1, 2), head_dims=tuple(range(8)), mlp=tuple(range(64)), attn_in=evens[::2]
                ),
                BlockPlan(2, mlp_out=(2, 4, 6), mlp=tuple(range(100, 192))),
            ),
            embed=evens,
        ),
    }


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused", [True, False])
def test_dense_plan_reproduces_logits(arch, fused):
    m, base = make(arch)
    ref = logits(m, fused)
    pruned = apply_plan(copy.deepcopy(m), PrunePlan.dense(base))
    assert (logits(pruned, fused) - ref).abs().max() <= 1e-6
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "kind", ["heads", "head_dims", "head_dims_reset", "mlp", "depth", "residual", "embed", "everything"]
)
@pytest.mark.parametrize("fused", [True, False])
def test_pruned_equals_masked(arch, kind, fused):
    m, base = make(arch)
    plan = plans(base)[kind]
    dense = logits(m, fused)
    masked = logits(mask_model(m, plan), fused)
    pruned_model = apply_plan(copy.deepcopy(m), plan)
    pruned = logits(pruned_model, fused)
    assert (pruned - masked).abs().max() <= 1e-5
    assert (pruned - dense).abs().max() > 1e-4  # the plan really removed something
    cost = plan_cost(plan)
    assert cost["params"] == sum(p.numel() for p in pruned_model.parameters())
    assert cost["macs"] == count_macs(pruned_model, (3, 32, 32))["total"]


def test_head_dim_scale_policy_changes_the_function():
    m, base = make()
    keep = PrunePlan(base, (BlockPlan(0, head_dims=(0, 1, 2, 3)), BlockPlan(1), BlockPlan(2)))
    reset = keep.with_(scale_policy="reset")
    a = logits(apply_plan(copy.deepcopy(m), keep))
    b = logits(apply_plan(copy.deepcopy(m), reset))
    assert (a - b).abs().max() > 1e-4
    pruned = apply_plan(copy.deepcopy(m), keep)
    assert pruned.blocks[0].attn.head_dim == 4 and pruned.blocks[0].attn.scale == pytest.approx(0.5)
    assert (logits(pruned, True) - logits(pruned, False)).abs().max() <= 1e-5  # fused == explicit path


def _reference_block(blk, x, attn_in, attn_out, mlp_in, mlp_out):
    """Hand-written pre-norm block reading/writing channel subsets, from the dense block's weights."""

    def branch_attn(h):
        B, N, _ = h.shape
        a = blk.attn
        qkv = F.linear(h, a.qkv.weight[:, attn_in], a.qkv.bias).reshape(B, N, 3, a.num_heads, a.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q * a.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(B, N, -1)
        return F.linear(o, a.proj.weight, a.proj.bias)

    h = F.layer_norm(
        x[..., attn_in], (len(attn_in),), blk.norm1.weight[attn_in], blk.norm1.bias[attn_in], 1e-6
    )
    x = x.clone()
    x[..., attn_out] += branch_attn(h)[..., attn_out]
    h = F.layer_norm(x[..., mlp_in], (len(mlp_in),), blk.norm2.weight[mlp_in], blk.norm2.bias[mlp_in], 1e-6)
    y = blk.mlp.fc2(blk.mlp.act(F.linear(h, blk.mlp.fc1.weight[:, mlp_in], blk.mlp.fc1.bias)))
    x[..., mlp_out] += y[..., mlp_out]
    return x


def test_residual_subset_block_matches_hand_math():
    m, base = make()
    ai, ao, mi, mo = [0, 3, 4, 9, 20, 47], list(range(5, 30)), list(range(1, 48, 2)), [0, 1, 2, 40]
    plan = PrunePlan(
        base,
        (
            BlockPlan(0, attn_in=tuple(ai), attn_out=tuple(ao), mlp_in=tuple(mi), mlp_out=tuple(mo)),
            BlockPlan(1),
            BlockPlan(2),
        ),
    )
    x = torch.randn(2, 17, 48)
    with torch.inference_mode():
        ref = _reference_block(m.blocks[0], x, ai, ao, mi, mo)
        pruned = apply_plan(copy.deepcopy(m), plan)
        assert isinstance(pruned.blocks[0], ResidualSubsetBlock)
        assert not isinstance(pruned.blocks[1], ResidualSubsetBlock)
        out = pruned.blocks[0](x)
    assert (out - ref).abs().max() <= 1e-5
    untouched = sorted(set(range(48)) - set(ao) - set(mo))
    assert torch.equal(out[..., untouched], x[..., untouched])
    assert {"blocks.0.attn_in", "blocks.0.mlp_out"} <= set(pruned.state_dict())


def test_widths_after_surgery_and_training_step():
    m, base = make("deit_tiny_distilled_patch16_224")
    plan = plans(base)["everything"]
    pruned = apply_plan(copy.deepcopy(m), plan)
    w = pruned_widths(pruned)
    assert [b["heads"] for b in w] == [2, 3] and [b["head_dim"] for b in w] == [8, 16]
    assert [b["mlp"] for b in w] == [64, 92] and w[0]["attn_in"] == 12 and w[1]["mlp_out"] == 3
    assert pruned.embed_dim == 24 and pruned.pos_embed.shape[-1] == 24 and pruned.dist_token.shape[-1] == 24
    assert pruned.head.in_features == 24 and pruned.head_dist.in_features == 24
    pruned.train()
    out = pruned(X)
    loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruned.parameters())


def test_embed_pruning_shapes_and_costs():
    m, base = make(init_values=1e-2, qkv_bias=False)
    plan = PrunePlan(base, tuple(BlockPlan(i, heads=(0, 1)) for i in range(3)), embed=tuple(range(0, 48, 3)))
    pruned = apply_plan(copy.deepcopy(m), plan)
    out = logits(pruned)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    assert pruned.patch_embed.proj.out_channels == 16 and pruned.blocks[0].ls1.gamma.shape == (16,)
    cost = plan_cost(plan)
    macs = count_macs(pruned, (3, 32, 32))
    assert cost["params"] == sum(p.numel() for p in pruned.parameters())
    assert (cost["macs"], cost["macs_attention"], cost["macs_linear"]) == (
        macs["total"],
        macs["attention"],
        macs["linear"],
    )


def test_refuses_plan_for_another_model_and_double_surgery():
    m, base = make()
    other, _ = make(depth=2)
    with pytest.raises(StudioError, match=r"depth=3.*2"):
        apply_plan(other, PrunePlan.dense(base))
    plan = plans(base)["residual"]
    pruned = apply_plan(copy.deepcopy(m), plan)
    with pytest.raises(StudioError, match="already pruned"):
        apply_plan(pruned, plan)
