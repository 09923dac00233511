"""P3B (Pruning by Block Benefit): budget, masks, schedule, slicing parity, the training job and its resume."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from studio.analysis.benefit_budget import (
    BlockBudget,
    BudgetSettings,
    importance_from_benefits,
    soft_clamp,
    solve_keep_ratios,
)
from studio.analysis.block_benefit import BenefitProbes, FeatureTaps, load_history
from studio.costs import plan_cost
from studio.data import DataSpec, TensorData
from studio.errors import Cancelled, StudioError
from studio.events import CancelToken
from studio.flows import run_folder
from studio.models import LoadedModel, ModelSpec, create_vit, describe_base
from studio.prune import get_method
from studio.prune.p3b import (
    BranchGates,
    P3BPruner,
    P3BSettings,
    Schedule,
    parse_gate_weights,
    parse_keep_ratios,
    ramp,
    soft_mask,
    theta_at,
)
from studio.runs import RunDir
from studio.surgery import apply_plan
from studio.train import TrainSpec, fit

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
ARCH = "vit_tiny_patch16_224"


def _tiny(seed: int = 0, **over):
    torch.manual_seed(seed)
    kw = {**KW, **over}
    m = create_vit(ARCH, **kw)
    return m, describe_base(m, ARCH, kw)


def _budget_holds(kappa, W, w_non, pr):
    total = W.sum() + w_non
    return abs((kappa * W).sum() + w_non - (1 - pr) * total)


# ------------------------------------------------------------------------------------------------- budget
def test_soft_clamp_reference_values():
    v = soft_clamp(np.array([-2.0, 0.0, 2.0, 5.0, 7.1, 50.0]))
    np.testing.assert_allclose(v[:4], [0.06, 0.69, 2.86, 6.95], atol=0.01)
    assert v[4] > 9.25 and v[5] == pytest.approx(10.0)  # the notes round 9.28 at u = 7.1 to "over 9.3"


@pytest.mark.parametrize("pr", [0.1, 0.3, 0.5, 0.75])
def test_solve_meets_budget_exactly(pr):
    rng = np.random.default_rng(int(pr * 100))
    W = rng.integers(2_000, 9_000, 24).astype(float)
    imp = rng.gamma(2.0, 1.0, 24)
    imp[[3, 7]] = 0.0
    w_non = 1_500.0
    kappa = solve_keep_ratios(imp, W, w_non, pr, min_keep=0.02)
    assert _budget_holds(kappa, W, w_non, pr) < 1.0  # well within one element's parameter count
    assert kappa.min() >= 0.02 and kappa.max() <= 1.0
    assert kappa[3] == kappa[7] == 0.02  # no importance: the minimum
    free = (kappa > 0.02) & (kappa < 1.0)
    ratio = kappa[free] / imp[free]  # free blocks share one scale s
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


def test_solve_pins_dense_blocks_and_spills_over():
    W = np.array([100.0, 100.0, 100.0, 100.0])
    kappa = solve_keep_ratios(np.array([100.0, 1.0, 1.0, 0.0]), W, 0.0, 0.4)
    assert kappa[0] == 1.0 and kappa[3] == 0.0
    assert _budget_holds(kappa, W, 0.0, 0.4) < 1e-9
    # every positive block whole is not enough: the remainder goes uniformly to the zero-importance ones
    kappa = solve_keep_ratios(np.array([1.0, 0.0, 0.0, 0.0]), W, 0.0, 0.25)
    np.testing.assert_allclose(kappa, [1.0, 2 / 3, 2 / 3, 2 / 3])


def test_nonpositive_benefit_gets_minimum_and_degenerate_case_is_uniform():
    W = np.array([400.0, 800.0, 400.0, 800.0, 400.0, 800.0])
    s = BudgetSettings(min_keep=0.05, zero_floor=True)  # the option, not the default
    d = np.array([0.3, -0.1, 0.0, 0.5, 0.2, -0.4])
    imp = importance_from_benefits(d, d, W, s)
    kappa = solve_keep_ratios(imp, W, 300.0, 0.5, min_keep=s.min_keep)
    assert set(np.flatnonzero(kappa == 0.05)) == {1, 2, 5}
    assert _budget_holds(kappa, W, 300.0, 0.5) < 1.0
    # Q6: every benefit negative -> no block preferred: one keep ratio for all, budget still met
    neg = -np.abs(d) - 0.1
    imp = importance_from_benefits(neg, neg, W, s)
    assert np.isfinite(imp).all()
    kappa = solve_keep_ratios(imp, W, 300.0, 0.5, min_keep=s.min_keep)
    np.testing.assert_allclose(kappa, kappa[0])
    assert _budget_holds(kappa, W, 300.0, 0.5) < 1e-6
    # the reference clamp (no zero floor) still gives a non-positive block a little budget
    imp_ref = importance_from_benefits(d, d, W, BudgetSettings(zero_floor=False))
    assert (imp_ref > 0).all() and imp_ref[1] < imp_ref[0]


@pytest.mark.parametrize("eps", [1e-6, 0.0, -1e-6])
def test_default_gives_a_nearly_emptied_block_its_budget_back(eps):
    """P3B's reactivation (notes §2.5): a block cut to 40 parameters whose benefit turns (barely) positive gets
    budget back under the default settings, continuously in D: D = -1e-6, 0 and +1e-6 give the same κ. The
    ``zero_floor`` option (no longer the default) zeroes it at D <= 0, a jump from κ = 1 to κ = 0."""
    W = np.full(4, 4_000.0)
    kept = np.array([4_000.0, 3_000.0, 2_000.0, 40.0])
    d = np.array([1.0, 0.6, 0.3, eps])
    assert BudgetSettings().zero_floor is False

    def kappa(settings: BudgetSettings) -> np.ndarray:
        imp = BlockBudget(settings).update(d, d, kept)  # the job's path: first update, no EMA history
        return solve_keep_ratios(imp, W, 0.0, 0.5, min_keep=settings.min_keep)

    k = kappa(BudgetSettings())
    assert k[3] == 1.0  # the nearly-emptied block is kept whole again
    assert _budget_holds(k, W, 0.0, 0.5) < 1e-6
    d_pos = d.copy()
    d_pos[3] = 1e-6
    k_pos = solve_keep_ratios(BlockBudget(BudgetSettings()).update(d_pos, d_pos, kept), W, 0.0, 0.5)
    np.testing.assert_allclose(k, k_pos, atol=1e-5)  # no jump at D = 0
    floored = kappa(BudgetSettings(zero_floor=True))
    assert floored[3] == (1.0 if eps > 0 else 0.0)


def test_solve_refuses_impossible_budgets():
    W = np.array([100.0, 100.0])
    with pytest.raises(StudioError, match="Lower the prune ratio"):
        solve_keep_ratios(np.ones(2), W, 1000.0, 0.5)
    np.testing.assert_array_equal(solve_keep_ratios(np.ones(2), W, 10.0, 0.0), [1.0, 1.0])


def test_ramp_theta_and_parsers():
    k = np.array([0.2, 1.0])
    np.testing.assert_allclose(ramp(k, 9, 10, 20), [1.0, 1.0])
    np.testing.assert_allclose(ramp(k, 14, 10, 20), [1 - 0.8 * 0.5, 1.0])
    np.testing.assert_allclose(ramp(k, 40, 10, 20), k)
    assert theta_at(5, 20, 40) == 0.1 and theta_at(30, 20, 40) == pytest.approx(0.05)
    assert theta_at(40, 20, 40) == 0.0 and theta_at(99, 20, 40) == 0.0
    assert parse_gate_weights("attn_out:1.5,mlp_hid:0.75")["mlp_hid"] == 0.75
    with pytest.raises(StudioError, match="NAME:VALUE"):
        parse_gate_weights("bogus:2")
    assert parse_keep_ratios("0.5,1,0,0.25", 4).tolist() == [0.5, 1.0, 0.0, 0.25]
    with pytest.raises(StudioError, match="need 4 values"):
        parse_keep_ratios("0.5,2", 4)


def test_schedule_scales_with_run_length():
    s = Schedule.for_run(40, 20)
    assert (s.start_epoch, s.sparse_epoch, s.finalize_epoch, s.steps_per_update) == (4, 10, 20, 7)
    s = Schedule.for_run(8, 3, steps_per_update=2)
    updates = [t for t in range(s.epochs * 3) if s.is_update(t)]
    assert updates and all(s.t_start <= t < s.t_final for t in updates)
    assert np.diff(updates).tolist() == [2] * (len(updates) - 1)
    with pytest.raises(StudioError, match="start ≤ sparse"):
        Schedule(10, 6, 5, 9, 5, 1).validate()


# --------------------------------------------------------------------------------------------------- masks
def _gates_with_scores(seed: int = 0) -> BranchGates:
    m, _ = _tiny()
    from studio.prune.p3b import branch_costs

    cost, _ = branch_costs(m.blocks[0], 48)
    g = BranchGates("attn", 0, (48, 16, 48), cost, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    for n in g.names:
        g.taylor[n] = torch.rand(g.taylor[n].shape, generator=gen, dtype=torch.float64)
    g.count = 1
    return g


def test_soft_to_hard_masks_follow_the_formula():
    g = _gates_with_scores()
    weights = parse_gate_weights("attn_out:1.5")
    N = sum(g.sizes)
    target = 0.4 * g.full_params
    k_star = g.set_masks(target, 0.1, weights)
    soft = {n: g.masks[n].detach().clone() for n in g.names}
    # rebuild each element's rank position and compare to sigmoid(ln9 (k - k* - 1/2) / (N θ))
    rho, prot = [], []
    for n in g.names:
        s = g.taylor[n].numpy()
        rank = np.argsort(np.argsort(s, kind="stable"), kind="stable")
        rho.append(weights[n] * (rank + 1) / len(s))
        prot.append(rank == len(s) - 1)
    rho_a, prot_a = np.concatenate(rho), np.concatenate(prot)
    gid = np.concatenate([np.full(s, i) for i, s in enumerate(g.sizes)])
    idx = np.concatenate([np.arange(s) for s in g.sizes])
    order = np.lexsort((idx, gid, rho_a, prot_a))
    pos = np.empty(N)
    pos[order] = np.arange(1, N + 1)
    expected = 1 / (1 + np.exp(-math.log(9) * (pos - k_star - 0.5) / (N * 0.1)))
    got = torch.cat([soft[n] for n in g.names]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # θ → 0 sharpens the same ranking into the hard step, keeping exactly the elements with m ≥ 0.5
    assert g.set_masks(target, 0.0, weights) == k_star
    hard = torch.cat([g.masks[n].detach() for n in g.names]).numpy()
    assert set(np.unique(hard)) <= {0.0, 1.0}
    np.testing.assert_array_equal(hard, (got >= 0.5).astype(float))
    last_pruned, first_kept = soft_mask(np.array([k_star, k_star + 1]), k_star, N, 0.1)
    assert last_pruned < 0.5 < first_kept and last_pruned + first_kept == pytest.approx(1.0)


@pytest.mark.parametrize("kappa", [0.0, 0.1, 0.35, 0.8, 1.0])
def test_threshold_meets_block_budget_within_one_element(kappa):
    g = _gates_with_scores(seed=int(kappa * 10))
    g.set_masks(kappa * g.full_params, 0.0, parse_gate_weights(""))
    assert all(g.kept_counts())  # every gate keeps at least one element
    if kappa > 0:
        assert abs(g.kept_params() - kappa * g.full_params) <= g.max_element_params()


def test_block_counts_match_plan_costs():
    m, base = _tiny()
    pr = P3BPruner(m, base, Schedule.for_run(4, 2, steps_per_update=1), P3BSettings(patch_probe="mean"))
    total = sum(p.numel() for p in m.parameters())
    assert pr.block_params.sum() + pr.non_block_params == total
    gen = torch.Generator().manual_seed(1)
    for b, k in zip(pr.branches, np.linspace(0.1, 0.9, len(pr.branches))):
        for n in b.names:
            b.taylor[n] = torch.rand(b.taylor[n].shape, generator=gen, dtype=torch.float64)
        b.count = 1
        b.set_masks(k * b.full_params, 0.0, pr.weights)
    plan = pr.plan()
    assert plan_cost(plan)["params"] == int(pr.kept_params().sum()) + pr.non_block_params
    pr.remove()
    assert not m.blocks[0].norm1._forward_hooks and not m.norm._forward_pre_hooks


def test_masked_and_sliced_logits_agree_with_ln_over_kept_channels():
    m, base = _tiny(seed=3)
    m.eval()
    pr = P3BPruner(m, base, Schedule.for_run(4, 2, steps_per_update=1), P3BSettings(patch_probe="mean"))
    gen = torch.Generator().manual_seed(2)
    for b, k in zip(pr.branches, [0.3, 0.6, 0.5, 0.2, 0.8, 0.4]):
        for n in b.names:
            b.taylor[n] = torch.rand(b.taylor[n].shape, generator=gen, dtype=torch.float64)
        b.count = 1
        b.set_masks(k * b.full_params, 0.0, pr.weights)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        loose = m(x)  # reference semantics: LN over all C channels, then the gate (Q3)
        pr.exact_norm = True
        masked = m(x)
    plan = pr.plan()
    assert plan.block(0).attn_in is not None and plan.block(0).head_dims is not None
    pr.remove()
    with torch.no_grad():
        sliced = apply_plan(copy.deepcopy(m), plan).eval()(x)
    assert (masked - sliced).abs().max() < 1e-5
    assert (loose - sliced).abs().max() > 1e-4  # the known difference the fine-tune phase repairs
    # the attention temperature is the base one: head dims shrank, the function did not change
    assert plan.scale_policy == "keep"


def test_probes_see_detached_features_and_batched_heads_are_independent():
    m, _ = _tiny()
    for kind in ("mean", "conv"):
        probes = BenefitProbes.for_model(m, patch_probe=kind)
        with FeatureTaps(m) as taps:
            m(torch.randn(6, 3, 32, 32))
            stream = taps.stacked()
        assert stream.shape == (7, 6, 17, 48) and not stream.requires_grad
        y = torch.randint(0, 5, (6,))
        losses = probes(stream, y)
        losses.total.backward()
        assert all(p.grad is None for p in m.parameters())
        dc, dp = losses.benefit()
        assert dc.shape == dp.shape == (6,)
        # block 1's head only sees z_1 and z_2: changing z_4 leaves its losses unchanged
        probes.eval()
        s2 = stream.clone()
        s2[4] += 1.0
        a, b = probes(stream, y), probes(s2, y)
        assert torch.allclose(a.cls_in[:3], b.cls_in[:3]) and torch.allclose(a.patch_out[:3], b.patch_out[:3])
        assert not torch.allclose(a.cls_in[4], b.cls_in[4])
    expected = 2 * 3 * 2 * 9 * 48 * 48  # 2L blocks x two 3x3 convs C->C
    convs = sum(
        p.numel()
        for n, p in BenefitProbes.for_model(m, patch_probe="conv").conv.named_parameters()
        if p.ndim == 4
    )
    assert convs == expected


def test_fit_hook_updates_masks_on_schedule_and_trains_probes_only_on_detached_features():
    m, base = _tiny()
    sched = Schedule.for_run(6, 3, steps_per_update=2)
    events = []
    pr = P3BPruner(
        m, base, sched, P3BSettings(prune_ratio=0.5, patch_probe="mean"), callbacks=[events.append]
    )
    probe_before = pr.probes.cls_weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    ds = TensorData(torch.randn(96, 3, 32, 32, generator=gen), torch.randint(0, 5, (96,), generator=gen))
    spec = TrainSpec(
        epochs=sched.finalize_epoch, batch_size=32, lr=5e-4, warmup_epochs=0, min_lr=5e-4, select="last"
    )
    hist = fit(m, ds, None, spec, hooks=[pr]).history
    n_updates = sum(sched.is_update(t) for t in range(sched.t_final))
    assert pr.updates == n_updates > 0
    recs = [e.data for e in events if e.kind == "p3b"]
    assert [r["epoch"] for r in recs] == list(range(sched.finalize_epoch))
    assert all(len(r["benefit_cls"]) == 6 and len(r["kept_params"]) == 6 for r in recs)
    assert hist[-1]["p3b_updates"] == n_updates
    assert not torch.equal(pr.probes.cls_weight, probe_before)
    assert recs[-1]["params_kept"] < recs[0]["params_kept"]
    plan = pr.finalize()
    kept = pr.kept_params()
    assert abs(kept.sum() + pr.non_block_params - 0.5 * (pr.block_params.sum() + pr.non_block_params)) <= sum(
        b.max_element_params() for b in pr.branches
    )
    assert plan.method == "p3b" and plan.params["schedule"]["finalize_epoch"] == sched.finalize_epoch


def test_gates_stay_out_of_the_optimizer_unless_asked():
    gen = torch.Generator().manual_seed(0)
    ds = TensorData(torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 5, (64,), generator=gen))
    sched = Schedule.for_run(4, 2, start=2, sparse=3, finalize=4, steps_per_update=1)
    spec = TrainSpec(epochs=1, batch_size=32, lr=1e-2, warmup_epochs=0, min_lr=1e-2, select="last")
    for in_optimizer in (False, True):
        m, base = _tiny()
        pr = P3BPruner(m, base, sched, P3BSettings(patch_probe="mean", masks_in_optimizer=in_optimizer))
        grouped = {id(p) for g in pr.param_groups() for p in g["params"]}
        assert all((id(t) in grouped) == in_optimizer for t in pr.gate_tensors())
        fit(m, ds, None, spec, hooks=[pr])  # before the start epoch: no mask update overwrites the gates
        moved = max(float((t.detach() - 1).abs().max()) for t in pr.gate_tensors())
        assert (moved > 0) == in_optimizer  # Q2: AdamW drifts the gates only in the reference's mode
        pr.remove()


def test_hand_set_keep_ratios_replace_the_budget():
    m, base = _tiny()
    hand = "1,0.5,0.25,0.5,0.75,0.1"
    sched = Schedule.for_run(4, 2, start=0, sparse=1, finalize=2, steps_per_update=1)
    pr = P3BPruner(m, base, sched, P3BSettings(patch_probe="mean", keep_ratios=hand))
    pr.window.add(torch.linspace(-1, 1, 6), torch.linspace(1, -1, 6))
    pr.update(sched.t_sparse)  # ramp complete: the masks aim at the hand-set ratios
    np.testing.assert_allclose(pr.kappa_applied, [float(v) for v in hand.split(",")])
    for b, k in zip(pr.branches, pr.kappa_applied):
        assert abs(b.kept_params() - k * b.full_params) <= b.max_element_params()
    pr.remove()


def test_pruner_refuses_an_already_pruned_model():
    m, base = _tiny()
    pr = P3BPruner(m, base, Schedule.for_run(4, 2, steps_per_update=1), P3BSettings(patch_probe="mean"))
    for b in pr.branches:
        b.set_masks(0.5 * b.full_params, 0.0, pr.weights)
    plan = pr.plan()
    pr.remove()
    pruned = apply_plan(copy.deepcopy(m), plan)
    with pytest.raises(StudioError, match="already pruned"):
        P3BPruner(pruned, base, Schedule.for_run(4, 2, steps_per_update=1), P3BSettings(patch_probe="mean"))


# ----------------------------------------------------------------------------------------------------- job
def _job_spec(epochs: int = 4, **params):
    from studio.flows.prune import PruneSpec

    p = get_method("p3b").resolve({"prune_ratio": 0.5, "epochs": epochs, "steps_per_update": 2, **params})
    return PruneSpec(
        model=ModelSpec("demo", device="cpu"),
        method="p3b",
        params=p,
        data=DataSpec("demo", limit=160),
        batch_size=64,
        bench=False,
        export=True,
    )


def _loaded():
    m, base = _tiny(num_classes=10, depth=2)
    cfg = {
        "input_size": [3, 32, 32],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    return LoadedModel(
        model=m.eval(),
        base=base,
        data_config=cfg,
        class_names=[str(i) for i in range(10)],
        device=torch.device("cpu"),
    )


def test_method_is_registered_as_a_training_job():
    m = get_method("p3b")
    assert m.trains and m.flow == "p3b" and m.fn is None and m.needs_data
    assert m.resolve({"prune_ratio": "0.25"})["prune_ratio"] == 0.25
    with pytest.raises(StudioError, match="one of"):
        m.resolve({"probe": "huge"})


def test_job_runs_resumes_exactly_and_records_curves(tmp_path):
    loaded = _loaded()
    spec = _job_spec()
    full = RunDir.create(tmp_path / "full", spec.to_dict())
    run_folder(full, spec=spec, loaded=loaded)
    res = full.results()
    assert res["p3b"]["schedule"]["finalize_epoch"] == 2 and res["after"]["matches_plan"]
    assert (
        res["after"]["params"] <= 0.5 * res["before"]["params"] + 600
    )  # within a few elements of the budget
    hist = load_history(full)
    assert hist.epochs == [0, 1] and hist.benefit_cls.shape == (2, 4) and hist.final["params_kept"] > 0
    assert (full.export_dir / "manifest.json").exists()
    # both phases (pruning, fine-tuning the slice) report on the whole run: "epoch 4 / 4", one progress bar
    training = [e["data"] for e in full.events("status") if e["data"].get("state") == "training"]
    assert [d["epochs"] for d in training] == [4, 4] and [d["phase"] for d in training] == [
        "prune",
        "finetune",
    ]
    train = [e["data"] for e in full.events("progress") if e["data"].get("task") == "train"]
    assert train[-1]["done"] == train[-1]["total"] == training[0]["steps"] and train[-1]["epoch"] == 3
    assert [d["done"] for d in train] == sorted(d["done"] for d in train)

    # cancel in the middle of the pruning phase, then resume: same plan and same metrics as the full run
    part = RunDir.create(tmp_path / "part", spec.to_dict())
    token = CancelToken()
    seen = []

    def stop(event):
        if event.kind == "progress" and event.data.get("task") == "train":
            seen.append(1)
            if len(seen) == 2:  # mid-epoch, after the first mask update
                token.set()

    with pytest.raises(Cancelled):
        run_folder(part, spec=spec, loaded=loaded, callbacks=[stop], cancel=token)
    assert not part.plan_file.exists()
    run_folder(part, spec=spec, loaded=loaded, resume=True)
    assert (
        json.loads(part.plan_file.read_text())["blocks"] == json.loads(full.plan_file.read_text())["blocks"]
    )
    assert part.results()["after"]["top1"] == res["after"]["top1"]
    np.testing.assert_allclose(load_history(part).benefit_cls, hist.benefit_cls, rtol=1e-6, atol=1e-9)


def test_job_refuses_a_macs_budget(tmp_path):
    with pytest.raises(StudioError, match=r"no option 'target_macs'.*prune_ratio"):
        _job_spec(target_macs=0.5)
