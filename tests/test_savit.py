"""SAViT: gates, taylor2 scores, the Hessian interaction, the exact cost model, the allocation and the plan."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from studio.analysis.gate_scores import SavitScores, _normaliser, gated_model, savit_scores
from studio.bench import unfused_attention
from studio.costs import arch_facts, plan_cost
from studio.errors import StudioError
from studio.models import LoadedModel, create_vit, data_config, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.prune import PruneRequest, make_plan
from studio.prune.savit import (
    CostModel,
    allocate,
    max_pruned,
    objective,
    protect,
    savit_plan,
)
from studio.surgery import apply_plan

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)


def make(arch: str = "vit_tiny_patch16_224"):
    torch.manual_seed(0)
    m = create_vit(arch, **KW).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m, describe_base(m, arch, KW)


def batches(n: int = 2, bs: int = 8):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, 5, (bs,), generator=g)) for _ in range(n)
    ]


def loaded(model, base) -> LoadedModel:
    return LoadedModel(model, base, data_config(model), [str(i) for i in range(5)], torch.device("cpu"))


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_gates_at_one_reproduce_the_logits(arch):
    m, base = make(arch)
    gm, _ = gated_model(m, base)
    x = batches(1)[0][0]
    with torch.inference_mode():
        assert torch.equal(gm(x), m(x))
    assert all(not p.requires_grad for n, p in gm.named_parameters() if "savit_gates" not in n)


@pytest.mark.parametrize("fused", [True, False])
def test_masked_heads_and_neurons_equal_physical_pruning(fused):
    m, base = make()
    plan = PrunePlan(
        base,
        (
            BlockPlan(0, heads=(0, 2), mlp=tuple(range(0, 192, 3))),
            BlockPlan(1, heads=(1,)),
            BlockPlan(2, mlp=(4, 7, 100)),
        ),
    )
    gm, gates = gated_model(m, base)
    gates.set_plan(plan)
    pruned = apply_plan(copy.deepcopy(m), plan).eval()
    for mod in (*gm.modules(), *pruned.modules()):
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused
    x = batches(1)[0][0]
    with torch.inference_mode():
        a, b = gm(x), pruned(x)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(a, m(x), atol=1e-3)  # the masks did change the function


def test_embedding_gates_run_and_zero_the_dropped_channels():
    m, base = make()
    plan = PrunePlan(base, tuple(BlockPlan(i) for i in range(3)), embed=tuple(range(0, 48, 2)))
    gm, gates = gated_model(m, base)
    gates.set_plan(plan)
    feats = gm.forward_features(batches(1)[0][0])
    assert torch.isfinite(feats).all()
    # the residual stream leaves the last block with odd channels at 0 (the final norm then shifts them)
    out = {}
    gm.blocks[-1].register_forward_hook(lambda _m, _a, o: out.setdefault("x", o))
    gm(batches(1)[0][0])
    assert out["x"][..., 1::2].abs().max() == 0


def test_taylor2_is_the_mean_squared_gate_gradient():
    m, base = make()
    data = batches(2)
    s = savit_scores(m, base, data, hvp_every=0)
    gm, gates = gated_model(m, base)
    acc = torch.zeros(base.embed_dim, dtype=torch.float64)
    with unfused_attention(gm):
        for x, y in data:
            (g,) = torch.autograd.grad(F.cross_entropy(gm(x), y), gates.res)
            acc += g.double() ** 2
    assert np.allclose(s.embed, (acc / 2).numpy(), rtol=1e-4, atol=1e-10)
    assert s.hessian == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)) and s.hvp_batches == 0
    assert len(s.heads) == 3 and len(s.heads[0]) == 3 and len(s.mlp[0]) == 192


def test_residual_curvature_matches_the_full_hessian():
    """One batch: Ĥ[res, res] = Σ of the Hessian of the loss w.r.t. the shared residual gate, over Z."""
    m, base = make()
    data = batches(1)
    s = savit_scores(m, base, data, hvp_every=1, hessian_embed=6.0)
    gm, gates = gated_model(m, base)
    x, y = data[0]

    def grad_at(value: float) -> torch.Tensor:
        with torch.no_grad():
            gates.res.fill_(value)
        (g,) = torch.autograd.grad(F.cross_entropy(gm(x), y), gates.res)
        return g.double()

    eps = 1e-2  # central differences of the gradient along v = 1: an independent estimate of H·1
    with unfused_attention(gm):
        hv = (grad_at(1 + eps) - grad_at(1 - eps)) / (2 * eps)
    Z = _normaliser(base, 6.0)
    assert s.hessian[2][2] == pytest.approx(float(hv.sum()) / Z[2, 2], rel=2e-2)
    assert s.hessian[2][2] != 0 and s.hvp_batches == 1


def _dense_block_sum(gm, x, y, gi, gj) -> float:
    """``1ᵀ H 1`` of the Hessian block ``∂²L/∂g_i∂g_j``, built row by row with autograd (whole batch)."""
    loss = F.cross_entropy(gm(x), y)
    (grad_i,) = torch.autograd.grad(loss, gi, create_graph=True)
    rows = [torch.autograd.grad(grad_i[k], gj, retain_graph=True)[0] for k in range(len(grad_i))]
    return float(torch.stack(rows).double().sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_hessian_entry_equals_an_autograd_hessian_of_the_gate_loss(seed):
    """All nine entries of Ĥ (heads, MLP, residual and their cross terms), one batch run in micro-batches of 3:
    Ĥ[i, j] = 1ᵀ H[g_i(l1), g_j(l2)] 1 / Z[i, j] for the layers the batch drew, with H the dense Hessian of the
    whole batch's loss; checked again by central differences of the gradient (independent of double backward)."""
    m, base = make()
    x, y = batches(1)[0]
    s = savit_scores(m, base, [(x, y)], hvp_every=1, seed=seed, micro_batch=3)
    assert s.hvp_batches == 1 and len(s.pairs) == 1
    l1, l2 = s.pairs[0]
    Z = _normaliser(base, 6.0)
    gm, gates = gated_model(m, base)
    with unfused_attention(gm):
        for i in range(3):
            for j in range(3):
                gi, gj = gates.of(i, l1), gates.of(j, l2[i][j])
                want = _dense_block_sum(gm, x, y, gi, gj) / Z[i, j]
                assert want != 0.0
                assert s.hessian[i][j] == pytest.approx(want, rel=1e-3, abs=1e-12), (i, j, l1, l2)
                if seed == 0:  # finite differences along 1 on g_j: the same entry without double backward
                    eps = 1e-2
                    sums = []
                    for v in (1 + eps, 1 - eps):
                        with torch.no_grad():
                            gj.fill_(v)
                        (g,) = torch.autograd.grad(F.cross_entropy(gm(x), y), gi)
                        sums.append(float(g.double().sum()))
                    with torch.no_grad():
                        gj.fill_(1.0)
                    fd = (sums[0] - sums[1]) / (2 * eps) / Z[i, j]
                    assert s.hessian[i][j] == pytest.approx(fd, rel=3e-2, abs=1e-9), (i, j)


