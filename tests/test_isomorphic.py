"""Isomorphic pruning: plan read back from torch-pruning equals its pruned module, budgets, guard, reference size."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from studio.analysis.criteria import accumulate_gradients, with_grads
from studio.analysis.groups import torch_pruning_scores
from studio.costs import plan_cost
from studio.errors import StudioError
from studio.evaluate import logits_of
from studio.models import LoadedModel, create_vit, data_config, describe_base
from studio.prune import PruneRequest, make_plan
from studio.prune.isomorphic import IsoRatios, isomorphic_structure
from studio.surgery import apply_plan

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)


def make(arch: str = "vit_tiny_patch16_224", **extra):
    torch.manual_seed(0)
    kw = {**KW, **extra}
    m = create_vit(arch, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m, describe_base(m, arch, kw)


def batches(n: int = 2, bs: int = 8, classes: int = 5):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, classes, (bs,), generator=g))
        for _ in range(n)
    ]


def set_fused(model, fused: bool) -> None:
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("fused", [True, False])
def test_plan_surgery_equals_torch_pruning_module(arch, fused):
    m, base = make(arch)
    grads = accumulate_gradients(m, batches())
    st = isomorphic_structure(
        m, base, grads, IsoRatios(0.4, 0.3, 0.25), round_to=2, scale_policy="reset", keep_pruned=True
    )
    assert st.pruned is not None and not st.guarded_blocks
    plan = st.plan
    assert (
        plan.embed is not None and any(b.head_dims for b in plan.blocks) and any(b.mlp for b in plan.blocks)
    )
    ours = apply_plan(copy.deepcopy(m), plan).eval()
    set_fused(ours, fused)
    set_fused(st.pruned, fused)
    x = batches(1)[0][0]
    with torch.inference_mode():
        assert torch.allclose(ours(x), st.pruned(x), atol=1e-5)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in st.pruned.parameters())
    assert plan_cost(plan)["params"] == sum(p.numel() for p in ours.parameters())
    # the classifier is ignored by identity: a 5-class head keeps its 5 outputs in torch-pruning's module too
    assert st.pruned.head.out_features == 5
    if arch.startswith("deit"):
        assert st.pruned.head_dist.out_features == 5
    # round_to=2: every kept width torch-pruning rounds is even
    assert len(plan.embed) % 2 == 0 and all(len(b.mlp) % 2 == 0 for b in plan.blocks if b.mlp)


def test_gradients_are_summed_over_batches():
    m, _ = make()
    data = batches(2)
    total = accumulate_gradients(m, data)
    parts = [accumulate_gradients(m, [b]) for b in data]
    for n, g in total.items():
        assert torch.allclose(g, parts[0][n] + parts[1][n], atol=1e-6)


def test_group_scores_are_torch_pruning_importance():
    """Head score = mean of its channels; head-dim score = mean over heads; MLP group = fc1 out + fc2 in."""
    m, _ = make()
    s = torch_pruning_scores(m, "l1")
    for ch, h, d in zip(s.channels, s.heads, s.head_dims):
        assert torch.allclose(ch.mean(1), h) and torch.allclose(ch.mean(0), d)
    fc1, fc2 = m.blocks[0].mlp.fc1, m.blocks[0].mlp.fc2
    raw = (fc1.weight.abs().sum(1) + fc2.weight.abs().sum(0)).double() / 2  # mean over the two layers
    assert torch.allclose(s.mlp[0], raw / raw.mean(), atol=1e-6)  # torch-pruning's mean normaliser
    assert s.embed.shape == (48,)


def test_guard_keeps_the_best_head_of_an_emptied_block():
    """Scores are normalised per group (mean 1), so a block of three identical heads scores 1, 1, 1, while blocks
    with one near-dead head score ~0, 1.5, 1.5: removing 5 of 9 heads globally empties the identical block."""
    m, base = make()
    with torch.no_grad():
        a = m.blocks[1].attn
        q = a.qkv.weight.view(3, 3, 16, 48)
        q[:, 1:] = q[:, :1].clone()
        a.qkv.bias.view(3, 3, 16)[:, 1:] = a.qkv.bias.view(3, 3, 16)[:, :1].clone()
        p = a.proj.weight.view(48, 3, 16)
        p[:, 1:] = p[:, :1].clone()
        for i in (0, 2):
            m.blocks[i].attn.qkv.weight.view(3, 3, 16, 48)[:, 0] *= 1e-3
            m.blocks[i].attn.proj.weight.view(48, 3, 16)[:, 0] *= 1e-3
    grads = accumulate_gradients(m, batches())
    st = isomorphic_structure(m, base, grads, IsoRatios(0.2, 0.5, 0.0))
    assert st.guarded_blocks == (1,)
    kept = st.plan.block(1).heads
    scores = torch_pruning_scores(m, "taylor", grads).heads[1]
    assert kept == (int(torch.argmax(scores)),)
    assert all(st.plan.kept(i)["heads"] >= 1 for i in range(3))
    assert st.plan.params["guarded_blocks"] == [1]
    assert torch.isfinite(apply_plan(copy.deepcopy(m), st.plan)(batches(1)[0][0])).all()


def _loaded(m, base):
    return LoadedModel(m, base, data_config(m), [str(i) for i in range(5)], torch.device("cpu"))


def test_macs_target_is_met_by_scaling_the_ratios():
    m, base = make()
    plan = make_plan("isomorphic", PruneRequest(_loaded(m, base), {"target_macs": 0.5}, batches()))
    assert abs(plan.summary["macs_fraction"] / 0.5 - 1) <= 0.02
    assert plan.method == "isomorphic" and 0 < plan.params["scale"] < 2
    assert torch.isfinite(apply_plan(copy.deepcopy(m), plan)(batches(1)[0][0])).all()


def test_bad_ratios_and_missing_data_are_user_errors():
    m, base = make()
    with pytest.raises(StudioError, match="head-ratio"):
        make_plan("isomorphic", PruneRequest(_loaded(m, base), {"head_ratio": 1.5, "ratio": 0.3}, batches()))
    with pytest.raises(StudioError, match="calibration data"):
        make_plan("isomorphic", PruneRequest(_loaded(m, base), {"ratio": 0.3}, ()))


def test_published_deit_tiny_structure_without_data():
    """DeiT-0.6G (deit_tiny_distilled, ratios 0.25/0.3/0.3, round_to 2): 3.08 M params, 0.62 G MACs published.

    Random weights and one random gradient batch: sizes within 2 % (the Taylor scores only move the per-layer
    split). MACs by torch-pruning's counter, as the paper reports them.
    """
    import torch_pruning as tp

    torch.manual_seed(0)
    m = create_vit("deit_tiny_distilled_patch16_224").eval()
    base = describe_base(m, "deit_tiny_distilled_patch16_224", {})
    x, y = torch.randn(2, 3, 224, 224), torch.randint(0, 1000, (2,))
    F.cross_entropy(logits_of(m, x), y).backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    st = isomorphic_structure(
        m, base, grads, IsoRatios(0.25, 0.3, 0.3), round_to=2, scale_policy="reset", keep_pruned=True
    )
    macs, params = tp.utils.count_ops_and_params(st.pruned, torch.zeros(1, 3, 224, 224))
    assert params / 3.08e6 == pytest.approx(1, abs=0.02)
    assert macs / 0.62e9 == pytest.approx(1, abs=0.02)
    assert plan_cost(st.plan)["params"] == params


@pytest.mark.parametrize("importance", ["taylor", "l2"])
@pytest.mark.parametrize("round_to", [1, 2])
def test_one_reused_pruner_plans_exactly_as_a_fresh_pruner_per_trial(importance, round_to):
    """The bisection builds torch-pruning's pruner once (issue 19): every trial's plan equals a fresh one's."""
    from studio.prune.isomorphic import DEFAULT_RATIOS, ReusablePruner

    m, base = make(embed_dim=96, depth=4, num_heads=6)
    grads = accumulate_gradients(m, batches()) if importance == "taylor" else None
    ratios = IsoRatios(*DEFAULT_RATIOS)
    reuse = ReusablePruner(with_grads(m, grads), ratios.scaled(0.5), importance=importance, round_to=round_to)
    seen = set()
    for s in (0.5, 1.3, 0.2, 1.0, 0.75):  # out of order: nothing of one trial may leak into the next
        kw = dict(importance=importance, round_to=round_to)
        fresh = isomorphic_structure(m, base, grads, ratios.scaled(s), **kw).plan
        reused = isomorphic_structure(m, base, grads, ratios.scaled(s), reuse=reuse, **kw).plan
        assert reused.to_dict() == fresh.to_dict()
        seen.add(plan_cost(fresh)["macs"])
    assert len(seen) == 5  # the trials differ, so equality is not of five copies of one plan