def test_hvp_sample_count_and_its_standard_error():
    m, base = make()
    data = batches(4)
    s = savit_scores(m, base, data, hvp_every=1, seed=0)
    samples = np.asarray(s.hessian_samples)
    assert s.hvp_batches == 4 and samples.shape == (4, 3, 3)
    np.testing.assert_allclose(np.asarray(s.hessian), samples.mean(axis=0), rtol=1e-12)
    se = np.asarray(s.hessian_se, dtype=np.float64)
    np.testing.assert_allclose(se, samples.std(axis=0, ddof=1) / 2.0, rtol=1e-12)
    assert (se > 0).all()
    capped = savit_scores(m, base, data, hvp_every=1, hvp_batches=2, seed=0)
    assert capped.hvp_batches == 2 and capped.batches == 4
    np.testing.assert_allclose(np.asarray(capped.hessian_samples), samples[:2], rtol=1e-5)
    one = savit_scores(m, base, data[:1], hvp_every=1, seed=0)
    assert one.hessian_se[0][0] is None  # one sample: no spread to report
    with pytest.raises(StudioError, match="hvp-batches"):
        savit_scores(m, base, data, hvp_batches=-1)


def test_plan_records_the_split_spread_and_the_method_draws_its_hvp_batches():
    from studio.prune import get_method

    method = get_method("savit")
    assert method.calib_batches({}, 64) == 8
    assert method.calib_batches({"hvp_batches": 20}, 64) == 20
    assert method.calib_batches({"hvp_batches": 5, "hvp_every": 2}, 64) == 9
    assert method.calib_batches({"hvp_batches": 5}, 64, given=3) == 3
    m, base = make()
    plan = make_plan(
        "savit", PruneRequest(loaded(m, base), {"target_macs": 0.6, "hvp_batches": 3}, batches(4))
    )
    p = plan.params
    assert p["hvp_batches"] == 3 and p["hvp_batches_used"] == 3
    assert len(p["split_spread"]["fractions_se"]) == 3 and p["split_spread"]["groups"] == 3
    assert all(v >= 0 for v in p["split_spread"]["fractions_se"])
    assert np.asarray(p["hessian_se"]).shape == (3, 3)


def test_cost_model_equals_plan_cost():
    _, base = make("deit_tiny_distilled_patch16_224")
    facts = arch_facts(base)
    cost = CostModel.of(base, facts)
    rng = np.random.default_rng(0)
    for _ in range(5):
        heads = [tuple(sorted(rng.choice(3, rng.integers(1, 4), replace=False).tolist())) for _ in range(3)]
        mlp = [tuple(sorted(rng.choice(192, rng.integers(1, 193), replace=False).tolist())) for _ in range(3)]
        embed = tuple(sorted(rng.choice(48, rng.integers(1, 49), replace=False).tolist()))
        plan = PrunePlan(base, tuple(BlockPlan(i, heads=heads[i], mlp=mlp[i]) for i in range(3)), embed=embed)
        H, M = sum(map(len, heads)), sum(map(len, mlp))
        assert int(cost.total(H, M, len(embed))) == plan_cost(plan, facts)["macs"]
    assert cost.base_total == plan_cost(PrunePlan.dense(base), facts)["macs"]


def test_protect_keeps_exactly_the_top_scores():
    s = [0.3, 0.9, 0.1, 0.5, 0.8] * 4  # 20 units: 5 % -> 1 protected
    p = protect(s, 0.05)
    assert np.isinf(p).sum() == 1 and np.isinf(p[1])
    p = protect(s, 0.25)  # 5 protected: the four 0.9 and the first 0.8 (stable order)
    assert set(np.flatnonzero(np.isinf(p))) == {1, 6, 11, 16, 4}
    assert np.isinf(protect([1.0, 2.0], 0.0)).sum() == 1  # never empty a layer


def test_grid_search_is_the_exact_optimum():
    """Brute force over every (heads, mlp, embed) count of a tiny cost model gives the same objective."""
    cost = CostModel(tokens=5, head_dim=2, stem_per_channel=7, heads_total=6, mlp_total=24, embed=8)
    hess = ((2.0, 0.3, -0.1), (0.3, 0.5, 0.2), (-0.1, 0.2, 1.0))
    target, tol = 0.6, 0.02
    a = allocate(cost, hess, target, max_pruned=(4, 20, 6), tol=tol)
    base = cost.base_total
    best = np.inf
    for na, nc in itertools.product(range(5), range(7)):
        nbs = [nb for nb in range(21) if cost.total(6 - na, 24 - nb, 8 - nc) <= target * base]
        if not nbs:
            continue
        nb = min(nbs)
        f = cost.total(6 - na, 24 - nb, 8 - nc) / base
        if abs(f - target) <= tol:
            best = min(best, objective(hess, na / 6, nb / 24, nc / 8))
    assert a.objective == pytest.approx(best)
    assert abs(a.macs_fraction - target) <= tol
    assert a.macs == int(cost.total(6 - a.heads, 24 - a.mlp, 8 - a.embed))


def test_unreachable_target_says_how_to_fix():
    cost = CostModel(tokens=5, head_dim=2, stem_per_channel=7, heads_total=6, mlp_total=24, embed=8)
    with pytest.raises(StudioError, match="larger --target-macs"):
        allocate(cost, ((1, 0, 0), (0, 1, 0), (0, 0, 1)), 0.01, max_pruned=(1, 1, 1))


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_savit_meets_the_flops_target(target):
    m, base = make()
    plan = make_plan("savit", PruneRequest(loaded(m, base), {"target_macs": target}, batches(2)))
    assert abs(plan.summary["macs_fraction"] - target) <= 1e-3
    alloc = plan.params["allocation"]
    assert alloc["macs"] == plan.summary["macs_after"]
    assert plan.method == "savit" and all(plan.kept(i)["heads"] >= 1 for i in range(3))
    assert torch.isfinite(apply_plan(copy.deepcopy(m), plan)(batches(1)[0][0])).all()


def test_plan_removes_the_lowest_unprotected_units():
    _, base = make()
    rng = np.random.default_rng(3)
    scores = SavitScores(
        heads=tuple(tuple(rng.random(3).tolist()) for _ in range(3)),
        mlp=tuple(tuple(rng.random(192).tolist()) for _ in range(3)),
        embed=tuple(rng.random(48).tolist()),
        hessian=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
        batches=1,
        hvp_batches=0,
    )
    plan, alloc = savit_plan(base, scores, 0.6, protect_fraction=0.05)
    flat = sorted(
        (v, i, h) for i, r in enumerate(scores.heads) for h, v in enumerate(r) if v < max(r)
    )  # the top head of each block is protected
    gone = {(i, h) for _, i, h in flat[: alloc.heads]}
    for i in range(3):
        kept = set(range(3)) if plan.block(i).heads is None else set(plan.block(i).heads)
        assert kept == {h for h in range(3) if (i, h) not in gone}
        assert int(np.argmax(scores.heads[i])) in kept
    n_embed = 48 if plan.embed is None else len(plan.embed)
    assert n_embed == 48 - alloc.embed
    assert max_pruned(base, 0.05) == (6, 3 * (192 - 9), 48 - 2)
